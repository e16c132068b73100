"""KEEP: knowledge extraction (a DIN pre-trained on both entities) and plugging (h_m' = h_m + MLP(K)) into the target
model, the extractor frozen.

Paper: Yujing Zhang, Zhangming Chan, Shuhao Xu, Weijie Bian, Shuguang Han, Hongbo Deng and Bo Zheng, "KEEP: An
Industrial Pre-Training Framework for Online Recommendation via Knowledge Extraction and Plugging", CIKM 2022
(arXiv 2208.10174), Section 4.

The paper's two stages on our pipeline:

- Knowledge extraction (stage ``mem``, both entities' rows: the "super-domain"): a DIN (4.2.1) pre-trained by
  click prediction (Eq. 1). :class:`KeepExtractor` is our DIN (``din.py``) on every feature of both entities, the
  same network as Finetune's base model.
- Knowledge plugging (stage ``tem``, target rows: the "sub-domain"): the downstream model is our ``din`` baseline's
  target model, unchanged, with the plug-in network of 4.3 (Eq. 5): h^k = MLP(K(u, i)), h_m' = h_m + h^k, where h_m
  is the output of the downstream DNN's m-th layer. :class:`KeepTarget` holds the pre-trained extractor, loaded
  whole from the ``mem`` run's checkpoint and frozen, through the machinery that holds MKT's frozen MEM (its
  registry entry's stage ``tem`` says ``frozen_mem``): the extractor sits at the train module's ``model.mem``, its
  tables get a fused SGD at learning rate 0 and are in no optimizer (``planning.embedding_optimizer``), its dense
  parameters are in no optimizer and not in DDP (``training.assembly``), stage-2 checkpoints record the ``mem``
  checkpoint by digest instead of holding a copy (``training.mem_transfer``).

The knowledge vectors come from one place, :meth:`KeepExtractor.knowledge` (a batch's KJT and dense features ->
:class:`Knowledge`), which is :meth:`ExtractorArch.knowledge_from` on the extractor's own lookups; the serving model
runs the same ``knowledge_from`` on its plain-PyTorch lookups of the same tables (a knowledge cache, the paper's
GKC of 5.3, can be built from either).

Our reading (what the paper leaves open, or what our data cannot reproduce):
    - Extractor: our DIN (activation-unit interests, Dice DNN ``model.baselines.dnn``) on every feature of both
      entities (the other entity's specific features are null on a row), one logit for both entities, trained on
      both entities' train rows (the super-domain is a superset of the sub-domain, and KEEP-C co-trains on the
      same data). Not reproduced: the three pre-training tasks (click, conversion, add-to-cart; our rows have one
      label) and the pairwise loss of Eq. 2-3, which the paper adds for the sparse conversion / add-to-cart labels;
      the paper's user id feature is in our extractor as in every model here.
    - Knowledge K(u, i) (Eq. 4 with one task) = [K_u, K_i, K_ui]: K_u the extractor's embedding of the user id
      (``schema.user_id_feature``, 4.2.3: "the embedding of user id"); K_i its embeddings of the entity-shared
      features (``item_id``, ``category``: the item features every entity's item has, as the paper's item id,
      shop id and category id); K_ui the output of the extractor DNN's last hidden layer (after its Dice), the
      layer before the logit (4.2.3; 16 wide for [128, 64, 16, 1]).
    - Plugging layer: h_m is the output (after Dice) of the downstream DNN's second hidden layer (``PLUG_LAYER`` =
      1: 64 wide for [128, 64, 16, 1]), the depth at which MKT's TEM adds its cross knowledge
      (``model.tem.cross_layer``'s default); the first hidden layer when the DNN has only one.
    - MLP(K): the paper's "shallow MLP for dimension projection": one ReLU hidden layer as wide as h_m, then a
      linear layer to h_m's width. Its last layer starts at zero, so the plugged model starts as the plain
      downstream model (the paper's point of adding rather than concatenating: a trained downstream model keeps
      computing what it did until the plug learns).
    - Frozen extractor and stop-gradient: K is computed under ``torch.no_grad`` with the extractor in eval mode
      (Dice uses its moving averages); nothing of the extractor changes in stage ``tem`` (the brief's reading of
      "the extracted knowledge as auxiliary input ... rather than parameter initialization"; the paper's 6.2 says
      the knowledge "is then fine-tuned" on the sub-domain, which we read as the plug-in network's training).
    - Separate tables: the downstream model has its own tables (the ``din`` baseline's: user, entity-shared and
      target-specific features, the sequences), initialised as the ``din`` baseline's and trained; the extractor's
      tables are a second, frozen copy that only the knowledge reads. Stage ``tem`` therefore holds two copies of
      the user, entity-shared and target-specific tables (the paper serves K from a cache instead, 5.2-5.3).
    - Learning rates: stage ``tem`` holds a frozen stage-1 model as MKT's TEM does, so it trains its dense layers at
      ``train.finetune_dense_lr`` (when set), as MKT's TEM does.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mkt_torchrec.baseline_config import KNOWLEDGE
from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import (BaselineModel, BaselineServing, make_model)
from mkt_torchrec.models.baselines.din import DINArch
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import SparseArch, SparseFeatures

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Zhang et al., 'KEEP: An Industrial Pre-Training Framework for Online Recommendation via Knowledge "
         "Extraction and Plugging', CIKM 2022 (arXiv 2208.10174)")

PLUG_LAYER = 1  # index in model.baselines.dnn of the hidden layer h_m the knowledge is added to (see the docstring)


class Knowledge(NamedTuple):
    """KEEP's extracted knowledge of a batch (4.2.3), every row as the extractor sees it.

    Widths, with the quickstart schema and ``model.baselines.dnn`` [128, 64, 16, 1]: D_u = 8, D_i = 16, H = 16.
    """

    user: torch.Tensor  # (B, D_u) K_u: the extractor's user-id embedding
    item: torch.Tensor  # (B, D_i) K_i: its entity-shared feature embeddings, concatenated in schema order
    interaction: torch.Tensor  # (B, H) K_ui: its DNN's last hidden layer (after Dice), before the logit

    def vector(self, parts: Sequence[str] = KNOWLEDGE) -> torch.Tensor:
        """K(u, i) = [K_u, K_i, K_ui] (Eq. 4), (B, D_u + D_i + H), in the widest dtype of the three; ``parts``: the
        vectors plugged (``model.keep.knowledge``; one at a time is the ablation), in this order."""
        return torch.cat([getattr(self, p) for p in KNOWLEDGE if p in parts], dim=-1)


def din_input(arch: DINArch, sparse: SparseFeatures, dense: torch.Tensor) -> torch.Tensor:
    """The input of a :class:`DINArch`'s DNN, exactly as ``DINArch.forward`` builds it: its fields, then one
    activation-unit interest per sequence. -> (B, d_in)."""
    si = arch.sequence_inputs
    interests = [arch.attention[s](si.query(sparse.pooled, s), si.steps(sparse, s), sparse.lengths[s])
                 for s in arch.sequences]  # each (B, D)
    return torch.cat(arch.fields(sparse, dense) + interests, dim=-1)  # (B, d_in)


def _run_layers(arch: DINArch, x: torch.Tensor, start: int, stop: Optional[int] = None) -> torch.Tensor:
    """``arch.dnn.net[start:stop]`` applied to x (its modules, in place; no Sequential is built)."""
    for layer in list(arch.dnn.net)[start:stop]:
        x = layer(x)
    return x


def _after_hidden(layer: int) -> int:
    """Index in ``DiceMLP.net`` (Linear, Dice, Linear, Dice, ..., Linear) just after hidden layer ``layer``'s Dice."""
    return 2 * layer + 2


