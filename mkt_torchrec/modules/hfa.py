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

    With ``cfg.fixed_scale`` (an extension) each categorical feature's embedding is L2-normalised per row
    before it is scored and weighted, and each feature's block of the alignment MLP's first weight matrix is
    scaled to unit norm, so neither the embedding nor the next layer can grow to undo a score (dense features
    arrive at a fixed size from :class:`GroupArch` with ``unit_dense``).

    Args:
        context_dim: width of [v_u || v_seq || v_shared].
        spec_dims: embedding dim of each specific feature of this entity (F_spec entries).
        cfg: cross layers, MLP sizes, aligned width (``cfg.align[-1]``).
        dense_blocks: how many of the last ``spec_dims`` are dense features (not normalised per row: their
            size is the value's).

    Example:
        >>> hfa = HFA(24, [8, 8, 8], HFAConfig())
        >>> out = hfa(torch.randn(4, 24), torch.randn(4, 24))
        >>> out.q.shape, out.scores.shape
        (torch.Size([4, 56]), torch.Size([4, 3]))
    """

    def __init__(self, context_dim: int, spec_dims: list[int], cfg: HFAConfig, dense_blocks: int = 0) -> None:
        super().__init__()
        if not spec_dims:
            raise ValueError("HFA needs at least one entity-specific feature")
        self.fixed_scale = cfg.fixed_scale
        ends = [sum(spec_dims[: i + 1]) for i in range(len(spec_dims))]
        self.bounds = [(end - d, end) for d, end in zip(spec_dims, ends)]  # each feature's columns of v_spec
        self.n_categorical = len(spec_dims) - dense_blocks
        self.with_context = cfg.cross_input == "text"
        spec_width = sum(spec_dims)
        cross_in = spec_width + (context_dim if self.with_context else 0)
        self.explicit = CrossNet(cross_in, cfg.cross_layers)
        self.implicit = mlp(cross_in, cfg.mlp)
        self.score = nn.Linear(cross_in + cfg.mlp[-1], len(spec_dims))
        if self.fixed_scale:  # the first layer's weight is used block-normalised (forward); ReLU as in mlp()
            self.align_in = nn.Linear(spec_width, cfg.align[0])
            self.align = mlp(cfg.align[0], cfg.align[1:]) if len(cfg.align) > 1 else nn.Identity()
        else:
            self.align = mlp(spec_width, cfg.align)
        self.softmax_scores = cfg.score == "softmax"
        # column j of v_spec belongs to feature expand[j]: scores (B, F) -> per-column weights (B, d_spec)
        expand = torch.repeat_interleave(torch.arange(len(spec_dims)), torch.tensor(spec_dims))
        self.register_buffer("expand", expand, persistent=False)
        self.out_dim = context_dim + cfg.align[-1]

    def _unit_rows(self, spec: torch.Tensor) -> torch.Tensor:
        """Each categorical feature's embedding (B, D_f) L2-normalised per row; dense blocks unchanged."""
        # slices at Python offsets, not torch.split: TorchRec's pipeline FX-traces this forward
        blocks = [spec[:, lo:hi] for lo, hi in self.bounds]
        return torch.cat([nn.functional.normalize(b, dim=-1) if i < self.n_categorical else b
                          for i, b in enumerate(blocks)], dim=-1)

    def _align(self, reweighted: torch.Tensor) -> torch.Tensor:
        if not self.fixed_scale:
            return self.align(reweighted)
        w = self.align_in.weight  # (d_align0, d_spec): each feature's column block scaled to unit norm
        block_norms = torch.stack([w[:, lo:hi].norm() for lo, hi in self.bounds]).clamp(min=1e-6)
        w = w / block_norms[self.expand]
        return self.align(torch.relu(nn.functional.linear(reweighted, w, self.align_in.bias)))

    def forward(self, context: torch.Tensor, spec: torch.Tensor) -> HFAOutput:
        """context (B, d_context), spec (B, d_spec) -> q (B, d_context + d_align), scores (B, F_spec)."""
        if self.fixed_scale:
            spec = self._unit_rows(spec)
        x = torch.cat([context, spec], dim=-1) if self.with_context else spec  # (B, d_cross)
        crossed = torch.cat([self.explicit(x), self.implicit(x)], dim=-1)  # (B, d_cross + d_mlp)
        logits = self.score(crossed)  # (B, F_spec)
        if self.softmax_scores:  # model.hfa.score: softmax: the scores average 1 over the features
            scores = logits.shape[1] * torch.softmax(logits, dim=-1)
        else:
            scores = 2.0 * torch.sigmoid(logits)  # Eq. 4
        reweighted = spec * scores[:, self.expand]  # (B, d_spec), Eq. 5-6 Multiply
        return HFAOutput(q=torch.cat([context, self._align(reweighted)], dim=-1), scores=scores)


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
