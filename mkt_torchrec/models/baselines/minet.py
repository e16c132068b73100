"""MiNet: Mixed Interest Network, pre-trained jointly on both entities, then fine-tuned on target rows.

Paper: Wentao Ouyang, Xiuwu Zhang, Lei Zhao, Jinmei Luo, Yu Zhang, Heng Zou, Zhaojie Liu and Yanlong Du, "MiNet:
Mixed Interest Network for Cross-Domain Click-Through Rate Prediction", CIKM 2020 (the MKT paper's [20]).

Our reading:
    - Stages: the MKT paper's Table 2 lists MiNet with the pre-training & fine-tuning methods but says nothing
      more. MiNet's own training is joint: the target-domain CTR task plus an auxiliary source-domain CTR task
      that shares the embeddings. So stage ``mem`` trains MiNet on both entities' rows (each row scored by its
      own entity's tower: the target task and the auxiliary source task; the loss is the cross-entropy over all
      rows), and stage ``tem`` fine-tunes all of it (every tensor transferred) on target rows.
    - Three kinds of interest: the long-term interest across domains p_u is the user-profile fields (user
      features and user dense features, concatenated: the embeddings both entities share); one short-term
      interest per behaviour sequence (a source one and a target one in the paper; any number here).
    - Item-level attention (per sequence, our reading of MiNet's): weights softmax_i(h^T ReLU(W [r_i, q, u, r_i * M q])) over the valid
      behaviours r_i, with q the candidate's embedding on the sequence's table (its entity-shared feature, e.g.
      ``item_id``) and u = p_u; M is MiNet's transfer matrix, which maps the candidate into a source sequence's
      space (learned, starting at the identity); a target-entity sequence uses r_i * q. Hidden sizes
      ``model.baselines.attention_mlp``.
    - Interest-level attention: each interest vector v (p_u and every sequence's interest) is scaled by
      exp(g_v^T ReLU(V_v [v, q_all, p_u]) + b_v), MiNet's exponential weights, not normalised across the
      interests; the exponent is clamped at 10 so that fp32 / bf16 cannot overflow. q_all is the
      candidate's item-side fields (entity-shared and both entities' specific features, dense included; the
      other entity's are zero on a row).
    - [scaled interests, q_all] -> MLP ``model.baselines.shared`` (the joint network of MKT paper 4.1.3, [128, 64])
      -> each entity's tower ``model.baselines.tower`` ([16, 1]).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import (BaselineModel, EntityTowers, FieldEmbedding, common_dim, make_model,
                                                  view_dense, view_features)
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sequence import valid_mask
from mkt_torchrec.modules.sparse import SequenceInputs, SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Ouyang et al., 'MiNet: Mixed Interest Network for Cross-Domain Click-Through Rate "
         "Prediction', CIKM 2020")

EXP_CLAMP = 10.0


class ItemAttention(nn.Module):
    """MiNet's item-level attention over one behaviour sequence.

    Args:
        dim: embedding dim D of the candidate and the behaviours.
        user_dim: width of the long-term interest p_u.
        hidden: hidden sizes of the scoring MLP.
        transfer: learn a transfer matrix M (a sequence of the other domain) or use the identity.

    Example:
        >>> att = ItemAttention(8, 6, [16], transfer=True)
        >>> att(torch.randn(2, 8), torch.randn(2, 6), torch.randn(2, 5, 8), torch.tensor([3, 0])).shape
        torch.Size([2, 8])
    """

    def __init__(self, dim: int, user_dim: int, hidden: List[int], transfer: bool) -> None:
        super().__init__()
        self.transfer = nn.Parameter(torch.eye(dim)) if transfer else None  # M (D, D)
        self.score = mlp(3 * dim + user_dim, [*hidden, 1], linear_last=True)

    def forward(self, query: torch.Tensor, user: torch.Tensor, keys: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        """query (B, D), user (B, U), keys (B, L, D) padded after ``lengths`` (B,) -> (B, D); empty gives 0."""
        length = keys.shape[1]
        mapped = query @ self.transfer.t() if self.transfer is not None else query  # (B, D): M q
        q = query.unsqueeze(1).expand_as(keys)  # (B, L, D)
        u = user.unsqueeze(1).expand(-1, length, -1)  # (B, L, U)
        scores = self.score(torch.cat([keys, q, u, keys * mapped.unsqueeze(1)], dim=-1)).squeeze(-1)  # (B, L)
        mask = valid_mask(lengths, length)  # (B, L)
        weights = torch.softmax(scores.float().masked_fill(~mask, -1e9), dim=-1) * mask  # all-padding row -> 0
        return torch.bmm(weights.unsqueeze(1).to(keys.dtype), keys).squeeze(1)  # (B, D)


class MiNetArch(nn.Module):
    """Long-term and short-term interests, weighted by interest-level attention -> MLP -> entity towers.

    Args:
        schema: feature schema.
        shared: the MLP after the interests.
        tower: each entity tower's sizes, the last 1.
        attention_hidden: hidden sizes of the item-level and interest-level attention networks.

    Example:
        >>> arch = MiNetArch(cfg.schema, [128, 64], [16, 1], [80, 40])         # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape             # (B,)
    """

    def __init__(self, schema: SchemaConfig, shared: List[int], tower: List[int],
                 attention_hidden: List[int]) -> None:
        super().__init__()
        features, dense, dim = view_features(schema, "all"), view_dense(schema, "all"), common_dim(schema)
        user = [f for f in features if schema.features[f].group == "user"]
        user_dense = [n for n in dense if schema.dense[n].group == "user"]
        self.user = FieldEmbedding(schema, user, user_dense, [], dim)  # p_u
        self.item = FieldEmbedding(schema, [f for f in features if f not in user],
                                   [n for n in dense if n not in user_dense], [], dim)  # q_all
        self.sequences = list(schema.sequences)
        self.query_of = {s: schema.sequences[s].shared_feature for s in self.sequences}
        self.sequence_inputs = SequenceInputs(schema, self.sequences, features)  # steps and query + side features
        seq_dim = {s: schema.tables[schema.table_of(s)].dim for s in self.sequences}
        u_dim, q_dim = self.user.out_dim, self.item.out_dim
        self.item_attention = nn.ModuleDict({
            s: ItemAttention(seq_dim[s], u_dim, attention_hidden, transfer=schema.sequences[s].entity == "source")
            for s in self.sequences})
        widths = {"user": u_dim, **seq_dim}
        self.interest_attention = nn.ModuleDict({
            name: mlp(width + q_dim + u_dim, [*attention_hidden, 1], linear_last=True)
            for name, width in widths.items()})
        self.mlp = mlp(sum(widths.values()) + q_dim, shared)
        self.towers = EntityTowers(shared[-1], tower)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) -> logits (B,)."""
        user = torch.cat(self.user(sparse, dense), dim=-1)  # (B, U): p_u
        item = torch.cat(self.item(sparse, dense), dim=-1)  # (B, Q): q_all
        interests: Dict[str, torch.Tensor] = {"user": user}
        for s in self.sequences:
            si = self.sequence_inputs
            interests[s] = self.item_attention[s](si.query(sparse.pooled, s), user, si.steps(sparse, s),
                                                  sparse.lengths[s])  # (B, D)
        scaled = []
        for name, v in interests.items():
            score = self.interest_attention[name](torch.cat([v, item, user], dim=-1))  # (B, 1)
            scaled.append(v * torch.exp(score.float().clamp(max=EXP_CLAMP)).to(v.dtype))
        hidden = self.mlp(torch.cat(scaled + [item], dim=-1))  # (B, shared[-1])
        return self.towers({"source": hidden, "target": hidden}, entity)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    b = cfg.model.baselines
    return make_model(cfg, "all", device, MiNetArch(cfg.schema, b.shared, b.tower, b.attention_mlp))