class ExtractorArch(DINArch):
    """The knowledge extractor's dense arch: our DIN (its forward, hence its training, unchanged), plus
    :meth:`knowledge_from`.

    Args:
        schema: feature schema.
        dnn: DNN sizes, the last 1 (at least one hidden layer: K_ui is the last one's output).
        attention_hidden: hidden sizes of each activation unit.

    Example:
        >>> arch = ExtractorArch(cfg.schema, [128, 64, 16, 1], [80, 40])     # doctest: +SKIP
        >>> arch.knowledge_from(sparse, batch.dense_features).vector().shape   # (B, 40)
    """

    def __init__(self, schema: SchemaConfig, dnn: List[int], attention_hidden: List[int]) -> None:
        if len(dnn) < 2:
            raise ValueError(f"model.baselines.dnn={dnn}: KEEP's extractor needs a hidden layer before the logit "
                             "(its output is the user-item knowledge K_ui)")
        super().__init__(schema, "all", dnn, attention_hidden)
        self.user_feature = schema.user_id_feature
        self.item_features = schema.features_of("shared")
        self.widths = Knowledge(user=schema.tables[schema.table_of(self.user_feature)].dim,  # type: ignore[arg-type]
                                item=sum(schema.tables[schema.table_of(f)].dim for f in self.item_features),
                                interaction=dnn[-2])

    def knowledge_dim(self, parts: Sequence[str] = KNOWLEDGE) -> int:
        """Width of K(u, i) (D_u + D_i + H), of ``parts`` of it."""
        return int(sum(getattr(self.widths, p) for p in KNOWLEDGE if p in parts))

    def knowledge_from(self, sparse: SparseFeatures, dense: torch.Tensor) -> Knowledge:
        """The knowledge vectors of every row. sparse: the extractor's lookups (pooled (B, D), padded (B, L, D));
        dense (B, F_dense) -> :class:`Knowledge` of (B, D_u), (B, D_i), (B, H)."""
        hidden = _run_layers(self, din_input(self, sparse, dense), 0, -1)  # (B, H): all but the logit layer
        item = torch.cat([sparse.pooled[f] for f in self.item_features], dim=-1)  # (B, D_i)
        return Knowledge(user=sparse.pooled[self.user_feature], item=item, interaction=hidden)


