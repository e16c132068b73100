"""CoNet: Collaborative Cross Networks, joint-training baseline (one base network per entity).

Paper: Guangneng Hu, Yu Zhang and Qiang Yang, "CoNet: Collaborative Cross Networks for Cross-Domain
Recommendation", CIKM 2018 (the MKT paper's [10]).

Our reading:
    - Joint training (stage ``mem``) on both entities' rows; CoNet's two domains are the two entities and its
      joint loss (the sum of both domains' cross-entropies) is the cross-entropy over all rows, each
      row scored by its own entity's network (``torch.where``).
    - Input: every feature of both entities (the other entity's specific features are null, so zero, on a row),
      dense features as ``x * w`` vectors, each behaviour sequence mean-pooled; all concatenated. Both base
      networks read the whole row (CoNet's base networks read [user, item] of their own domain; a row here has
      one candidate).
    - Base networks: one per entity, layers ``model.baselines.shared`` (MKT paper 4.1.3: [128, 64]), ReLU.
      Cross connections between consecutive hidden layers: a_s^{l+1} = ReLU(W_s^l a_s^l +
      H^l a_t^l) and a_t^{l+1} = ReLU(W_t^l a_t^l + H^l a_s^l), one transfer matrix H^l shared by both directions
      (the paper's dual transfer). The input layer has none (both networks read the same input). Each entity's
      tower ``model.baselines.tower`` ([16, 1]) follows. The sparse variant (SCoNet's L1 penalty on H) is not
      reproduced.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import BaselineModel, EntityTowers, make_model, view_fields
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.sparse import SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Hu, Zhang and Yang, 'CoNet: Collaborative Cross Networks for Cross-Domain "
         "Recommendation', CIKM 2018")

OTHER = {"source": "target", "target": "source"}


class CoNetArch(nn.Module):
    """Fields -> two base networks joined by cross connections -> one tower per entity -> logit per row.

    Args:
        schema: feature schema.
        shared: base network sizes (at least two layers: the cross connections join consecutive hidden layers).
        tower: each tower's sizes, the last 1.

    Raises:
        ValueError: ``shared`` has one layer only.

    Example:
        >>> arch = CoNetArch(cfg.schema, [128, 64], [16, 1])                   # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape             # (B,)
    """

    def __init__(self, schema: SchemaConfig, shared: List[int], tower: List[int]) -> None:
        super().__init__()
        if len(shared) < 2:
            raise ValueError(f"model.baselines.shared: CoNet's cross connections join consecutive hidden layers; "
                             f"it needs at least two sizes, got {shared}")
        self.fields = view_fields(schema, "all")
        widths = [self.fields.out_dim] + list(shared)
        self.layers = nn.ModuleList([nn.ModuleDict({e: nn.Linear(widths[i], widths[i + 1]) for e in ENTITY_CODE})
                                     for i in range(len(shared))])
        self.cross = nn.ModuleList([nn.Linear(widths[i], widths[i + 1], bias=False)  # H^l, both directions
                                    for i in range(1, len(shared))])
        self.towers = EntityTowers(shared[-1], tower)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) -> logits (B,)."""
        x = torch.cat(self.fields(sparse, dense), dim=-1)  # (B, d_in)
        a: Dict[str, torch.Tensor] = {e: torch.relu(self.layers[0][e](x)) for e in ENTITY_CODE}
        for layer, cross in zip(self.layers[1:], self.cross):
            a = {e: torch.relu(layer[e](a[e]) + cross(a[OTHER[e]])) for e in ENTITY_CODE}
        return self.towers(a, entity)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    b = cfg.model.baselines
    return make_model(cfg, "all", device, CoNetArch(cfg.schema, b.shared, b.tower))
