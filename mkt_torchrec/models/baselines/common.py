"""What the ten baselines share: the registry's types, feature views, field embeddings, the model, loss and
serving wrappers.

Every baseline is a :class:`BaselineModel`: a :class:`~mkt_torchrec.modules.sparse.SparseArch` (TorchRec's
collections, fed the batch's KeyedJaggedTensor itself) followed by a *dense arch*, one module that holds all of
the model's dense logic: ``dense_arch(SparseFeatures, dense (B, F_dense), entity (B,)) -> logits (B,)``, each row
scored as a row of its own entity. Keeping every dense step inside that one module is what lets TorchRec's train
pipeline trace the model (the tracer treats a module without a collection as a leaf and never looks inside it).

Inputs (a *view* of the schema):

- ``target``: user, entity-shared and target-specific features, every behaviour sequence, and the dense
  features of those groups: the TEM's inputs. The single-domain models and CTNet's fine-tuned model use it.
- ``all``: every feature of both entities. On a row, the other entity's specific features are null, so their
  embeddings are zero (a null id looks up nothing; a null dense value reads 0). The joint models, MiNet and
  Finetune use it, so one network serves both entities' rows and both training stages.

The serving counterpart (:class:`BaselineServing`) takes the same padded ids as MKT's serving model (user,
shared and target-specific features, sequences) and feeds zeros for a model's source-specific features, which
are null on every target row: it scores a target row exactly as training does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.models.base_rate import last_linear
from mkt_torchrec.models.mkt import ENTITY_CODE
from mkt_torchrec.models.serving import ServingModel, serving_keys
from mkt_torchrec.models.losses import StepOutput, _bce, precision_context
from mkt_torchrec.modules.layers import mlp
from mkt_torchrec.modules.sparse import PaddedLookup, SequenceInputs, SparseArch, SparseFeatures
from mkt_torchrec.registry import StageSpec

VIEWS = ("target", "all")
DENSE_DIM_DEFAULT = 8  # width of a dense feature's vector when the tables have several dims (GroupArch's default)


# --------------------------------------------------------------------------------------------------------
# The registry's types
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A baseline as its package describes it: its registry entry's name, family and stages
    (:mod:`mkt_torchrec.registry`), and the paper its module reproduces (the module's ``PAPER``)."""

    name: str
    family: str  # "single_domain" | "joint" | "pretrain_finetune"
    stages: Dict[str, StageSpec] = field(default_factory=dict)
    paper: str = ""


# --------------------------------------------------------------------------------------------------------
# Feature views and field embeddings
# --------------------------------------------------------------------------------------------------------


def view_features(schema: SchemaConfig, view: str) -> List[str]:
    """Sparse single-valued features of a view (``target`` or ``all``), in schema order."""
    if view == "all":
        return list(schema.features)
    if view == "target":
        return [f for f in schema.features
                if schema.features[f].group != "specific" or schema.features[f].entity == "target"]
    raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


def view_dense(schema: SchemaConfig, view: str) -> List[str]:
    """Dense features of a view, in schema order."""
    if view == "all":
        return list(schema.dense)
    if view == "target":
        return [n for n, d in schema.dense.items() if d.group != "specific" or d.entity == "target"]
    raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


def common_dim(schema: SchemaConfig) -> int:
    """The embedding dim every table has, or the default dense-vector width when they differ."""
    dims = {t.dim for t in schema.tables.values()}
    return dims.pop() if len(dims) == 1 else DENSE_DIM_DEFAULT


def make_model(cfg: Config, view: str, device: Optional[torch.device], dense_arch: nn.Module) -> "BaselineModel":
    """A :class:`BaselineModel` of the view's tables (its features and every behaviour sequence) and
    ``dense_arch``."""
    sparse_arch = SparseArch(cfg.schema, view_features(cfg.schema, view), list(cfg.schema.sequences),
                             device=device, precision=cfg.train.embedding_precision)
    return BaselineModel(sparse_arch, dense_arch)


def view_fields(schema: SchemaConfig, view: str, mean_sequences: bool = True) -> "FieldEmbedding":
    """The view's fields: its sparse and dense features and (``mean_sequences``) every sequence, mean-pooled."""
    return FieldEmbedding(schema, view_features(schema, view), view_dense(schema, view),
                          list(schema.sequences) if mean_sequences else [], common_dim(schema))