class PluggedDIN(DINArch):
    """The downstream model: the ``din`` baseline's target model, with K(u, i) plugged in at a hidden layer.

    h_m' = h_m + MLP(K) (Eq. 5), h_m the output of hidden layer ``plug_layer`` of the Dice DNN; every other tensor is
    the ``din`` baseline's, under the same names (``plug.*`` is the only addition).

    Args:
        schema: feature schema.
        dnn: DNN sizes, the last 1 (at least one hidden layer).
        attention_hidden: hidden sizes of each activation unit.
        knowledge_dim: width of K(u, i).
        plug_layer: index in ``dnn`` of h_m (clipped to the last hidden layer).

    Example:
        >>> arch = PluggedDIN(cfg.schema, [128, 64, 16, 1], [80, 40], knowledge_dim=40)   # doctest: +SKIP
        >>> arch(sparse, batch.dense_features, batch.entity, knowledge.vector()).shape       # (B,)
    """

    def __init__(self, schema: SchemaConfig, dnn: List[int], attention_hidden: List[int], knowledge_dim: int,
                 plug_layer: int = PLUG_LAYER) -> None:
        if len(dnn) < 2:
            raise ValueError(f"model.baselines.dnn={dnn}: KEEP plugs its knowledge into a hidden layer; the DNN "
                             "has none")
        super().__init__(schema, "target", dnn, attention_hidden)
        self.plug_layer = min(plug_layer, len(dnn) - 2)
        width = dnn[self.plug_layer]
        self.plug = mlp(knowledge_dim, [width, width], linear_last=True)  # h^k = MLP(K)
        last = self.plug[-1]
        nn.init.zeros_(last.weight)  # the plugged model starts as the plain downstream model
        nn.init.zeros_(last.bias)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor,  # type: ignore[override]
                knowledge: torch.Tensor) -> torch.Tensor:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense); entity (B,) unused; knowledge (B, d_K)
        -> logits (B,)."""
        cut = _after_hidden(self.plug_layer)
        h = _run_layers(self, din_input(self, sparse, dense), 0, cut)  # (B, dnn[plug_layer]) h_m
        h = h + self.plug(knowledge.to(h.dtype))  # h_m' = h_m + MLP(K) (Eq. 5)
        return _run_layers(self, h, cut).squeeze(-1)  # (B,)


class KeepExtractor(BaselineModel):
    """The knowledge extraction model (stage ``mem``; frozen in stage ``tem``): the extractor's tables
    (``sparse_arch``, every feature) and its :class:`ExtractorArch`. Its forward is DIN's.

    Example:
        >>> extractor = build_model(cfg, "mem", None)                                 # doctest: +SKIP
        >>> extractor.knowledge(batch.sparse_features, batch.dense_features).vector()  # (B, d_K)
    """

    dense_arch: ExtractorArch

    def knowledge(self, kjt: KeyedJaggedTensor, dense: torch.Tensor) -> Knowledge:
        """THE knowledge function: a batch -> its knowledge vectors (what a knowledge cache stores).

        Args:
            kjt: the batch's jagged sparse features (``Batch.sparse_features``).
            dense: (B, F_dense) dense features.

        Returns:
            :class:`Knowledge`: user (B, D_u), item (B, D_i), interaction (B, H); ``.vector()`` is K(u, i),
            (B, D_u + D_i + H). Gradients flow as the caller allows (:class:`KeepTarget` calls it under no_grad).
        """
        return self.dense_arch.knowledge_from(self.sparse_arch(kjt), dense)


def _served_sparse(part: BaselineServing, ids: Dict[str, torch.Tensor], dense: torch.Tensor) -> SparseFeatures:
    """A served model part's SparseFeatures from padded ids, as :class:`BaselineServing` feeds its dense arch (the
    part's unserved, source-specific features are zero: null on every target row)."""
    sparse = part.lookup(ids)
    pooled = dict(sparse.pooled)
    for name, dim in part.zero_fields.items():
        pooled[name] = dense.new_zeros(dense.shape[0], dim)  # (B, D)
    return SparseFeatures(pooled, sparse.sequences, sparse.lengths)


