"""PGTL: Prior-Guided Transfer Learning, joint-training baseline (our CTR adaptation of an item-representation model).

Paper: Heng-Yi Li, Yabo Ni, Anxiang Zeng, Han Yu and Chunyan Miao, "Prior-Guided Transfer Learning for Enhancing
Item Representation in E-commerce", AAAI 2022.

The paper's parts (its Figure 3) and how they appear here:

1. **Domain-perspective embeddings** (its "Embedding Generation"): every field is looked up in the tables both
   entities share (E), and one small attention network per domain turns a field's embedding e^k into
   m^k = a^k * e^k with a^k = G_a(e^k). Source rows and the prior use G_a^s, target rows G_a^t.
2. **Prior feature and domain-adversarial transfer** (Eq. 4-6): a target item's prior x^p is the mean of the
   embeddings of its related source items, which reach the model as one more KeyedJaggedTensor key
   (``data.related_items.key``, built from the train split only by :mod:`mkt_torchrec.data.relations`) looked up in
   the shared item table by the same sharded collection as the item feature. Generators G_f^s (source item fields)
   and G_f^p (prior) give z^s and z^p; a discriminator G_d, behind a gradient reversal layer R_lambda (Eq. 5),
   tells source rows' z^s from target rows' z^p (source vs prior, not source vs target).
3. **Gated enrichment** (Eq. 7-8): g = sigmoid(W [z^p, z^t] + b), and the target item representation is
   g * z^p + z^t, with z^t = G_f^t(target item fields).

Losses (Eq. 6, 9, 10): L1 + L2 = cross-entropy of every row's click (source rows through G_f^s, target rows through
the enriched representation) + ``model.pgtl.adversarial_weight`` x the discriminator's cross-entropy over the rows'
domain samples (a source row's z^s labelled 0, a target row's z^p labelled 1).

Our adaptation (not the paper's): the paper learns item representations scored by cosine similarity of item
pairs (Eq. 1) for recall. Here PGTL is a CTR baseline: each row's item representation (z^s on source rows,
g * z^p + z^t on target rows) is concatenated with the row's context (user features, user dense features and each
behaviour sequence mean-pooled, all through the row's domain attention) and scored by its own entity's tower
(``model.pgtl.tower``); joint training (stage ``mem``) on both entities' rows, like MMoE / STAR here.

Our reading (choices the paper leaves open):
    - Item fields: the entity-shared features (the item id, the category) and the row's entity-specific
      features, dense ones as ``x * w`` vectors (the other entity's specific fields are null, so zero, on a row);
      the same layout on both entities' rows, so G_f^s and G_f^t have the same shapes but their own weights.
    - Relations (``data.related_items``, :mod:`mkt_torchrec.data.relations`): up to K = 8 related source items per
      target item, from the train split only, by the first relation in the order ``item_id`` (the same id: the
      paper's strong relation), ``category`` (its weak one), ``co_click`` (source items clicked by the target
      item's clickers, for entities that share neither id nor category space, as in Tenrec); within a relation
      the most shown source items first (the paper averages all related items; K bounds the key's length).
    - Prior: the mean of the related source items' item-id embeddings (the one key; the paper averages all
      features of the related items, of which we carry the id). The prior's field goes through G_a^s (the paper:
      "G_a^s for x^s and x^p"). A target row whose item has no related item (no relation found in the train split)
      gets no prior: its gate term is zeroed and it gives the discriminator no sample.
    - Generators: G_f^s, G_f^p, G_f^t do not share weights (the paper names three; G_f^p's input, one field, is
      narrower than the item fields). Sizes ``model.pgtl.generator`` ([128, 64]: the MKT paper's shared network
      the other joint baselines use, instead of PGTL's [256, 128]); ReLU, no dropout, like our other baselines
      (the paper: tanh, dropout 0.5).
    - Attention networks: per field, D -> ``model.pgtl.attention`` (paper: [6, 4]) -> D, ReLU, then
      2 * sigmoid, so a^k starts near 1 (m^k near e^k) and the ``no_specific_embedding`` ablation starts from the
      same point. One network per domain shared by all fields (the paper: "two individual small attention
      networks"), which needs one embedding dim for every table.
    - Gradient reversal on both of the discriminator's inputs (Eq. 6 typesets R_lambda around the source term
      only; with R on one side G_f^p would help the discriminator, not play the min-max game the text describes).
      lambda follows DANN's schedule 2 / (1 + exp(-10 p)) - 1 with p = min(1, step / ``model.pgtl.lambda_steps``),
      ``step`` being this model's count of training forwards (a buffer: saved in every checkpoint and restored on
      resume, the same on every rank since every rank steps together, filler steps included, and never read
      back to the host). DANN's p is progress over the whole run; set ``lambda_steps`` to the run's steps for
      exactly that (our trainer's steps: ``train.max_steps``, or epochs x ceil(train rows / (batch x ranks))).
    - Discriminator: a ReLU MLP of the generator's hidden sizes over z, then one logit.
    - Loss weights: L1 + L2 with unit weights (Eq. 10), the discriminator's term weighted by
      ``model.pgtl.adversarial_weight`` (1); no extra regulariser (Eq. 1's beta Omega: the optimisers' defaults).
    - Loss normalisation: one mean over the step's rows (the trainer's weights), as every joint baseline here,
      instead of Eq. 6 / 9's per-entity means; the discriminator term is the mean over the batch's domain
      samples (Eq. 6's 1 / (N_s + N_t)). Our baselines share one loss wrapper (``BaselineTrain``: the click
      cross-entropy), so the discriminator's term joins the backward pass through :func:`attach_loss` (its
      gradient is that of adding the term to the loss); the logged loss is the click cross-entropy.
      On a rank stepping on filler rows (zero click weight) the discriminator term still counts: at most the
      last few steps of an epoch on one rank.
    - Table 3's ablations: ``model.pgtl.ablation=no_specific_embedding`` (a^k = 1: the shared embeddings only)
      and ``no_prior`` (the target item's own fields, through G_a^s, stand in for the prior: the discriminator
      then tells source from target, as in DANN; the paper: "takes the target feature as the prior feature").

Serving: the exported model takes the related ids as one more input key (``data.related_items.key``, (B, K) table
rows, -1 padding), built with the same relation table (:func:`mkt_torchrec.data.relations.related_items`): the
prior is a join on the item, like any item feature. :func:`serving_schema` is the schema whose
``serving_keys`` include it (``mkt export`` reads it through ``models.baselines.serving_schema``),
:func:`serving_model` the serving module; see ``tests/models/test_pgtl.py``. (PGTL is not exported by ``mkt run``,
like the other joint models; ``mkt export --run-dir RUN`` exports it.)
"""

