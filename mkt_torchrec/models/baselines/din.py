"""DIN: Deep Interest Network, single-domain baseline (and the base model of Finetune and CTNet).

Paper: Guorui Zhou, Xiaoqiang Zhu, Chenru Song, Ying Fan, Han Zhu, Xiao Ma, Yanghui Yan, Junqi Jin, Han Li and
Kun Gai, "Deep Interest Network for Click-Through Rate Prediction", KDD 2018 (the MKT paper's [35]).

Our reading:
    - Single-domain: trained and scored on target rows only (stage ``tem``), on the TEM's inputs (user,
      entity-shared and target-specific features, every behaviour sequence, their dense features).
    - Local activation unit: for each behaviour e_j of a sequence and the candidate v_A (the
      candidate's value of the entity-shared feature whose table the sequence uses, e.g. ``item_id``), a weight
      a(e_j, v_A) from an MLP over [v_A, e_j, v_A - e_j, v_A * e_j] (DIN's released code; the paper's "out
      product"), hidden sizes ``model.baselines.attention_mlp`` (the code's [80, 40]) with PReLU (the paper's
      figure; the code uses sigmoid); the user
      interest is sum_j a_j e_j over the valid behaviours, NOT softmax-normalised (the paper: "normalization with
      softmax on the output of the activation unit is abandoned", to keep the intensity of the interest).
    - DNN ``model.baselines.dnn`` (MKT paper 4.1.3: [128, 64, 16, 1]) with DIN's Dice activation (batch
      statistics in training, moving averages in evaluation) after every hidden layer.
    - Not reproduced: DIN's mini-batch aware regularisation; the trainer applies no weight decay to
      any model.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.base_rate import last_linear
from mkt_torchrec.models.baselines.common import BaselineModel, DiceMLP, make_model, view_features, view_fields
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.sequence import valid_mask
from mkt_torchrec.modules.sparse import SequenceInputs, SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Zhou et al., 'Deep Interest Network for Click-Through Rate Prediction', KDD 2018")


class ActivationUnit(nn.Module):
    """DIN's local activation unit: unnormalised weights of a sequence's behaviours for the candidate.

    Args:
        dim: embedding dim D of the candidate and the behaviours.
        hidden: hidden sizes of the weight MLP (PReLU after each).

    Example:
        >>> unit = ActivationUnit(8, [16])
        >>> unit(torch.randn(2, 8), torch.randn(2, 5, 8), torch.tensor([3, 0])).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, hidden: List[int]) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        width = 4 * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.PReLU(h)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """query (B, D), keys (B, L, D) padded after ``lengths`` (B,) -> (B, D); an empty sequence gives 0."""
        b, length, d = keys.shape
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
        x = torch.cat([q, keys, q - keys, q * keys], dim=-1).reshape(b * length, 4 * d)  # (B*L, 4D)
        weights = self.net(x).view(b, length)  # (B, L)
        weights = weights * valid_mask(lengths, length).to(weights.dtype)  # padding weighs nothing
        return torch.bmm(weights.unsqueeze(1), keys.to(weights.dtype)).squeeze(1)  # (B, D)


class DINArch(nn.Module):
    """Fields + one activation-unit interest per behaviour sequence -> Dice DNN -> logit.

    Args:
        schema: feature schema.
        view: ``target`` or ``all`` (see ``common``).
        dnn: DNN sizes, the last 1.
        attention_hidden: hidden sizes of each activation unit.

    Example:
        >>> arch = DINArch(cfg.schema, "target", [128, 64, 16, 1], [80, 40])    # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape              # (B,)
    """

    def __init__(self, schema: SchemaConfig, view: str, dnn: List[int], attention_hidden: List[int]) -> None:
        super().__init__()
        self.fields = view_fields(schema, view, mean_sequences=False)
        self.sequences = list(schema.sequences)
        self.query_of = {s: schema.sequences[s].shared_feature for s in self.sequences}
        self.sequence_inputs = SequenceInputs(schema, self.sequences, view_features(schema, view))  # + side features
        dim_of = {s: schema.tables[schema.table_of(s)].dim for s in self.sequences}
        self.attention = nn.ModuleDict({s: ActivationUnit(dim_of[s], attention_hidden) for s in self.sequences})
        self.dnn = DiceMLP(self.fields.out_dim + sum(dim_of.values()), dnn)

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """One logit for both entities (``mkt_torchrec.models.base_rate``)."""
        return dict.fromkeys(ENTITY_CODE, last_linear(self.dnn).bias)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) unused -> logits (B,)."""
        si = self.sequence_inputs
        interests = [self.attention[s](si.query(sparse.pooled, s), si.steps(sparse, s), sparse.lengths[s])
                     for s in self.sequences]  # each (B, D)
        x = torch.cat(self.fields(sparse, dense) + interests, dim=-1)  # (B, d_in)
        return self.dnn(x).squeeze(-1)


def din_model(cfg: Config, view: str, device: Optional[torch.device]) -> BaselineModel:
    """DIN on a view's inputs (also Finetune's and CTNet's base model)."""
    b = cfg.model.baselines
    return make_model(cfg, view, device, DINArch(cfg.schema, view, b.dnn, b.attention_mlp))


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    return din_model(cfg, "target", device)
