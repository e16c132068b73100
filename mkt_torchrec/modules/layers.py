"""Small dense layers: MLP heads, the MMoE (CKE) and the GLU knowledge gate."""

from __future__ import annotations

import torch
from torch import nn
from torchrec.modules.mlp import MLP


def mlp(in_dim: int, layers: list[int], linear_last: bool = False) -> nn.Module:
    """TorchRec's MLP (ReLU after every layer); with ``linear_last`` the last layer has no activation.

    Example:
        >>> mlp(8, [16, 1], linear_last=True)(torch.zeros(2, 8)).shape
        torch.Size([2, 1])
    """
    if not linear_last:
        return MLP(in_dim, layers)
    if len(layers) == 1:
        return nn.Linear(in_dim, layers[0])
    return nn.Sequential(MLP(in_dim, layers[:-1]), nn.Linear(layers[-2], layers[-1]))


class MMoE(nn.Module):
    """Multi-gate Mixture-of-Experts: the Common Knowledge Extractor (paper 3.2.3, Eq. 7).

    Experts are shared by every task; each task (here: each entity) has its own softmax gate.

    Args:
        in_dim: input width (d_HFA).
        layers: each expert's MLP sizes; the last is the output width d_CKE (linear, so the output can take
            any sign and PDL's cosine covers [-1, 1]).
        num_experts: number of experts.
        num_gates: number of gates (tasks).

    Example:
        >>> m = MMoE(16, [32, 8], num_experts=3, num_gates=2)
        >>> m(torch.zeros(4, 16), gate=1).shape
        torch.Size([4, 8])
    """

    def __init__(self, in_dim: int, layers: list[int], num_experts: int, num_gates: int) -> None:
        super().__init__()
        self.experts = nn.ModuleList([mlp(in_dim, layers, linear_last=True) for _ in range(num_experts)])
        self.gates = nn.ModuleList([nn.Linear(in_dim, num_experts) for _ in range(num_gates)])
        self.out_dim = layers[-1]

    def forward(self, x: torch.Tensor, gate: int) -> torch.Tensor:
        """x: (B, d_in) -> (B, d_CKE) mixed by gate ``gate``."""
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # (B, E, d_CKE)
        weights = torch.softmax(self.gates[gate](x), dim=-1)  # (B, E)
        return (weights.unsqueeze(-1) * experts).sum(dim=1)  # (B, d_CKE)


class GLUGate(nn.Module):
    """GLU-style knowledge gate (paper 3.3, Eq. 12): ``W_p x * sigmoid(W_g x)``, MEM width -> TEM width.

    Args:
        in_dim: width of the MEM knowledge vector.
        out_dim: width of the TEM vector it is added to.

    Example:
        >>> GLUGate(8, 4)(torch.ones(2, 8)).shape
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_dim) -> (B, out_dim)."""
        return self.proj(x) * torch.sigmoid(self.gate(x))