from __future__ import annotations

import copy
from typing import List, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config, PGTLConfig, SchemaConfig, SequenceConfig
from mkt_torchrec.models.baselines.common import (BaselineModel, BaselineServing, EntityTowers, FieldEmbedding,
                                                  select_by_entity)
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import SparseArch, SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Li et al., 'Prior-Guided Transfer Learning for Enhancing Item Representation in E-commerce', "
         "AAAI 2022")


def dann_lambda(step: torch.Tensor, lambda_steps: int) -> torch.Tensor:
    """DANN's reversal weight 2 / (1 + exp(-10 p)) - 1, p = min(1, step / lambda_steps) (a tensor: no host sync)."""
    p = (step.double() / lambda_steps).clamp(max=1.0)
    return (2.0 / (1.0 + torch.exp(-10.0 * p)) - 1.0).float()


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (lam,) = ctx.saved_tensors
        return -lam.to(grad.dtype) * grad, None


def reverse_gradient(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The gradient reversal layer R_lambda (Eq. 5): identity forward, gradient times -lambda backward."""
    return _Reverse.apply(x, lam)


class _Attach(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.aux_shape, ctx.aux_dtype = aux.shape, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, torch.ones(ctx.aux_shape, dtype=ctx.aux_dtype, device=grad.device)


def attach_loss(out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """``out`` unchanged, with the scalar ``aux`` joined to its graph: whatever loss is built on ``out``, its
    backward also back-propagates ``aux`` as if ``loss + aux`` were minimised."""
    return _Attach.apply(out, aux)


class DomainAttention(nn.Module):
    """One domain's attention network over field embeddings: m = a * e, a = 2 sigmoid(MLP(e)) per field.

    Args:
        dim: the fields' embedding width D.
        hidden: the MLP's hidden sizes (the paper: [6, 4]).

    Example:
        >>> DomainAttention(8, [6, 4])(torch.randn(3, 5, 8)).shape
        torch.Size([3, 5, 8])
    """

    def __init__(self, dim: int, hidden: List[int]) -> None:
        super().__init__()
        self.net = mlp(dim, list(hidden) + [dim], linear_last=True)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """e (B, F, D) -> m (B, F, D); a zero (null) field stays zero."""
        return 2.0 * torch.sigmoid(self.net(e)) * e


class PGTLArch(nn.Module):
    """Domain attention -> generators, prior, gate -> each entity's tower; plus the discriminator's loss.

    Args:
        schema: feature schema.
        cfg: ``model.pgtl``.
        related_key: the key of the related source items (a padded (B, K, D) sequence of ``SparseFeatures``).

    Example:
        >>> arch = PGTLArch(cfg.schema, cfg.model.pgtl, "related_items")               # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity).shape                      # (B,)
    """

    def __init__(self, schema: SchemaConfig, cfg: PGTLConfig, related_key: str) -> None:
        super().__init__()
        dims = {t.dim for t in schema.tables.values()}
        if len(dims) != 1:
            raise ValueError(f"model.name=pgtl: one attention network per domain needs one embedding dim for every "
                             f"table of schema.tables, got dims {sorted(dims)}")
        dim = dims.pop()
        self.cfg, self.related_key = cfg, related_key
        item_features = schema.features_of("shared") + [f for e in ENTITY_CODE for f in schema.features_of("specific", e)]
        item_dense = schema.dense_of("shared") + [n for e in ENTITY_CODE for n in schema.dense_of("specific", e)]
        self.context = FieldEmbedding(schema, schema.features_of("user"), schema.dense_of("user"),
                                      list(schema.sequences), dim)
        self.items = FieldEmbedding(schema, item_features, item_dense, [], dim)
        self.attention = nn.ModuleDict({e: DomainAttention(dim, cfg.attention) for e in ENTITY_CODE}) \
            if cfg.ablation != "no_specific_embedding" else None
        d_item = self.items.out_dim
        prior_in = d_item if cfg.ablation == "no_prior" else dim
        self.generators = nn.ModuleDict({"source": mlp(d_item, cfg.generator), "prior": mlp(prior_in, cfg.generator),
                                         "target": mlp(d_item, cfg.generator)})
        width = cfg.generator[-1]
        self.gate = nn.Linear(2 * width, width)
        self.discriminator = mlp(width, list(cfg.generator[:-1]) + [1], linear_last=True)
        self.towers = EntityTowers(self.context.out_dim + width, cfg.tower)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def _perspective(self, fields: torch.Tensor, domain: str) -> torch.Tensor:
        """(B, F, D) -> (B, F * D): domain ``domain``'s embeddings (the shared ones without attention)."""
        out = fields if self.attention is None else self.attention[domain](fields)
        return out.flatten(1)  # (B, F * D)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D), with the related items (B, K, D); dense (B, F_dense); entity (B,)
        -> logits (B,), the discriminator's loss attached in training."""
        ctx = torch.stack(self.context(sparse, dense), dim=1)  # (B, F_ctx, D)
        items = torch.stack(self.items(sparse, dense), dim=1)  # (B, F_item, D)
        context = select_by_entity(entity, {e: self._perspective(ctx, e) for e in ENTITY_CODE})  # (B, F_ctx * D)
        z_s = self.generators["source"](self._perspective(items, "source"))  # (B, H)
        z_t = self.generators["target"](self._perspective(items, "target"))  # (B, H)
        if self.cfg.ablation == "no_prior":  # the target item's own fields stand in for the prior
            prior_in = self._perspective(items, "source")  # (B, F_item * D)
            has_prior = torch.ones_like(entity, dtype=torch.bool)
        else:
            lengths = sparse.lengths[self.related_key]  # (B,)
            mean = sparse.sequences[self.related_key].sum(dim=1) / lengths.clamp(min=1).unsqueeze(-1).to(ctx.dtype)
            prior_in = self._perspective(mean.unsqueeze(1), "source")  # (B, D): x^p through G_a^s
            has_prior = lengths > 0
        z_p = self.generators["prior"](prior_in)  # (B, H)
        gate = torch.sigmoid(self.gate(torch.cat([z_p, z_t], dim=-1)))  # (B, H), Eq. 7
        enriched = z_t + gate * z_p * has_prior.unsqueeze(-1).to(z_p.dtype)  # (B, H), Eq. 8
        logits = self.towers({"source": torch.cat([context, z_s], dim=-1),
                              "target": torch.cat([context, enriched], dim=-1)}, entity)  # (B,)
        if not self.training:
            return logits
        self.step.add_(1)
        return attach_loss(logits, self.adversarial_loss(z_s, z_p, entity, has_prior))

    def adversarial_loss(self, z_s: torch.Tensor, z_p: torch.Tensor, entity: torch.Tensor,
                         has_prior: torch.Tensor) -> torch.Tensor:
        """``adversarial_weight`` x the discriminator's mean cross-entropy over the domain samples (source rows'
        z^s labelled 0, target rows' z^p labelled 1), behind the gradient reversal at this step's lambda."""
        is_target = entity == ENTITY_CODE["target"]
        sample = select_by_entity(entity, {"source": z_s, "target": z_p})  # (B, H)
        lam = dann_lambda(self.step, self.cfg.lambda_steps)
        logit = self.discriminator(reverse_gradient(sample, lam)).squeeze(-1).float()  # (B,)
        weight = (~is_target | has_prior).float()  # (B,): target rows without a prior give no sample
        ce = nn.functional.binary_cross_entropy_with_logits(logit, is_target.float(), reduction="none")
        return self.cfg.adversarial_weight * (ce * weight).sum() / weight.sum().clamp(min=1.0)


def serving_schema(cfg: Config) -> SchemaConfig:
    """The schema of PGTL's sparse inputs: ``cfg.schema`` plus the related items as one more sequence of the item
    feature's table (``max_len`` K), so the lookups and ``serving_keys`` include it. Never a dataset's schema."""
    rc = cfg.data.related_items
    if not rc.key:
        raise ValueError("model.name=pgtl needs data.related_items.key (the config sets it for model.name=pgtl)")
    schema = copy.deepcopy(cfg.schema)
    schema.sequences[rc.key] = SequenceConfig(entity="source", shared_feature=rc.item_feature,
                                              max_len=rc.max_related)
    return schema


def serving_model(cfg: Config, model: BaselineModel) -> BaselineServing:
    """PGTL's serving model: the baselines' serving module over :func:`serving_schema` (the related ids are one
    more input key, (B, K) table rows padded with -1)."""
    return BaselineServing(serving_schema(cfg), model)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    schema = serving_schema(cfg)
    features = list(cfg.schema.features)
    arch = SparseArch(schema, features, list(schema.sequences), device=device,
                      precision=cfg.train.embedding_precision)
    return BaselineModel(arch, PGTLArch(cfg.schema, cfg.model.pgtl, cfg.data.related_items.key))


__all__ = ["PAPER", "DomainAttention", "PGTLArch", "attach_loss", "build_model", "dann_lambda",
           "reverse_gradient", "serving_model", "serving_schema"]