class FieldEmbedding(nn.Module):
    """SparseFeatures + dense features -> one vector per field: each sparse feature's embedding, ``x * w`` for each
    dense feature x (one learned D-wide vector w per dense feature, as in MKT's GroupArch), and, for each sequence
    in ``mean_sequences``, the mean of its valid elements' embeddings (zero for an empty sequence).

    Args:
        schema: the feature schema.
        features: sparse features, in field order.
        dense: dense features, in field order (after the sparse ones).
        mean_sequences: sequences to mean-pool (fields after the dense ones).
        dense_dim: width of a dense feature's vector.

    Example:
        >>> emb = FieldEmbedding(schema, ["user_id", "item_id"], [], ["hist_target_items"], 8)  # doctest: +SKIP
        >>> [f.shape for f in emb(sparse, dense)]                # [(B, 8), (B, 8), (B, 8)]  # doctest: +SKIP
    """

    def __init__(self, schema: SchemaConfig, features: Sequence[str], dense: Sequence[str],
                 mean_sequences: Sequence[str], dense_dim: int) -> None:
        super().__init__()
        self.features = list(features)
        self.dense = list(dense)
        self.mean_sequences = list(mean_sequences)
        self.sequence_inputs = SequenceInputs(schema, self.mean_sequences, self.features)  # steps + side features
        self.dense_column = {n: i for i, n in enumerate(schema.dense)}  # column in the batch's dense features
        self.dense_weight = nn.Parameter(torch.randn(len(self.dense), dense_dim) * 0.1) if self.dense else None
        self.dims = ([schema.tables[schema.table_of(f)].dim for f in self.features] + [dense_dim] * len(self.dense)
                     + [schema.tables[schema.table_of(s)].dim for s in self.mean_sequences])
        self.out_dim = sum(self.dims)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor) -> List[torch.Tensor]:
        """sparse: pooled (B, D) / padded (B, L, D); dense (B, F_dense) -> a list of (B, d_f), one per field."""
        fields = [sparse.pooled[f] for f in self.features]
        for row, name in enumerate(self.dense):
            column = self.dense_column[name]
            fields.append(dense[:, column: column + 1] * self.dense_weight[row])  # (B, D)
        for s in self.mean_sequences:
            count = sparse.lengths[s].clamp(min=1).unsqueeze(-1).to(sparse.sequences[s].dtype)  # (B, 1)
            fields.append(self.sequence_inputs.steps(sparse, s).sum(dim=1) / count)  # (B, D): padding is zero
        return fields


def select_by_entity(entity: torch.Tensor, per_entity: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's value from its own entity's tensor (all (B, ...)), by ``torch.where``: no host sync, and each
    entity's path gets a gradient (zero where it has no row) so DDP finds every parameter used."""
    out = per_entity["source"]
    mine = entity == ENTITY_CODE["target"]  # (B,)
    while mine.dim() < out.dim():
        mine = mine.unsqueeze(-1)
    return torch.where(mine, per_entity["target"], out)


class EntityTowers(nn.Module):
    """One MLP tower per entity; ``forward`` runs both on their inputs and keeps each row's own entity's logit.

    Args:
        in_dim: input width of each tower.
        layers: tower sizes, the last 1.

    Example:
        >>> towers = EntityTowers(4, [3, 1])
        >>> towers({"source": torch.zeros(2, 4), "target": torch.ones(2, 4)}, torch.tensor([0, 1])).shape
        torch.Size([2])
    """

    def __init__(self, in_dim: int, layers: List[int]) -> None:
        super().__init__()
        self.towers = nn.ModuleDict({e: mlp(in_dim, layers, linear_last=True) for e in ENTITY_CODE})

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """The bias added to each entity's logit (``mkt_torchrec.models.base_rate``)."""
        return {e: last_linear(self.towers[e]).bias for e in ENTITY_CODE}

    def forward(self, inputs: Dict[str, torch.Tensor], entity: torch.Tensor) -> torch.Tensor:
        """inputs: entity -> (B, in_dim); entity (B,) -> (B,) logits."""
        return select_by_entity(entity, {e: self.towers[e](inputs[e]).squeeze(-1) for e in ENTITY_CODE})


class Dice(nn.Module):
    """DIN's data-adaptive activation (Zhou et al., KDD 2018): ``p(s) * s + (1 - p(s)) * alpha * s`` with
    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``: batch statistics in training, their moving averages in
    evaluation (TorchRec's DDP does not broadcast buffers, so each rank keeps its own; a checkpoint holds one rank's).

    Args:
        dim: features per row.
        momentum: weight of a batch in the moving averages (DIN's code: 0.01).
        eps: the paper's epsilon.

    Example:
        >>> Dice(4)(torch.randn(8, 4)).shape
        torch.Size([8, 4])
    """

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-8) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H) -> (B, H)."""
        if self.training:
            xf = x.float()  # statistics in fp32, also under bf16 autocast
            mean, var = xf.mean(dim=0), xf.var(dim=0, unbiased=False)  # (H,); a batch of one row: var 0, p = 1/2
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) / torch.sqrt(var + self.eps))
        return p * x + (1.0 - p) * self.alpha * x


class DiceMLP(nn.Module):
    """Linear layers with :class:`Dice` after each but the last (DIN's DNN).

    Args:
        in_dim: input width.
        layers: sizes; the last one is linear (the logit).

    Example:
        >>> DiceMLP(6, [4, 1])(torch.randn(3, 6)).shape
        torch.Size([3, 1])
    """

    def __init__(self, in_dim: int, layers: List[int]) -> None:
        super().__init__()
        mods: List[nn.Module] = []
        for i, width in enumerate(layers):
            mods.append(nn.Linear(in_dim if i == 0 else layers[i - 1], width))
            if i < len(layers) - 1:
                mods.append(Dice(width))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_dim) -> (B, layers[-1])."""
        return self.net(x)


# --------------------------------------------------------------------------------------------------------
# Model, loss, serving
# --------------------------------------------------------------------------------------------------------


class BaselineModel(nn.Module):
    """A baseline: ``sparse_arch`` (all its tables) then ``dense_arch`` (all its dense logic).

    Args:
        sparse_arch: the model's TorchRec collections.
        dense_arch: ``(SparseFeatures, dense (B, F_dense), entity (B,)) -> logits (B,)``.

    Example:
        >>> model = build_model(cfg, "tem", None)                                      # doctest: +SKIP
        >>> model(batch.sparse_features, batch.dense_features, batch.entity).shape     # (B,)
    """

    def __init__(self, sparse_arch: SparseArch, dense_arch: nn.Module) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.dense_arch = dense_arch

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor, entity: torch.Tensor) -> torch.Tensor:
        """kjt: jagged sparse features; dense (B, F_dense); entity (B,) 0 = source, 1 = target -> logits (B,)."""
        return self.dense_arch(self.sparse_arch(kjt), dense, entity)


