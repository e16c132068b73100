"""Target attention of the candidate item over a behaviour sequence (DIN style or multi-head)."""

from __future__ import annotations

import torch
from torch import nn

from mkt_torchrec.modules.layers import mlp


def valid_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """lengths (B,) -> (B, L) bool, True at the first ``lengths[b]`` positions."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


class DINAttention(nn.Module):
    """DIN's activation unit: a score per position from [q, k, q-k, q*k], softmax over the valid positions
    (``normalize``), or the raw scores as weights (DIN's own choice: the output then grows with the number of
    matching behaviours).

    Args:
        dim: embedding dim D of the query and keys.
        hidden: hidden sizes of the scoring MLP.
        normalize: softmax the scores over the valid positions.

    Example:
        >>> att = DINAttention(8, [16])
        >>> att(torch.randn(2, 8), torch.randn(2, 5, 8), torch.tensor([3, 0])).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, hidden: list[int], normalize: bool = True) -> None:
        super().__init__()
        self.score = mlp(4 * dim, [*hidden, 1], linear_last=True)
        self.normalize = normalize  # False: DIN's unnormalised weights (their sum carries the interest's intensity)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """query (B, D), keys (B, L, D) padded after ``lengths`` (B,) -> (B, D); an empty sequence gives 0."""
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
        scores = self.score(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1)  # (B, L)
        mask = valid_mask(lengths, keys.shape[1])  # (B, L)
        if self.normalize:
            # A large finite negative, not -inf: an all-padding row then softmaxes to uniform and is zeroed below.
            weights = torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1) * mask  # (B, L)
        else:
            weights = scores * mask  # (B, L)
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)  # (B, D)


class MultiHeadTargetAttention(nn.Module):
    """Multi-head attention with the candidate as the single query over the sequence.

    Args:
        dim: embedding dim D (divisible by ``heads``).
        heads: attention heads.

    Example:
        >>> att = MultiHeadTargetAttention(8, 2)
        >>> att(torch.randn(2, 8), torch.randn(2, 5, 8), torch.tensor([3, 0])).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.sequence.heads: {heads} heads do not divide the embedding dim {dim}")
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """query (B, D), keys (B, L, D), lengths (B,) -> (B, D); an empty sequence gives 0."""
        mask = valid_mask(lengths, keys.shape[1])  # (B, L)
        empty = lengths == 0  # (B,)
        # An all-masked row makes softmax NaN: let it see position 0, then zero its output.
        mask = mask | (empty.unsqueeze(1) & (torch.arange(keys.shape[1], device=keys.device) == 0).unsqueeze(0))
        out, _ = self.attn(query.unsqueeze(1), keys, keys, key_padding_mask=~mask, need_weights=False)  # (B, 1, D)
        return out.squeeze(1) * (~empty).unsqueeze(1).to(out.dtype)  # (B, D)


def make_attention(kind: str, dim: int, hidden: list[int], heads: int) -> nn.Module:
    if kind in ("din", "din_sum"):
        return DINAttention(dim, hidden, normalize=kind == "din")
    if kind == "mha":
        return MultiHeadTargetAttention(dim, heads)
    raise ValueError(f"model.sequence.encoder: unknown encoder {kind!r}; expected 'din', 'din_sum' or 'mha'")
