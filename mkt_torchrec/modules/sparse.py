"""The sparse phase (KeyedJaggedTensor -> embeddings) and the feature groups built from it.

:class:`SparseArch` holds the TorchRec embedding modules. Tables that a behaviour sequence uses live in an
``EmbeddingCollection`` (unpooled, so attention sees every element), together with the candidate's
entity-shared feature on the same table: the candidate and the sequence share one table. All other tables
live in an ``EmbeddingBagCollection``. Its output, :class:`SparseFeatures`, is plain tensors: pooled
(B, D) per feature and padded (B, L, D) per sequence. Everything after it is the dense phase.

:class:`PaddedLookup` produces the same :class:`SparseFeatures` from padded id tensors with plain PyTorch,
for the serving export. :class:`GroupArch` turns :class:`SparseFeatures` and dense features into MKT's
feature-group vectors (Eq. 1-2): v_u, v_seq (target attention), v_shared and v_spec per entity.
"""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torchrec import DataType, EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from mkt_torchrec.config import SchemaConfig, SequenceEncoderConfig
from mkt_torchrec.modules.sequence import make_attention


class SparseFeatures(NamedTuple):
    pooled: Dict[str, torch.Tensor]  # feature -> (B, D); zeros where the feature is null
    # sequence or side column (a sequence's side feature, ``schema.side_keys``) -> (B, L, D), zero-padded after
    # its length (a side column has its sequence's length)
    sequences: Dict[str, torch.Tensor]
    lengths: Dict[str, torch.Tensor]  # sequence or side column -> (B,) int64


class SparseArch(nn.Module):
    """Embedding lookups of one model (MEM or TEM) for the given features and sequences.

    Args:
        schema: the feature schema.
        features: single-valued features to embed (pooled).
        sequences: behaviour sequences to embed (unpooled, padded to ``max_len``), with their side columns
            (``side_features``; each in its feature's table, which then lives in the EmbeddingCollection too).
        device: where to build the tables (``meta`` to plan or shard without allocating).
        precision: ``fp32`` or ``fp16`` table storage (TorchRec's ``data_type``; lookups return it, the dense
            phase casts to its own dtype).

    Example:
        >>> arch = SparseArch(cfg.schema, list(cfg.schema.features), list(cfg.schema.sequences))  # doctest: +SKIP
        >>> out = arch(batch.sparse_features); out.pooled["item_id"].shape   # (B, D)    # doctest: +SKIP
    """

    def __init__(self, schema: SchemaConfig, features: Sequence[str], sequences: Sequence[str],
                 device: Optional[torch.device] = None, precision: str = "fp32") -> None:
        super().__init__()
        data_type = {"fp32": DataType.FP32, "fp16": DataType.FP16}[precision]
        self.features = list(features)
        self.sequences = list(sequences)
        self.side_keys = schema.side_keys_of(self.sequences)  # side columns, embedded like their sequence
        self.max_len = {k: schema.max_len_of(k) for k in self.sequences + self.side_keys}
        seq_tables = {schema.table_of(k) for k in self.max_len}
        bag_tables: dict[str, list[str]] = {}
        seq_table_features: dict[str, list[str]] = {}
        for f in self.features:
            t = schema.table_of(f)
            (seq_table_features if t in seq_tables else bag_tables).setdefault(t, []).append(f)
        for k in self.sequences + self.side_keys:
            seq_table_features.setdefault(schema.table_of(k), []).append(k)
        dims = {schema.tables[t].dim for t in seq_table_features}
        if len(dims) > 1:
            raise ValueError(f"schema.tables: tables used by sequences ({sorted(seq_table_features)}) must share one "
                             f"dim (TorchRec's EmbeddingCollection requires it), got dims {sorted(dims)}")
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=t, num_embeddings=schema.tables[t].rows,
                                       embedding_dim=schema.tables[t].dim, feature_names=fs, data_type=data_type)
                    for t, fs in bag_tables.items()], device=device) if bag_tables else None
        self.ec = EmbeddingCollection(
            tables=[EmbeddingConfig(name=t, num_embeddings=schema.tables[t].rows,
                                    embedding_dim=schema.tables[t].dim, feature_names=fs, data_type=data_type)
                    for t, fs in seq_table_features.items()], device=device) if seq_table_features else None
        self.bag_keys = [f for fs in bag_tables.values() for f in fs]
        self.seq_keys = [f for fs in seq_table_features.values() for f in fs]
        self.dims = {f: schema.tables[schema.table_of(f)].dim for f in self.features}
        self.unpack = _Unpack(self.max_len)

    def forward(self, kjt: KeyedJaggedTensor) -> SparseFeatures:
        """kjt: jagged, keys include this arch's features and sequences (other keys are ignored) -> SparseFeatures.

        Written for TorchRec's train pipelines, which FX-trace this forward to find each sharded module's input:
        the collections take the batch's KJT itself (they select their own keys), so their input distribution
        can start a batch ahead, and everything that iterates over their outputs lives in :class:`_Unpack`,
        a leaf module the tracer does not enter.
        """
        with record_function("mkt.sparse_forward"):  # a phase of its own in profiles (tools/bench_train.py)
            pooled = self.ebc(kjt) if self.ebc is not None else None  # KeyedTensor
            unpooled = self.ec(kjt) if self.ec is not None else None  # feature -> JaggedTensor
            return self.unpack(pooled, unpooled)

    def table_weights(self) -> Dict[str, torch.Tensor]:
        """Unsharded table name -> (rows, D) weight (for the serving export)."""
        out: Dict[str, torch.Tensor] = {}
        if self.ebc is not None:
            out.update({name: bag.weight for name, bag in self.ebc.embedding_bags.items()})
        if self.ec is not None:
            out.update({name: emb.weight for name, emb in self.ec.embeddings.items()})
        return out