class KeepServing(BaselineServing):
    """KEEP for serving: the downstream model (a :class:`BaselineServing` of it) and the extractor's knowledge path
    (``extractor``: a BaselineServing of the extractor, whose lookups and dense arch :meth:`ExtractorArch.
    knowledge_from` runs on), both on the serving input contract of MKT's ServingModel.

    Args:
        schema: feature schema.
        model: the trained :class:`KeepTarget`; ``meta`` tables give ``meta`` buffers to materialise and load.

    Attributes:
        source_keys: this model's ``state_dict()`` key -> the key of the same tensor in ``model.state_dict()``
            (the extractor's under ``mem.``, which a stage-2 checkpoint reads from the ``mem`` run's checkpoint).
    """

    def __init__(self, schema: SchemaConfig, model: KeepTarget) -> None:
        super().__init__(schema, model)
        self.parts = model.parts
        self.extractor = BaselineServing(schema, model.mem)
        self.source_keys.update({f"extractor.{k}": f"mem.{v}" for k, v in self.extractor.source_keys.items()})
        self.requires_grad_(False)
        unmatched = set(self.state_dict()) ^ set(self.source_keys)
        assert not unmatched, f"serving state without a source key (or the reverse): {sorted(unmatched)}"

    def forward(self, ids: Dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """ids: key -> (B,) or (B, L) int64 table rows, -1 for null / padding; dense (B, F_dense) -> (B,)."""
        extractor: ExtractorArch = self.extractor.dense_arch  # type: ignore[assignment]
        knowledge = extractor.knowledge_from(_served_sparse(self.extractor, ids, dense), dense).vector(self.parts)
        entity = torch.full((dense.shape[0],), ENTITY_CODE["target"], dtype=torch.int64, device=dense.device)
        return torch.sigmoid(self.dense_arch(_served_sparse(self, ids, dense), dense, entity, knowledge))


class KeepTarget(BaselineModel):
    """The plugging stage's model: the downstream model (``sparse_arch``, ``dense_arch``: a :class:`PluggedDIN`)
    and the frozen extractor ``mem``.

    The extractor never trains here: its parameters have ``requires_grad=False``, it stays in eval mode whatever
    ``train()`` is called with, and its knowledge is computed under ``torch.no_grad()`` (as MKT's frozen MEM).

    Args:
        sparse_arch: the downstream model's tables.
        dense_arch: the downstream model.
        extractor: the pre-trained extractor (loaded by the trainer from the ``mem`` run's checkpoint).

    Example:
        >>> model = build_model(cfg, "tem", None)                                      # doctest: +SKIP
        >>> model(batch.sparse_features, batch.dense_features, batch.entity).shape     # (B,)
    """

    dense_arch: PluggedDIN
    serving_class = KeepServing  # what mkt_torchrec.models.baselines.serving_model builds

    def __init__(self, sparse_arch: SparseArch, dense_arch: PluggedDIN, extractor: KeepExtractor,
                 parts: Sequence[str] = KNOWLEDGE) -> None:
        super().__init__(sparse_arch, dense_arch)
        self.parts = tuple(parts)  # the knowledge vectors plugged (``model.keep.knowledge``)
        self.mem = extractor  # the path the trainer freezes (planning.embedding_optimizer.FROZEN_MODULE)
        extractor.requires_grad_(False)
        extractor.eval()

    def train(self, mode: bool = True) -> "KeepTarget":
        super().train(mode)
        self.mem.eval()
        return self

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """The downstream model's logit bias (the extractor's is the ``mem`` run's)."""
        return self.dense_arch.output_biases()

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """kjt: jagged sparse features of target rows; dense (B, F_dense); entity (B,) -> logits (B,)."""
        with torch.no_grad():
            knowledge = self.mem.knowledge(kjt, dense).vector(self.parts)  # (B, d_K), no gradient
        return self.dense_arch(self.sparse_arch(kjt), dense, entity, knowledge)



def extractor_model(cfg: Config, device: Optional[torch.device]) -> KeepExtractor:
    """The knowledge extractor: DIN on every feature of both entities."""
    b = cfg.model.baselines
    base = make_model(cfg, "all", device, ExtractorArch(cfg.schema, b.dnn, b.attention_mlp))
    return KeepExtractor(base.sparse_arch, base.dense_arch)


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    """Stage ``mem``: the extractor. Stage ``tem``: the plugged downstream model beside the (frozen) extractor."""
    extractor = extractor_model(cfg, device)
    if stage == "mem":
        return extractor
    b = cfg.model.baselines
    parts = cfg.model.keep.knowledge
    arch = PluggedDIN(cfg.schema, b.dnn, b.attention_mlp, extractor.dense_arch.knowledge_dim(parts))
    downstream = make_model(cfg, "target", device, arch)
    return KeepTarget(downstream.sparse_arch, arch, extractor, parts)
