"""STAR: Star Topology Adaptive Recommender, joint-training baseline (one domain per entity).

Paper: Xiang-Rong Sheng, Liqin Zhao, Guorui Zhou, Xinyao Ding, Binding Dai, Qiang Luo, Siran Yang, Jingshan Lv,
Chi Zhang, Hongbo Deng, Xiaoqiang Zhu et al., "One Model to Serve All: Star Topology Adaptive Recommender for
Multi-Domain CTR Prediction", CIKM 2021 (the MKT paper's [21]).

Our reading:
    - Joint training (stage ``mem``) on both entities' rows, the two entities as STAR's two domains; every row is
      scored by its own entity's network (``torch.where``), the loss is the cross-entropy over all rows.
    - Input: every feature of both entities (the other entity's specific features are null, so zero, on a row),
      dense features as ``x * w`` vectors, each behaviour sequence mean-pooled; all concatenated.
    - Partitioned normalisation: z' = (gamma * gamma_p) (z - E) / sqrt(Var + eps) +
      (beta + beta_p), with each domain's own statistics: in training the mean and variance of the batch's rows
      of that domain (STAR trains on single-domain batches; ours mix both, so each domain's rows are normalised by
      their own batch statistics), in evaluation each domain's moving averages.
    - Star-topology FCN: every layer of ``model.baselines.shared`` + ``model.baselines.tower``
      (MKT paper 4.1.3: [128, 64] then [16, 1]) has shared weights W, b and per-domain W_p, b_p; domain p's layer
      is (W_p * W, b_p + b) (element-wise product), ReLU between layers. W_p starts at ones and b_p at zeros, so
      both domains start from the shared network.
    - Auxiliary network: an MLP of ``model.baselines.tower`` sizes over [domain-indicator embedding,
      input]; its output is added to the star network's logit.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import BaselineModel, common_dim, make_model, select_by_entity, view_fields
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Sheng et al., 'One Model to Serve All: Star Topology Adaptive Recommender for "
         "Multi-Domain CTR Prediction', CIKM 2021")


def entity_one_hot(entity: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """entity (B,) -> (B, 2) one-hot in ENTITY_CODE order (comparisons: no host sync)."""
    return torch.stack([entity == code for code in ENTITY_CODE.values()], dim=1).to(dtype)


class PartitionedNorm(nn.Module):
    """STAR's partitioned normalisation: batch-norm statistics and affine terms per domain (entity).

    Args:
        dim: features per row.
        momentum: weight of a batch in each domain's moving averages.
        eps: added to the variance.

    Example:
        >>> PartitionedNorm(4)(torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1])).shape
        torch.Size([6, 4])
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        domains = len(ENTITY_CODE)
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.domain_gamma = nn.Parameter(torch.ones(domains, dim))
        self.domain_beta = nn.Parameter(torch.zeros(domains, dim))
        self.register_buffer("running_mean", torch.zeros(domains, dim))
        self.register_buffer("running_var", torch.ones(domains, dim))
        self.momentum, self.eps = momentum, eps

    def forward(self, x: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """x (B, F), entity (B,) -> (B, F); statistics in fp32 (also under bf16 autocast)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            onehot = entity_one_hot(entity, x.dtype)  # (B, 2)
            if self.training:
                count = onehot.sum(dim=0).unsqueeze(-1)  # (2, 1) rows per domain
                mean = onehot.t() @ x / count.clamp(min=1.0)  # (2, F)
                var = onehot.t() @ (x - onehot @ mean).square() / count.clamp(min=1.0)  # (2, F) biased
                with torch.no_grad():  # a domain without rows in the batch keeps its averages
                    seen = count > 0
                    self.running_mean.copy_(torch.where(seen, self.running_mean.lerp(mean, self.momentum),
                                                        self.running_mean))
                    self.running_var.copy_(torch.where(seen, self.running_var.lerp(var, self.momentum),
                                                       self.running_var))
            else:
                mean, var = self.running_mean, self.running_var
            normed = (x - onehot @ mean) / torch.sqrt(onehot @ var + self.eps)  # (B, F): each row its domain's
            return normed * (self.gamma * (onehot @ self.domain_gamma)) + (self.beta + onehot @ self.domain_beta)


class StarFCN(nn.Module):
    """Star-topology fully connected network: domain p's layer l is (W_p^l * W^l, b_p^l + b^l).

    Args:
        in_dim: input width.
        layers: sizes; ReLU after each but the last.

    Example:
        >>> StarFCN(8, [4, 1])(torch.randn(3, 8), "target").shape
        torch.Size([3, 1])
    """

    def __init__(self, in_dim: int, layers: List[int]) -> None:
        super().__init__()
        widths = [in_dim] + list(layers)
        self.shared = nn.ModuleList([nn.Linear(widths[i], widths[i + 1]) for i in range(len(layers))])
        domains = len(ENTITY_CODE)
        self.domain_weight = nn.ParameterList([nn.Parameter(torch.ones(domains, widths[i + 1], widths[i]))
                                               for i in range(len(layers))])
        self.domain_bias = nn.ParameterList([nn.Parameter(torch.zeros(domains, widths[i + 1]))
                                             for i in range(len(layers))])

    def forward(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        """x (B, in_dim) through domain ``domain``'s network -> (B, layers[-1])."""
        p = ENTITY_CODE[domain]
        for i, layer in enumerate(self.shared):
            x = nn.functional.linear(x, layer.weight * self.domain_weight[i][p], layer.bias + self.domain_bias[i][p])
            if i < len(self.shared) - 1:
                x = torch.relu(x)
        return x


class STARArch(nn.Module):
    """Fields -> partitioned normalisation -> star-topology FCN (+ auxiliary network) -> logit per row.

    Args:
        schema: feature schema.
        shared: the star layers before the tower part.
        tower: the remaining star layers, the last 1; also the auxiliary network's sizes.

    Example:
        >>> arch = STARArch(cfg.schema, [128, 64], [16, 1])                    # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape             # (B,)
    """

    def __init__(self, schema: SchemaConfig, shared: List[int], tower: List[int]) -> None:
        super().__init__()
        self.fields = view_fields(schema, "all")
        d_in = self.fields.out_dim
        self.norm = PartitionedNorm(d_in)
        self.star = StarFCN(d_in, list(shared) + list(tower))
        dim = common_dim(schema)
        self.domain_embedding = nn.Parameter(torch.randn(len(ENTITY_CODE), dim) * 0.1)  # (2, D)
        self.auxiliary = mlp(dim + d_in, tower, linear_last=True)

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """Each entity's own bias of the star network's last layer (``mkt_torchrec.models.base_rate``)."""
        return {e: self.star.domain_bias[-1][code] for e, code in ENTITY_CODE.items()}

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) -> logits (B,)."""
        x = torch.cat(self.fields(sparse, dense), dim=-1)  # (B, d_in)
        z = self.norm(x, entity)
        main = select_by_entity(entity, {e: self.star(z, e).squeeze(-1) for e in ENTITY_CODE})  # (B,)
        indicator = entity_one_hot(entity, self.domain_embedding.dtype) @ self.domain_embedding  # (B, D)
        return main + self.auxiliary(torch.cat([indicator.to(x.dtype), x], dim=-1)).squeeze(-1)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    b = cfg.model.baselines
    return make_model(cfg, "all", device, STARArch(cfg.schema, b.shared, b.tower))