class _Unpack(nn.Module):
    """The collections' outputs -> :class:`SparseFeatures` (pooled (B, D), padded (B, L, D), lengths (B,)).

    A separate module without parameters so that a train pipeline's tracer treats it as a leaf (it iterates
    over its inputs, which a trace cannot).
    """

    def __init__(self, max_len: Dict[str, int]) -> None:
        super().__init__()
        self.max_len = dict(max_len)

    def forward(self, pooled: Optional[KeyedTensor], unpooled: Optional[Dict[str, JaggedTensor]]) -> SparseFeatures:
        out = SparseFeatures(pooled={} if pooled is None else {k: v.float() for k, v in pooled.to_dict().items()},
                             sequences={}, lengths={})
        for name, jt in (unpooled or {}).items():
            if name in self.max_len:
                out.sequences[name] = jt.to_padded_dense(self.max_len[name]).float()  # (B, L, D)
                out.lengths[name] = jt.lengths().long()  # (B,)
            else:  # the candidate's single value on a sequence table
                out.pooled[name] = jt.to_padded_dense(1)[:, 0].float()  # (B, D)
        return out


class PaddedLookup(nn.Module):
    """Plain-PyTorch twin of :class:`SparseArch` for serving: padded table-row ids in, SparseFeatures out.

    Inputs per key: a single-valued feature is (B,) int64, a sequence or side column is (B, L) int64, with -1
    for null / padding (padding after the valid elements). Ids are table rows (see
    ``mkt_torchrec.data.schema.map_ids``).

    Args:
        schema: the feature schema.
        features: the single-valued features it looks up.
        sequences: the behaviour sequences it looks up, with their side columns.
        weights: table name -> (rows, D) trained weight, for every table of ``features``, ``sequences`` and their
            side columns; registered as buffers as they are (detached, not copied: build it from a finished model).
    """

    def __init__(self, schema: SchemaConfig, features: List[str], sequences: List[str],
                 weights: Dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.features = list(features)
        self.sequences = list(sequences) + schema.side_keys_of(sequences)  # (B, L) keys: sequences, side columns
        self.table_of = {k: schema.table_of(k) for k in self.features + self.sequences}
        missing = sorted({self.table_of[k] for k in self.table_of} - set(weights))
        if missing:
            raise ValueError(f"PaddedLookup: no weights for tables {missing}")
        for table, w in weights.items():
            self.register_buffer(f"table__{table}", w.detach())

    def _lookup(self, key: str, ids: torch.Tensor) -> torch.Tensor:
        weight = getattr(self, f"table__{self.table_of[key]}")
        valid = ids >= 0
        emb = nn.functional.embedding(ids.clamp(min=0), weight).float()  # (B, [L,] D); fp16 tables -> fp32
        return emb * valid.unsqueeze(-1).to(emb.dtype)

    def forward(self, ids: Dict[str, torch.Tensor]) -> SparseFeatures:
        pooled = {f: self._lookup(f, ids[f]) for f in self.features}
        sequences = {s: self._lookup(s, ids[s]) for s in self.sequences}
        lengths = {s: (ids[s] >= 0).sum(dim=1) for s in self.sequences}
        return SparseFeatures(pooled=pooled, sequences=sequences, lengths=lengths)


def padded_ids(kjt: KeyedJaggedTensor, schema: SchemaConfig, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
    """KeyedJaggedTensor -> the padded id tensors :class:`PaddedLookup` and the serving export take."""
    jts = kjt.to_dict()
    out: Dict[str, torch.Tensor] = {}
    for k in keys:
        max_len = schema.max_len_of(k)
        if max_len is not None:  # a sequence or side column
            out[k] = jts[k].to_padded_dense(max_len, padding_value=-1)  # (B, L)
        else:
            out[k] = jts[k].to_padded_dense(1, padding_value=-1)[:, 0]  # (B,)
    return out


class SequenceInputs:
    """The keys and query of target attention over each behaviour sequence, with the items' side features (DIN).

    A step is the element's embedding plus the embeddings of its side features (``side_features`` of the
    sequence's config); the query is the candidate's shared feature plus the candidate's own value of each side
    feature. Sums, so every width stays the table dim. Without side features: the element and the candidate's
    shared feature, as before. Plain Python over static names (no module, no parameters).

    Args:
        schema: the feature schema.
        sequences: the behaviour sequences.
        features: the single-valued features the caller's ``SparseFeatures.pooled`` holds; a side feature not
            among them (another entity's specific feature, null on every row the caller scores) adds nothing.

    Example:
        >>> inputs = SequenceInputs(cfg.schema, list(cfg.schema.sequences), list(cfg.schema.features))  # doctest: +SKIP
        >>> inputs.query(sparse.pooled, "hist_source_items").shape, inputs.steps(sparse, "hist_source_items").shape
        ... # (B, D), (B, L, D)                                                               # doctest: +SKIP
    """

    def __init__(self, schema: SchemaConfig, sequences: Sequence[str], features: Sequence[str]) -> None:
        self.query_of = {s: schema.sequences[s].shared_feature for s in sequences}
        self.side_keys = {s: list(schema.sequences[s].side_features.values()) for s in sequences}
        self.side_features = {s: [f for f in schema.sequences[s].side_features if f in features] for s in sequences}

    def steps(self, sparse: SparseFeatures, seq: str) -> torch.Tensor:
        """(B, L, D): each step's element embedding plus its side features' (zero in the padding)."""
        out = sparse.sequences[seq]
        for key in self.side_keys[seq]:
            out = out + sparse.sequences[key]  # (B, L, D)
        return out

    def query(self, pooled: Dict[str, torch.Tensor], seq: str, skip: Sequence[str] = ()) -> torch.Tensor:
        """(B, D): the candidate's shared feature plus its side features (those in ``skip`` left out)."""
        out = pooled[self.query_of[seq]]
        for f in self.side_features[seq]:
            if f not in skip:
                out = out + pooled[f]  # (B, D)
        return out


class FeatureGroups(NamedTuple):
    user: torch.Tensor  # (B, d_u)   v_u: user-profile embeddings, concatenated (Eq. 2)
    seq: torch.Tensor  # (B, d_seq) v_seq: one attention vector per behaviour sequence, concatenated
    shared: torch.Tensor  # (B, d_sh)  v_shared: entity-shared embeddings, concatenated
    spec: Dict[str, torch.Tensor]  # entity -> (B, d_spec_e) v_spec: that entity's specific embeddings


class GroupArch(nn.Module):
    """SparseFeatures + dense features -> MKT's feature groups; owns the sequence encoder.

    A dense feature x becomes a D-wide "embedding" x * w (one learned vector w per dense feature), so it
    joins its group like any categorical feature (and HFA scores it like one).

    Args:
        schema: the feature schema.
        seq_cfg: the sequence encoder (both entities' rows share it, paper 3.2.1).
        entities: entities whose specific block to build (MEM: both; TEM: ``target``).
        dense_dim: width of a dense feature's embedding.
        unit_dense: a dense feature's vector is used as w / |w|, so x * w / |w| has the size of x
            (``model.hfa.fixed_scale``).

    Example:
        >>> groups = GroupArch(cfg.schema, cfg.model.sequence, ("target",))(sparse, batch.dense_features)  # doctest: +SKIP
    """

    def __init__(self, schema: SchemaConfig, seq_cfg: SequenceEncoderConfig, entities: Sequence[str],
                 dense_dim: int = 8, unit_dense: bool = False) -> None:
        super().__init__()
        self.unit_dense = unit_dense
        self.user_features = schema.features_of("user")
        self.shared_features = schema.features_of("shared")
        self.spec_features = {e: schema.features_of("specific", e) for e in entities}
        self.user_dense = schema.dense_of("user")
        self.shared_dense = schema.dense_of("shared")
        self.spec_dense = {e: schema.dense_of("specific", e) for e in entities}
        used = self.user_dense + self.shared_dense + [n for e in entities for n in self.spec_dense[e]]
        self.dense_column = {n: i for i, n in enumerate(schema.dense)}  # column of the batch's dense features
        self.dense_row = {n: i for i, n in enumerate(used)}  # row of dense_weight
        # only the dense features this arch uses get a vector: DDP expects a gradient for every parameter
        self.dense_weight = nn.Parameter(torch.randn(len(used), dense_dim) * 0.1) if used else None  # (F_used, D)
        self.sequences = list(schema.sequences)
        self.query_of = {s: schema.sequences[s].shared_feature for s in self.sequences}
        built = self.user_features + self.shared_features + [f for e in entities for f in self.spec_features[e]]
        self.sequence_inputs = SequenceInputs(schema, self.sequences, built)  # steps and query with side features
        dims = {f: schema.tables[schema.table_of(f)].dim for f in schema.features}
        self.attention = nn.ModuleDict({
            s: make_attention(seq_cfg.encoder, dims[self.query_of[s]], seq_cfg.attention_mlp, seq_cfg.heads)
            for s in self.sequences})
        self.user_dim = sum(dims[f] for f in self.user_features) + dense_dim * len(self.user_dense)
        self.seq_dim = sum(dims[self.query_of[s]] for s in self.sequences)
        self.shared_dim = sum(dims[f] for f in self.shared_features) + dense_dim * len(self.shared_dense)
        self.spec_dims = {e: [dims[f] for f in self.spec_features[e]] + [dense_dim] * len(self.spec_dense[e])
                          for e in entities}
        self.context_dim = self.user_dim + self.seq_dim + self.shared_dim

    def _dense(self, dense: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        if not names:
            return []
        w = self.dense_weight
        if self.unit_dense:
            w = nn.functional.normalize(w, dim=-1)
        return [dense[:, self.dense_column[n]: self.dense_column[n] + 1] * w[self.dense_row[n]]
                for n in names]  # each (B, D)

    def _cat(self, parts: list[torch.Tensor], batch: int, like: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts, dim=-1) if parts else like.new_zeros(batch, 0)

    def forward(self, sparse: SparseFeatures, dense: torch.Tensor,
                entities: Optional[Sequence[str]] = None) -> FeatureGroups:
        """sparse: pooled (B, D) / padded (B, L, D) (sequences and their side columns); dense (B, F_dense) ->
        FeatureGroups.

        ``entities`` limits which specific blocks are built (default: all this arch was built for), so a
        target-only caller needs no source-specific inputs.
        """
        p = sparse.pooled
        any_t = next(iter(p.values()))
        b = any_t.shape[0]
        user = self._cat([p[f] for f in self.user_features] + self._dense(dense, self.user_dense), b, any_t)
        # another entity's specific features (not looked up for a target-only caller) are null on these rows
        skip = [f for e, fs in self.spec_features.items() if entities is not None and e not in entities for f in fs]
        si = self.sequence_inputs
        seq = self._cat([self.attention[s](si.query(p, s, skip), si.steps(sparse, s), sparse.lengths[s])
                         for s in self.sequences], b, any_t)  # (B, d_seq)
        shared = self._cat([p[f] for f in self.shared_features] + self._dense(dense, self.shared_dense), b, any_t)
        spec = {e: self._cat([p[f] for f in fs] + self._dense(dense, self.spec_dense[e]), b, any_t)
                for e, fs in self.spec_features.items() if entities is None or e in entities}
        return FeatureGroups(user=user, seq=seq, shared=shared, spec=spec)
