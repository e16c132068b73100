"""MMoE: Multi-gate Mixture-of-Experts, joint-training baseline (one task per entity).

Paper: Jiaqi Ma, Zhe Zhao, Xinyang Yi, Jilin Chen, Lichan Hong and Ed H. Chi, "Modeling Task Relationships in
Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018 (the MKT paper's [18]).

Our reading:
    - Joint training (stage ``mem``) on both entities' rows, the two entities as MMoE's two tasks; every row is
      scored by its own entity's tower (``torch.where``), the loss is the cross-entropy over all rows.
    - Input: every feature of both entities (the other entity's specific features are null, so zero, on a row),
      dense features as ``x * w`` vectors, each behaviour sequence mean-pooled; all concatenated.
    - ``model.baselines.mmoe_experts`` experts (MKT paper 4.1.3: 3), each an MLP of ``model.baselines.shared``
      (the paper's two-layer shared network, [128, 64]) with ReLU; one softmax gate per entity, linear in the
      input; each entity's tower ``model.baselines.tower`` ([16, 1]) on its gate's mixture.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import BaselineModel, EntityTowers, make_model, view_fields
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Ma et al., 'Modeling Task Relationships in Multi-task Learning with Multi-gate "
         "Mixture-of-Experts', KDD 2018")


def mix(gate_logits: torch.Tensor, experts: List[torch.Tensor]) -> torch.Tensor:
    """Softmax gate (B, E) over expert outputs E x (B, H) -> (B, H)."""
    weights = torch.softmax(gate_logits, dim=-1)  # (B, E)
    return (weights.unsqueeze(-1) * torch.stack(experts, dim=1)).sum(dim=1)  # (B, E, H) -> (B, H)


class MMoEArch(nn.Module):
    """Fields -> shared experts -> one gate and one tower per entity -> each row's own entity's logit.

    Args:
        schema: feature schema.
        shared: each expert's MLP sizes.
        experts: number of experts.
        tower: each tower's sizes, the last 1.

    Example:
        >>> arch = MMoEArch(cfg.schema, [128, 64], 3, [16, 1])                # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape             # (B,)
    """

    def __init__(self, schema: SchemaConfig, shared: List[int], experts: int, tower: List[int]) -> None:
        super().__init__()
        self.fields = view_fields(schema, "all")
        d_in = self.fields.out_dim
        self.experts = nn.ModuleList([mlp(d_in, shared) for _ in range(experts)])
        self.gates = nn.ModuleDict({e: nn.Linear(d_in, experts) for e in ENTITY_CODE})
        self.towers = EntityTowers(shared[-1], tower)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) -> logits (B,)."""
        x = torch.cat(self.fields(sparse, dense), dim=-1)  # (B, d_in)
        outs = [expert(x) for expert in self.experts]  # each (B, H)
        return self.towers({e: mix(self.gates[e](x), outs) for e in ENTITY_CODE}, entity)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    b = cfg.model.baselines
    return make_model(cfg, "all", device, MMoEArch(cfg.schema, b.shared, b.mmoe_experts, b.tower))
