"""FiBiNet: feature importance (SENET) and bilinear feature interaction, single-domain baseline.

Paper: Tongwen Huang, Zhiqi Zhang and Junlin Zhang, "FiBiNET: Combining Feature Importance and Bilinear Feature
Interaction for Click-Through Rate Prediction", RecSys 2019 (the MKT paper's [12]).

Our reading:
    - Single-domain: trained and scored on target rows only (stage ``tem``), on the TEM's inputs (user,
      entity-shared and target-specific features, their dense features as ``x * w`` vectors, and every
      behaviour sequence as one field: the mean of its elements' embeddings). All f fields must have one
      embedding dim k (the paper's setting; the bilinear matrices are k x k).
    - SENET layer: squeeze z_i = mean of field i's embedding; excitation A = ReLU(W2 ReLU(W1 z)) with
      W1: f -> f / r (``model.baselines.fibinet_reduction``, the paper's r = 3); re-weight V = A * E.
    - Bilinear-interaction layer on E and, separately parameterised, on V: p_ij = (v_i W) * v_j for
      every pair i < j, with W shared by all pairs (``field_all``), one per field i (``field_each``) or one per
      pair (``field_interaction``, the default: ``model.baselines.fibinet_bilinear``).
    - Combination layer: [p, q] flattened -> the deep part, DNN ``model.baselines.dnn`` (MKT paper 4.1.3:
      [128, 64, 16, 1]), ReLU, whose output is the logit. Left out: the output's first-order term sum_i w_i x_i,
      which would need a second set of one-wide tables per feature.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.base_rate import last_linear
from mkt_torchrec.models.baselines.common import BaselineModel, make_model, view_fields
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Huang, Zhang and Zhang, 'FiBiNET: Combining Feature Importance and Bilinear Feature "
         "Interaction for Click-Through Rate Prediction', RecSys 2019")


class SENet(nn.Module):
    """Squeeze-and-excitation over fields: one learned weight per field and row.

    Args:
        fields: number of fields f.
        reduction: reduction ratio r (hidden width max(1, f // r)).

    Example:
        >>> SENet(6, 3)(torch.randn(2, 6, 4)).shape
        torch.Size([2, 6, 4])
    """

    def __init__(self, fields: int, reduction: int) -> None:
        super().__init__()
        self.excite = nn.Sequential(nn.Linear(fields, max(1, fields // reduction)), nn.ReLU(),
                                    nn.Linear(max(1, fields // reduction), fields), nn.ReLU())

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """e (B, f, k) -> (B, f, k) re-weighted."""
        weights = self.excite(e.mean(dim=-1))  # (B, f)
        return e * weights.unsqueeze(-1)


class Bilinear(nn.Module):
    """p_ij = (v_i W) * v_j for each field pair i < j.

    Args:
        fields: number of fields f.
        dim: embedding dim k.
        kind: ``field_all``, ``field_each`` or ``field_interaction``.

    Example:
        >>> Bilinear(4, 3, "field_interaction")(torch.randn(2, 4, 3)).shape   # 6 pairs
        torch.Size([2, 6, 3])
    """

    def __init__(self, fields: int, dim: int, kind: str) -> None:
        super().__init__()
        left, right = torch.triu_indices(fields, fields, offset=1)
        self.register_buffer("left", left, persistent=False)  # (P,) field i of each pair
        self.register_buffer("right", right, persistent=False)  # (P,) field j of each pair
        count = {"field_all": 1, "field_each": fields, "field_interaction": int(left.numel())}
        if kind not in count:
            raise ValueError(f"model.baselines.fibinet_bilinear: unknown type {kind!r}; expected one of {list(count)}")
        self.kind = kind
        self.weight = nn.Parameter(torch.empty(count[kind], dim, dim))  # (1 | f | P, k, k)
        for w in self.weight.data:
            nn.init.xavier_normal_(w)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v (B, f, k) -> (B, P, k), P = f (f - 1) / 2."""
        vi, vj = v[:, self.left], v[:, self.right]  # (B, P, k) each
        if self.kind == "field_all":
            return torch.matmul(vi, self.weight[0]) * vj
        w = self.weight[self.left] if self.kind == "field_each" else self.weight  # (P, k, k)
        return torch.einsum("bpk,pkl->bpl", vi, w) * vj


class FiBiNetArch(nn.Module):
    """Fields -> SENET and bilinear interactions -> DNN -> logit.

    Args:
        schema: feature schema.
        view: ``target`` (or ``all``) inputs.
        dnn: DNN sizes, the last 1.
        reduction: SENET's reduction ratio.
        bilinear: bilinear type.

    Raises:
        ValueError: the fields have several embedding dims.

    Example:
        >>> arch = FiBiNetArch(cfg.schema, "target", [128, 64, 16, 1], 3, "field_interaction")  # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape                              # (B,)
    """

    def __init__(self, schema: SchemaConfig, view: str, dnn: List[int], reduction: int, bilinear: str) -> None:
        super().__init__()
        self.fields = view_fields(schema, view)
        dims = sorted(set(self.fields.dims))
        if len(dims) != 1:
            raise ValueError(f"model.name=fibinet: FiBiNet's bilinear interaction needs one embedding dim for every "
                             f"field, but schema.tables give dims {dims}")
        count, dim = len(self.fields.dims), dims[0]
        self.senet = SENet(count, reduction)
        self.bilinear_e = Bilinear(count, dim, bilinear)
        self.bilinear_v = Bilinear(count, dim, bilinear)
        self.dnn = mlp(2 * (count * (count - 1) // 2) * dim, dnn, linear_last=True)

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """One logit for both entities (``mkt_torchrec.models.base_rate``)."""
        return dict.fromkeys(ENTITY_CODE, last_linear(self.dnn).bias)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) unused -> logits (B,)."""
        e = torch.stack(self.fields(sparse, dense), dim=1)  # (B, f, k)
        p = self.bilinear_e(e)  # (B, P, k)
        q = self.bilinear_v(self.senet(e))  # (B, P, k)
        return self.dnn(torch.cat([p.flatten(1), q.flatten(1)], dim=-1)).squeeze(-1)  # (B, 2 P k) -> (B,)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    b = cfg.model.baselines
    return make_model(cfg, "target", device,
                      FiBiNetArch(cfg.schema, "target", b.dnn, b.fibinet_reduction, b.fibinet_bilinear))
