"""PLE: Progressive Layered Extraction, joint-training baseline (one task per entity).

Paper: Hongyan Tang, Junning Liu, Ming Zhao and Xudong Gong, "Progressive Layered Extraction (PLE): A Novel
Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020 (the MKT paper's [22]).

Our reading:
    - Joint training (stage ``mem``) on both entities' rows, the two entities as PLE's two tasks; every row is
      scored by its own entity's tower (``torch.where``), the loss is the cross-entropy over all rows.
    - Input: every feature of both entities (the other entity's specific features are null, so zero, on a row),
      dense features as ``x * w`` vectors, each behaviour sequence mean-pooled; all concatenated.
    - One extraction network (CGC) per size of ``model.baselines.shared`` (the MKT paper's two-layer shared
      network [128, 64] becomes two levels, experts one ReLU layer of that width): at each level every entity has
      ``ple_specific_experts`` experts and there are ``ple_shared_experts`` shared ones (default 1 + 1 + 1: three
      experts per level, the MMoE count of MKT paper 4.1.3). An entity's gate (softmax, linear in the entity's
      input to the level) mixes its own and the shared experts; below the last level a shared gate
      mixes all experts into the shared experts' next input (PLE's multi-level extraction). Each entity's tower
      ``model.baselines.tower`` ([16, 1]) reads its last-level mixture.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import BaselineModel, EntityTowers, make_model, view_fields
from mkt_torchrec.models.baselines.mmoe import mix
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Tang, Liu, Zhao and Gong, 'Progressive Layered Extraction (PLE): A Novel Multi-Task "
         "Learning (MTL) Model for Personalized Recommendations', RecSys 2020")


class ExtractionLevel(nn.Module):
    """One customized gate control (CGC) level of PLE.

    Args:
        in_dim: input width of every expert and gate.
        width: each expert's output width (one ReLU layer).
        specific: experts per entity.
        shared: shared experts.
        last: the last level (no shared gate).

    Example:
        >>> level = ExtractionLevel(8, 4, 1, 1, last=True)
        >>> out, _ = level({"source": torch.randn(2, 8), "target": torch.randn(2, 8)}, torch.randn(2, 8))
        >>> out["target"].shape
        torch.Size([2, 4])
    """

    def __init__(self, in_dim: int, width: int, specific: int, shared: int, last: bool) -> None:
        super().__init__()
        self.specific = nn.ModuleDict({e: nn.ModuleList([mlp(in_dim, [width]) for _ in range(specific)])
                                       for e in ENTITY_CODE})
        self.shared = nn.ModuleList([mlp(in_dim, [width]) for _ in range(shared)])
        self.gates = nn.ModuleDict({e: nn.Linear(in_dim, specific + shared) for e in ENTITY_CODE})
        self.shared_gate = None if last else nn.Linear(in_dim, len(ENTITY_CODE) * specific + shared)

    def forward(self, inputs: Dict[str, torch.Tensor], shared_input: torch.Tensor
                ) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """inputs: entity -> (B, in_dim); shared_input (B, in_dim) -> (entity -> (B, width), shared (B, width)
        or None at the last level)."""
        shared = [expert(shared_input) for expert in self.shared]
        own = {e: [expert(inputs[e]) for expert in self.specific[e]] for e in ENTITY_CODE}
        out = {e: mix(self.gates[e](inputs[e]), own[e] + shared) for e in ENTITY_CODE}
        if self.shared_gate is None:
            return out, None
        every = [x for e in ENTITY_CODE for x in own[e]] + shared
        return out, mix(self.shared_gate(shared_input), every)


class PLEArch(nn.Module):
    """Fields -> PLE's extraction levels -> one tower per entity -> each row's own entity's logit.

    Args:
        schema: feature schema.
        shared: one level per size (its experts' width).
        specific_experts: experts per entity and level.
        shared_experts: shared experts per level.
        tower: each tower's sizes, the last 1.

    Example:
        >>> arch = PLEArch(cfg.schema, [128, 64], 1, 1, [16, 1])              # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape             # (B,)
    """

    def __init__(self, schema: SchemaConfig, shared: List[int], specific_experts: int, shared_experts: int,
                 tower: List[int]) -> None:
        super().__init__()
        self.fields = view_fields(schema, "all")
        widths = [self.fields.out_dim] + list(shared)
        self.levels = nn.ModuleList([
            ExtractionLevel(widths[i], widths[i + 1], specific_experts, shared_experts, last=i == len(shared) - 1)
            for i in range(len(shared))])
        self.towers = EntityTowers(shared[-1], tower)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) -> logits (B,)."""
        x = torch.cat(self.fields(sparse, dense), dim=-1)  # (B, d_in)
        inputs: Dict[str, torch.Tensor] = {e: x for e in ENTITY_CODE}
        shared: Optional[torch.Tensor] = x
        for level in self.levels:
            inputs, shared = level(inputs, shared)
        return self.towers(inputs, entity)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    b = cfg.model.baselines
    return make_model(cfg, "all", device,
                      PLEArch(cfg.schema, b.shared, b.ple_specific_experts, b.ple_shared_experts, b.tower))
