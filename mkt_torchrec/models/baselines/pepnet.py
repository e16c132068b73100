"""PEPNet: Parameter and Embedding Personalized Network, joint-training baseline (one domain / task per entity).

Paper: Jianxin Chang, Chenbin Zhang, Yiqun Hui, Dewei Leng, Yanan Niu, Yang Song and Kun Gai, "PEPNet: Parameter
and Embedding Personalized Network for Infusing with Personalized Prior Information", KDD 2023 (arXiv 2302.01115).

The paper's parts: a Gate Neural Unit ``U(x) = gamma * sigmoid(W' relu(W x + b) + b')`` with gamma = 2 (so a gate
lies in (0, 2) and starts near 1); EPNet, a Gate NU over domain-side features and the stop-gradient of the general
embeddings E that scales E (``O_ep = U_ep(E(F_d) (+) sg(E)) * E``); PPNet, a Gate NU per DNN layer over the
user / item / author prior (id embeddings and ``sg(O_ep)``) that scales that layer's hidden units element-wise, in
each task's tower.

Our reading:
    - Joint training (stage ``mem``) on both entities' rows. The entity is PEPNet's domain (EPNet's domain-side
      feature is a learned embedding of the row's entity, ``common_dim`` wide, as STAR's domain indicator) and
      each entity is one of its tasks (one DNN tower per entity); every row is scored by its own entity's tower
      (``torch.where``), the loss is the cross-entropy over all rows.
    - General embeddings E: every feature of both entities (the other entity's specific features are null, so
      zero, on a row), dense features as ``x * w`` vectors, each behaviour sequence mean-pooled: the same fields
      as the other joint baselines. The paper's domain-specific statistics features are not separate inputs: the
      entity-specific features are among E already.
    - EPNet's gate is per field: one value per field (sparse feature, dense feature, sequence), broadcast over
      that field's embedding width (the paper's delta_domain has one entry per feature; per element would be the
      other reading). Its input is ``entity embedding (+) sg(E)``: E gets its gradient only through the scaled
      output, not through the gate's input.
    - PPNet's prior: the user id embedding (``schema.user_id_feature``) and the item id embedding (the
      entity-shared feature the behaviour sequences are keyed by, ``shared_feature``; every entity-shared
      feature when the schema has no sequence), both trained through the gates (no stop-gradient, as in the
      paper), and ``sg(O_ep)``. There is no author side in this schema.
    - Each entity's tower is an MLP of ``model.baselines.shared`` + ``model.baselines.tower`` (MKT paper 4.1.3:
      [128, 64] then [16, 1]; the paper's towers have no shared bottom), ReLU between layers. PPNet has one
      Gate NU per hidden layer of that network; its output covers both entities' towers (entities x width,
      the paper's split across tasks) and scales each tower's hidden output after the ReLU. The logit layer and
      the tower's input (EPNet's output, already personalised) are not gated.
    - A Gate NU's hidden layer is as wide as its input (the paper does not give the width); both layers start
      with PyTorch's default initialisation, so gates start near, not exactly at, 1.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import (BaselineModel, common_dim, make_model, select_by_entity,
                                                  view_fields)
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.sparse import SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Chang et al., 'PEPNet: Parameter and Embedding Personalized Network for Infusing with "
         "Personalized Prior Information', KDD 2023")

GAMMA = 2.0  # the paper's gate scaling factor: gates in (0, 2), 1 at a zero pre-activation


class GateNU(nn.Module):
    """PEPNet's Gate Neural Unit: ``gamma * sigmoid(W2 relu(W1 x + b1) + b2)``.

    Args:
        in_dim: input width.
        out_dim: number of gate values.
        gamma: scaling factor (the paper: 2).

    Example:
        >>> gate = GateNU(6, 3)
        >>> g = gate(torch.randn(4, 6)); g.shape, bool(((g > 0) & (g < 2)).all())
        (torch.Size([4, 3]), True)
    """

    def __init__(self, in_dim: int, out_dim: int, gamma: float = GAMMA) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_dim, in_dim)
        self.out = nn.Linear(in_dim, out_dim)
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim) -> gates (B, out_dim) in (0, gamma)."""
        return self.gamma * torch.sigmoid(self.out(torch.relu(self.hidden(x))))


class EPNet(nn.Module):
    """Embedding personalisation: one gate value per field from the domain embedding and ``sg(fields)``.

    Args:
        dims: width of each field.
        domain_dim: width of the domain (entity) embedding.

    Example:
        >>> ep = EPNet([4, 4, 2], domain_dim=3)
        >>> ep([torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 2)], torch.randn(5, 3)).shape
        torch.Size([5, 10])
    """

    def __init__(self, dims: List[int], domain_dim: int) -> None:
        super().__init__()
        self.dims = list(dims)
        self.gate = GateNU(domain_dim + sum(self.dims), len(self.dims))

    def forward(self, fields: List[torch.Tensor], domain: torch.Tensor) -> torch.Tensor:
        """fields: F x (B, d_f); domain (B, D_dom) -> O_ep (B, sum d_f), each field scaled by its gate."""
        general = torch.cat(fields, dim=-1)  # (B, sum d_f)
        gates = self.gate(torch.cat([domain.to(general.dtype), general.detach()], dim=-1))  # (B, F)
        return torch.cat([f * gates[:, i: i + 1] for i, f in enumerate(fields)], dim=-1)  # (B, sum d_f)