class BaselineTrain(nn.Module):
    """Binary cross-entropy of a baseline's logits (weighted by ``batch.weights`` in distributed training), with
    the train-pipeline contract ``forward(batch) -> (loss, StepOutput)`` of MKT's ``TEMTrain``.

    Args:
        model: the baseline.

    Attributes:
        trainable_sparse_arch: path of the tables that train, the same in every stage (MKT's stage 2 keeps them at
            ``model.tem.sparse_arch``; ``mkt_torchrec.planning.plan`` fuses the embedding optimizer into them).
    """

    trainable_sparse_arch = "model.sparse_arch"

    def __init__(self, model: BaselineModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, StepOutput]:
        with precision_context(self):
            logits = self.model(batch.sparse_features, batch.dense_features, batch.entity).float()
        loss = _bce(logits, batch.labels, batch.weights)  # fp32
        zero = loss.new_zeros(())
        return loss, StepOutput(loss.detach(), logits.detach(), batch.labels, batch.entity, loss.detach(), zero)


class BaselineServing(ServingModel):
    """A trained baseline for serving: plain-PyTorch lookups of its (detached, not copied) tables, a copy of its
    dense arch, every row scored as a target row; the same input and output as MKT's :class:`ServingModel`.

    It is a ServingModel by contract (``forward(ids, dense)`` -> click probability, ``source_keys``), not by
    construction: MKT's constructor does not apply, so it initialises as a plain module.

    Args:
        schema: feature schema.
        model: the trained baseline (its final stage's ``model``); tables on ``meta`` give ``meta`` buffers for the
            caller to materialise and load (``mkt_torchrec.training.export``).

    Attributes:
        source_keys: this model's ``state_dict()`` key -> the key of the same tensor in ``model.state_dict()``.

    Example:
        >>> serving = BaselineServing(cfg.schema, train_module.model).eval()                    # doctest: +SKIP
        >>> serving(padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema)),
        ...         batch.dense_features)                                                 # (B,) probabilities
    """

    def __init__(self, schema: SchemaConfig, model: BaselineModel) -> None:
        nn.Module.__init__(self)  # not ServingModel.__init__, which builds MKT's parts
        arch = model.sparse_arch
        served = set(serving_keys(schema))
        features = [f for f in arch.features if f in served]
        # a model's features that are not served are the source entity's: null, hence zero, on every target row
        self.zero_fields = {f: arch.dims[f] for f in arch.features if f not in served}
        tables = {schema.table_of(k) for k in features + arch.sequences + arch.side_keys}
        weights = {t: w for t, w in arch.table_weights().items() if t in tables}
        self.lookup = PaddedLookup(schema, features, list(arch.sequences), weights)  # the trained tables
        name_of = {id(p): n for n, p in arch.named_parameters()}
        self.source_keys: Dict[str, str] = {f"lookup.table__{t}": "sparse_arch." + name_of[id(w)]
                                            for t, w in weights.items()}
        self.dense_arch = copy.deepcopy(model.dense_arch)
        self.source_keys.update({f"dense_arch.{k}": f"dense_arch.{k}" for k in self.dense_arch.state_dict()})
        self.requires_grad_(False)
        unmatched = set(self.state_dict()) ^ set(self.source_keys)
        assert not unmatched, f"serving state without a source key (or the reverse): {sorted(unmatched)}"

    def forward(self, ids: Dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """ids: key -> (B,) or (B, L) int64 table rows, -1 for null / padding; dense (B, F_dense) -> (B,)."""
        sparse = self.lookup(ids)
        rows = dense.shape[0]
        pooled = dict(sparse.pooled)
        for name, dim in self.zero_fields.items():
            pooled[name] = dense.new_zeros(rows, dim)  # (B, D)
        entity = torch.full((rows,), ENTITY_CODE["target"], dtype=torch.int64, device=dense.device)
        logits = self.dense_arch(SparseFeatures(pooled, sparse.sequences, sparse.lengths), dense, entity)
        return torch.sigmoid(logits)
