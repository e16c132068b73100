"""Heterogeneous Feature Alignment (paper 3.2.2, Eq. 3-6)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet

from mkt_torchrec.config import HFAConfig
from mkt_torchrec.modules.layers import mlp


class HFAOutput(NamedTuple):
    q: torch.Tensor  # (B, d_context + d_align): Eq. 6's output q, the same width for both entities
    scores: torch.Tensor  # (B, F_spec): importance score of each specific feature, in (0, 2) (softmax: (0, F))


class HFA(nn.Module):
    """Scores, reweights and aligns one entity's specific features.

    p = 2 * sigmoid(FC([DCN(x) || MLP(x)])) gives one score in (0, 2) per specific feature (Eq. 3-4; with
    ``cfg.score='softmax'``, F * softmax(FC(...)) instead: scores that average 1), where x
    is [context || v_spec] (``cross_input='text'``, the paper's text: specific crossed WITH the shared
    features) or v_spec alone (``'eq3'``, Eq. 3 as printed). Each feature's embedding is multiplied by its
    score (Eq. 5), an MLP maps the flattened block to the aligned width, and q = [context || aligned] (Eq. 6).

    Args:
        context_dim: width of [v_u || v_seq || v_shared].
        spec_dims: embedding dim of each specific feature of this entity (F_spec entries).
        cfg: cross layers, MLP sizes, aligned width (``cfg.align[-1]``).

    Example:
        >>> hfa = HFA(24, [8, 8, 8], HFAConfig())
        >>> out = hfa(torch.randn(4, 24), torch.randn(4, 24))
        >>> out.q.shape, out.scores.shape
        (torch.Size([4, 56]), torch.Size([4, 3]))
    """

    def __init__(self, context_dim: int, spec_dims: list[int], cfg: HFAConfig) -> None:
        super().__init__()
        if not spec_dims:
            raise ValueError("HFA needs at least one entity-specific feature")
        self.with_context = cfg.cross_input == "text"
        spec_width = sum(spec_dims)
        cross_in = spec_width + (context_dim if self.with_context else 0)
        self.explicit = CrossNet(cross_in, cfg.cross_layers)
        self.implicit = mlp(cross_in, cfg.mlp)
        self.score = nn.Linear(cross_in + cfg.mlp[-1], len(spec_dims))
        self.align = mlp(spec_width, cfg.align)
        self.softmax_scores = cfg.score == "softmax"
        # column j of v_spec belongs to feature expand[j]: scores (B, F) -> per-column weights (B, d_spec)
        expand = torch.repeat_interleave(torch.arange(len(spec_dims)), torch.tensor(spec_dims))
        self.register_buffer("expand", expand, persistent=False)
        self.out_dim = context_dim + cfg.align[-1]

    def forward(self, context: torch.Tensor, spec: torch.Tensor) -> HFAOutput:
        """context (B, d_context), spec (B, d_spec) -> q (B, d_context + d_align), scores (B, F_spec)."""
        x = torch.cat([context, spec], dim=-1) if self.with_context else spec  # (B, d_cross)
        crossed = torch.cat([self.explicit(x), self.implicit(x)], dim=-1)  # (B, d_cross + d_mlp)
        logits = self.score(crossed)  # (B, F_spec)
        if self.softmax_scores:  # model.hfa.score: softmax: the scores average 1 over the features
            scores = logits.shape[1] * torch.softmax(logits, dim=-1)
        else:
            scores = 2.0 * torch.sigmoid(logits)  # Eq. 4
        reweighted = spec * scores[:, self.expand]  # (B, d_spec), Eq. 5-6 Multiply
        return HFAOutput(q=torch.cat([context, self.align(reweighted)], dim=-1), scores=scores)


class PadAlign(nn.Module):
    """The ``no_hfa`` ablation: specific features zero-padded to a common width and concatenated, unscored.

    Example:
        >>> PadAlign(24, 16, 32)(torch.randn(4, 24), torch.randn(4, 16)).q.shape
        torch.Size([4, 56])
    """

    def __init__(self, context_dim: int, spec_width: int, padded_width: int) -> None:
        super().__init__()
        self.pad = padded_width - spec_width
        self.out_dim = context_dim + padded_width

    def forward(self, context: torch.Tensor, spec: torch.Tensor) -> HFAOutput:
        padded = nn.functional.pad(spec, (0, self.pad))  # (B, padded_width)
        return HFAOutput(q=torch.cat([context, padded], dim=-1), scores=spec[:, :0])  # (B, 0): no scores
        # (slicing, not a factory with spec.shape[0]: TorchRec's pipeline FX-traces this forward)