class PPNet(nn.Module):
    """Parameter personalisation: one MLP tower per entity whose hidden outputs are scaled element-wise by a
    Gate NU per layer over the prior and ``sg(x)``.

    Args:
        in_dim: width of the towers' input x (EPNet's output).
        prior_dim: width of the prior (user and item id embeddings).
        layers: each tower's sizes, the last 1 (a logit); ReLU and a gate after each but the last.

    Example:
        >>> pp = PPNet(8, 4, [6, 3, 1])
        >>> pp(torch.randn(5, 8), torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])).shape
        torch.Size([5])
    """

    def __init__(self, in_dim: int, prior_dim: int, layers: List[int]) -> None:
        super().__init__()
        widths = [in_dim] + list(layers)
        self.towers = nn.ModuleDict({e: nn.ModuleList([nn.Linear(widths[i], widths[i + 1])
                                                       for i in range(len(layers))]) for e in ENTITY_CODE})
        entities = len(ENTITY_CODE)
        self.hidden = list(layers[:-1])
        self.gates = nn.ModuleList([GateNU(prior_dim + in_dim, entities * h) for h in self.hidden])

    def layer_gates(self, x: torch.Tensor, prior: torch.Tensor) -> List[torch.Tensor]:
        """x (B, in_dim), prior (B, prior_dim) -> per hidden layer l: (B, entities, H_l), entities in ENTITY_CODE
        order."""
        z = torch.cat([prior.to(x.dtype), x.detach()], dim=-1)  # (B, prior_dim + in_dim)
        return [gate(z).view(-1, len(ENTITY_CODE), h) for gate, h in zip(self.gates, self.hidden, strict=True)]

    def forward(self, x: torch.Tensor, prior: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim), prior (B, prior_dim), entity (B,) -> logits (B,) of each row's own entity's tower."""
        gates = self.layer_gates(x, prior)
        logits = {}
        for e, code in ENTITY_CODE.items():
            h = x
            for i, layer in enumerate(self.towers[e]):
                h = layer(h)
                if i < len(gates):
                    h = torch.relu(h) * gates[i][:, code]  # (B, H_i)
            logits[e] = h.squeeze(-1)  # (B,)
        return select_by_entity(entity, logits)


def prior_features(schema: SchemaConfig) -> List[str]:
    """PPNet's prior: the user id feature, then the item id (the sequences' shared features, in schema order;
    every entity-shared feature without sequences)."""
    keyed = {s.shared_feature for s in schema.sequences.values()}
    items = [f for f in schema.features if f in keyed] or schema.features_of("shared")
    return [schema.user_id_feature] + items


class PEPNetArch(nn.Module):
    """Fields -> EPNet (entity as domain) -> PPNet towers (user / item prior) -> each row's own entity's logit.

    Args:
        schema: feature schema.
        shared: the towers' first layers.
        tower: the towers' remaining layers, the last 1.

    Example:
        >>> arch = PEPNetArch(cfg.schema, [128, 64], [16, 1])                    # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape               # (B,)  # doctest: +SKIP
    """

    def __init__(self, schema: SchemaConfig, shared: List[int], tower: List[int]) -> None:
        super().__init__()
        self.fields = view_fields(schema, "all")
        self.prior = prior_features(schema)  # embedded by the "all" view, which has every feature
        dim = common_dim(schema)
        self.domain_embedding = nn.Embedding(len(ENTITY_CODE), dim)  # (2, D): the entity as the domain
        self.epnet = EPNet(self.fields.dims, dim)
        prior_dim = sum(schema.tables[schema.table_of(f)].dim for f in self.prior)
        self.ppnet = PPNet(self.fields.out_dim, prior_dim, list(shared) + list(tower))

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """Each entity's logit bias: its tower's last layer's (``mkt_torchrec.models.base_rate``)."""
        return {e: self.ppnet.towers[e][-1].bias for e in ENTITY_CODE}

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) -> logits (B,)."""
        o_ep = self.epnet(self.fields(sparse, dense), self.domain_embedding(entity))  # (B, d_in)
        prior = torch.cat([sparse.pooled[f] for f in self.prior], dim=-1)  # (B, prior_dim)
        return self.ppnet(o_ep, prior, entity)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    b = cfg.model.baselines
    return make_model(cfg, "all", device, PEPNetArch(cfg.schema, b.shared, b.tower))
