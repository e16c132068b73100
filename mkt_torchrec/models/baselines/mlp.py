"""MLP: the plain embedding-and-MLP CTR model, the MKT paper's first single-domain baseline.

Paper: the MKT paper (Guan et al., "Effective Two-Stage Knowledge Transfer for Multi-Entity Cross-Domain
Recommendation", arXiv 2402.19101, 4.1.2) describes it as "an embedding layer, a fully connected layer, and an
output layer"; it cites no paper for it.

Our reading:
    - Single-domain: trained and scored on target rows only (stage ``tem``), on the TEM's inputs (user,
      entity-shared and target-specific features, every behaviour sequence, their dense features).
    - Each behaviour sequence is one field, the mean of its elements' embeddings (the "Embedding&MLP" base model
      of the DIN paper sum-pools them; the mean keeps the field's scale independent of the history's length).
    - All fields concatenated -> DNN ``model.baselines.dnn`` (paper 4.1.3: [128, 64, 16, 1]), ReLU, linear last
      layer = the logit.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.base_rate import last_linear
from mkt_torchrec.models.baselines.common import BaselineModel, make_model, view_fields
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("MLP baseline as described in Guan et al., 'Effective Two-Stage Knowledge Transfer for "
         "Multi-Entity Cross-Domain Recommendation', arXiv 2402.19101, 2024 (4.1.2)")


class MLPArch(nn.Module):
    """Fields (sequences mean-pooled) -> DNN -> logit.

    Args:
        schema: feature schema.
        view: ``target`` (or ``all``) inputs.
        dnn: layer sizes, the last 1.

    Example:
        >>> arch = MLPArch(cfg.schema, "target", [128, 64, 16, 1])             # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape             # (B,)
    """

    def __init__(self, schema: SchemaConfig, view: str, dnn: list[int]) -> None:
        super().__init__()
        self.fields = view_fields(schema, view)
        self.dnn = mlp(self.fields.out_dim, dnn, linear_last=True)

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """One logit for both entities (``mkt_torchrec.models.base_rate``)."""
        return dict.fromkeys(ENTITY_CODE, last_linear(self.dnn).bias)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) unused -> logits (B,)."""
        x = torch.cat(self.fields(sparse, dense), dim=-1)  # (B, sum of field widths)
        return self.dnn(x).squeeze(-1)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    return make_model(cfg, "target", device, MLPArch(cfg.schema, "target", cfg.model.baselines.dnn))
