"""Typed configuration: YAML is read here, once, and validated into dataclasses.

A config file has one section per component (``schema``, ``data``, ``synth``, ``tenrec``, ``source``, ``model``,
``train``, ``eval``). Every section is a dataclass below; unknown keys, wrong types and values out of range
fail at load time with a :class:`ConfigError` that names the dotted key, e.g.
``schema.tables.item_id.rows: expected a positive int, got -3``.

Overrides use the same dotted keys: ``--set data.batch_size=256`` (the value is parsed as YAML, so
``--set model.cke.experts=[64,32]`` gives a list).

Example:
    >>> cfg = load_config("configs/quickstart.yaml", ["data.batch_size=128"])
    >>> cfg.data.batch_size
    128
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

import yaml

from mkt_torchrec import safe_yaml
from mkt_torchrec.baseline_config import BaselinesConfig, KeepConfig, PGTLConfig
from mkt_torchrec.build.source import SourceConfig
from mkt_torchrec.cache_config import CacheConfig
from mkt_torchrec.typed import ConfigError, arg_docs, build, check, entry_type, short, validate_tree

ENTITIES: tuple[str, str] = ("source", "target")
GROUPS: tuple[str, ...] = ("user", "shared", "specific")
COMPUTE_DEVICES: tuple[str, str] = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------------------
# Schema: tables, features, behaviour sequences
# --------------------------------------------------------------------------------------------------------


@dataclass
class TableConfig:
    """One embedding table.

    Args:
        rows: number of rows (hash buckets for hashed ids).
        dim: embedding dimension D.
        id_mapping: how a raw int64 id becomes a row: ``hash`` (splitmix64 of id and table name, modulo
            rows: any int64 id is valid) or ``modulo`` (id % rows; ids must be >= 0).
    """

    rows: int
    dim: int = 8
    id_mapping: Literal["hash", "modulo"] = "hash"

    def _validate(self, key: str) -> None:
        check(self.rows >= 1, f"{key}.rows", f"expected a positive int, got {self.rows}")
        check(self.rows < 1 << 62, f"{key}.rows", f"{self.rows} rows cannot be indexed by int64 table rows")
        check(self.dim >= 1, f"{key}.dim", f"expected a positive int, got {self.dim}")


@dataclass
class FeatureConfig:
    """One single-valued categorical feature (a nullable int64 column of the same name).

    Args:
        group: ``user`` (profile), ``shared`` (present for both entities) or ``specific`` (one entity only).
        table: embedding table name; defaults to the feature's own name. Several features may share one.
        entity: for ``specific`` features, which entity has it (``source`` or ``target``).
    """

    group: Literal["user", "shared", "specific"]
    table: Optional[str] = None
    entity: Optional[Literal["source", "target"]] = None


@dataclass
class SequenceConfig:
    """One behaviour sequence: the items a user engaged with before the impression (oldest first).

    Stored as a non-null ``list<int64>`` column of the same name. It is embedded with the table of the
    entity-shared feature it mirrors (``shared_feature``), so the candidate's value of that feature is the
    attention query and both entities share the sequence encoder (paper 3.2.1).

    Args:
        entity: whose behaviour it records: ``source`` or ``target`` items.
        shared_feature: the entity-shared feature whose table (and id space) the elements use.
        max_len: the most recent ``max_len`` elements are kept.
        side_features: the items' side features, as in DIN: single-valued feature -> the ``list<int64>`` column
            holding, step by step aligned with this sequence, the raw values of that feature for each element
            (e.g. ``{category: hist_source_categories}``). Each step is embedded as the element's embedding plus
            its side features' embeddings (each in the feature's own table), and the candidate's query likewise,
            so the widths do not change. The feature's table must have the shared feature's table's dim. Empty
            by default.
    """

    entity: Literal["source", "target"]
    shared_feature: str
    max_len: int = 50
    side_features: dict[str, str] = field(default_factory=dict)


@dataclass
class DenseConfig:
    """One dense float feature (a nullable float32 column of the same name; null reads as 0).

    Args:
        group: feature group as for :class:`FeatureConfig`.
        entity: for ``specific`` features, which entity has it.
    """

    group: Literal["user", "shared", "specific"]
    entity: Optional[Literal["source", "target"]] = None


@dataclass
class EntityNames:
    """Display names of the two entities (the data always says ``source`` / ``target``)."""

    source: str = "product"
    target: str = "post"


@dataclass
class SchemaConfig:
    """MKT's four feature groups and the tables behind them.

    Args:
        tables: embedding table name -> its size and id mapping.
        features: single-valued categorical feature (a column) -> its group, table and entity.
        sequences: behaviour sequence (a ``list<int64>`` column) -> its entity, table and length.
        dense: dense float feature (a column) -> its group and entity.
        entities: display names of the two entities.
        user_id_feature: the feature that identifies a user (GAUC's groups, the per-user split).
    """

    tables: dict[str, TableConfig]
    features: dict[str, FeatureConfig]
    sequences: dict[str, SequenceConfig] = field(default_factory=dict)
    dense: dict[str, DenseConfig] = field(default_factory=dict)
    entities: EntityNames = field(default_factory=EntityNames)
    user_id_feature: str = "user_id"

    def _validate(self, key: str) -> None:
        check(len(self.features) > 0, f"{key}.features", "at least one feature is required")
        used_tables: set[str] = set()
        for name, f in self.features.items():
            k = f"{key}.features.{name}"
            if f.table is None:
                f.table = name
            check(f.table in self.tables, f"{k}.table", f"unknown table {f.table!r}; tables: {sorted(self.tables)}")
            used_tables.add(f.table)
            if f.group == "specific":
                check(f.entity is not None, f"{k}.entity", "a specific feature needs entity: source|target")
            else:
                check(f.entity is None, f"{k}.entity", f"only specific features have an entity (group {f.group!r})")
        used_columns = {"entity", "label", "true_prob", "activity"} | set(self.features) | set(self.sequences)
        for name, s in self.sequences.items():
            k = f"{key}.sequences.{name}"
            check(name not in self.features, k, "a sequence cannot have the same name as a feature")
            sf = self.features.get(s.shared_feature)
            check(sf is not None, f"{k}.shared_feature", f"unknown feature {s.shared_feature!r}")
            check(sf.group == "shared", f"{k}.shared_feature", f"{s.shared_feature!r} is not an entity-shared feature")
            check(s.max_len >= 1, f"{k}.max_len", f"expected a positive int, got {s.max_len}")
            self._validate_side_features(f"{k}.side_features", name, s, used_columns)
        for name, d in self.dense.items():
            k = f"{key}.dense.{name}"
            check(name not in self.features and name not in self.sequences and name not in self.side_keys, k,
                   "name already used")
            if d.group == "specific":
                check(d.entity is not None, f"{k}.entity", "a specific feature needs entity: source|target")
        unused = sorted(set(self.tables) - used_tables)
        check(not unused, f"{key}.tables", f"tables used by no feature: {unused}")
        uf = self.features.get(self.user_id_feature)
        check(uf is not None and uf.group == "user", f"{key}.user_id_feature",
               f"{self.user_id_feature!r} must name a user-group feature")

    def _validate_side_features(self, key: str, name: str, seq: SequenceConfig, used_columns: set[str]) -> None:
        """Each side feature is a single-valued feature on a table of the sequence's dim; each column is new."""
        dim = self.tables[self.features[seq.shared_feature].table].dim  # type: ignore[index]
        for feature, column in seq.side_features.items():
            k = f"{key}.{feature}"
            f = self.features.get(feature)
            check(f is not None, k, f"unknown feature {feature!r}: a side feature is a single-valued feature of "
                                     f"schema.features ({sorted(self.features)})")
            check(feature != seq.shared_feature, k, f"{feature!r} is the sequence's shared_feature already")
            side_dim = self.tables[f.table].dim  # type: ignore[index]
            check(side_dim == dim, k, f"table {f.table!r} has dim {side_dim}, but the sequence's table "
                                       f"{self.features[seq.shared_feature].table!r} has dim {dim}: the step "
                                       "embedding is their sum, so the dims must be equal")
            check(isinstance(column, str) and column != "", k, f"expected a column name, got {column!r}")
            check(column not in used_columns and column not in self.dense, k,
                   f"column {column!r} is already used (by a feature, sequence, dense feature, side column or "
                   "a reserved column)")
            used_columns.add(column)

    # Derived views used by the reader and the model -------------------------------------------------
    def features_of(self, group: str, entity: Optional[str] = None) -> list[str]:
        """Sparse feature names of a group (for ``specific``, of one entity), in config order."""
        return [n for n, f in self.features.items() if f.group == group and (entity is None or f.entity == entity)]

    def dense_of(self, group: str, entity: Optional[str] = None) -> list[str]:
        return [n for n, d in self.dense.items() if d.group == group and (entity is None or d.entity == entity)]

    @property
    def sparse_keys(self) -> list[str]:
        """Keys of the KeyedJaggedTensor, in order: features, then sequences, then side columns."""
        return list(self.features) + list(self.sequences) + self.side_keys

    @property
    def side_keys(self) -> list[str]:
        """The side-feature columns of every sequence (sequence order, then ``side_features`` order)."""
        return [c for s in self.sequences.values() for c in s.side_features.values()]

    def side_keys_of(self, sequences: Sequence[str]) -> list[str]:
        """The side-feature columns of the given sequences, in that order."""
        return [c for s in sequences for c in self.sequences[s].side_features.values()]

    def sequence_of(self, key: str) -> Optional[str]:
        """The sequence a jagged key belongs to (itself, or the sequence of a side column); None for a feature."""
        if key in self.sequences:
            return key
        for name, s in self.sequences.items():
            if key in s.side_features.values():
                return name
        return None

    def max_len_of(self, key: str) -> Optional[int]:
        """``max_len`` of a sequence or side column; None for a single-valued feature."""
        seq = self.sequence_of(key)
        return None if seq is None else self.sequences[seq].max_len

    def table_of(self, key: str) -> str:
        """Table behind a sparse key (feature, sequence or side column)."""
        if key in self.features:
            return self.features[key].table  # type: ignore[return-value]
        if key in self.sequences:
            return self.features[self.sequences[key].shared_feature].table  # type: ignore[return-value]
        for s in self.sequences.values():
            for feature, column in s.side_features.items():
                if column == key:
                    return self.features[feature].table  # type: ignore[return-value]
        raise KeyError(f"{key!r} is not a feature, sequence or side column of the schema")


# --------------------------------------------------------------------------------------------------------
# Data, synthetic data, Tenrec conversion
# --------------------------------------------------------------------------------------------------------


@dataclass
class RelatedItemsConfig:
    """Related source items of each target row's item, one more KeyedJaggedTensor key (PGTL's prior; see
    ``mkt_torchrec.data.relations``), computed from the train split only.

    Args:
        key: the batch's key holding them ('': none; ``model.name=pgtl`` sets ``related_items`` when empty).
        item_feature: the entity-shared feature naming the item (its table is where the key is looked up).
        relations: tried in order per target item, the first that finds one wins: a single-valued feature's name
            (the source items with the target item's value of it: the item feature itself is "the same id",
            ``category`` "the same category") or ``co_click`` (source items clicked by the users who clicked it).
        max_related: the most related source items per target item (K).
    """

    key: str = ""
    item_feature: str = "item_id"
    relations: list[str] = field(default_factory=lambda: ["item_id", "category", "co_click"])
    max_related: int = 8

    def _validate(self, key: str) -> None:
        check(self.max_related >= 1, f"{key}.max_related", f"expected a positive int, got {self.max_related}")
        check(len(self.relations) > 0 and len(set(self.relations)) == len(self.relations), f"{key}.relations",
               f"expected a non-empty list of distinct relations, got {self.relations}")


@dataclass
class DataConfig:
    """How the reader batches and shuffles.

    Args:
        batch_size: rows per batch on each rank.
        shuffle: shuffle row groups and rows (seeded) in training; evaluation never shuffles.
        shuffle_window_rows: rows are shuffled within windows of this many consecutive rows of the epoch's
            (shuffled) row-group order; also the read unit when not shuffling. Keep it several row groups large
            (the writers' row groups: 20000 rows for ``mkt synth``'s default, 100000 for ``mkt tenrec``) so rows
            mix across row groups; the reader warns once when a row group is larger. It bounds the reader's
            memory: one window per slot (``max(1, num_workers)`` per rank), about 1.5 KB a row at peak with
            sequences of length 50 (about 0.8 GB per slot at the default; ``tools/bench_data.py`` measures it).
        num_workers: DataLoader worker processes per rank (0: read in the training process).
        seed: base seed of all shuffles.
        validation_fraction: the last fraction of each entity's train rows, in the order the train files hold
            them (time order for ``mkt tenrec`` data; ``mkt synth`` writes blocks of users, so there it is a
            sample of the last block's rows), form the split ``valid``, cut at read time; ``train`` is the rest.
            Rounded to the nearest row (halves up), keeping at least one row of each entity on each side (an
            entity with one row gives it to ``valid``). 0 disables it; at most 0.5. The test split is untouched.
        related_items: the related-source-items key of the batch (PGTL's prior).
    """

    batch_size: int = 512
    shuffle: bool = True
    shuffle_window_rows: int = 524288
    num_workers: int = 0
    seed: int = 0
    validation_fraction: float = 0.1
    related_items: RelatedItemsConfig = field(default_factory=RelatedItemsConfig)

    def _validate(self, key: str) -> None:
        check(self.batch_size >= 1, f"{key}.batch_size", f"expected a positive int, got {self.batch_size}")
        check(self.shuffle_window_rows >= 1, f"{key}.shuffle_window_rows", "expected a positive int")
        check(self.num_workers >= 0, f"{key}.num_workers", "expected an int >= 0")
        check(0.0 <= self.validation_fraction <= 0.5, f"{key}.validation_fraction",
               f"expected a number in [0, 0.5] (0: no validation split), got {self.validation_fraction}")


@dataclass
class SynthConfig:
    """Synthetic data with planted cross-entity structure (see ``mkt_torchrec.data.synth``).

    Args:
        users: number of users.
        source_rows: total source-entity impressions; target rows are ``target_ratio`` of that.
        target_ratio: target rows per source row (the paper's industrial data: 1/3).
        source_items: catalogue size of the source entity (products).
        target_items: catalogue size of the target entity (posts).
        categories: item categories, shared by both entities.
        latent_dim: dimension of the planted user / item interest vectors.
        test_fraction: the last fraction of each user's impressions (time order) goes to the test split.
        rows_per_file: rows per Parquet file.
        row_group_rows: rows per Parquet row group (the unit of reading and shuffling).
        flip_fraction: negative transfer: in this fraction of the categories a user's interest in posts is the
            opposite of their interest in products (the target logit's and target history's affinity term
            changes sign there), so what the source entity teaches about those categories misleads.
        seed: seed of everything generated.
    """

    users: int = 20000
    source_rows: int = 300000
    target_ratio: float = 0.33
    source_items: int = 20000
    target_items: int = 5000
    categories: int = 64
    latent_dim: int = 8
    test_fraction: float = 0.2
    rows_per_file: int = 200000
    row_group_rows: int = 20000
    flip_fraction: float = 0.0
    seed: int = 0

    def _validate(self, key: str) -> None:
        check(0 <= self.flip_fraction <= 1, f"{key}.flip_fraction", "expected a number in [0, 1]")
        for name in ("users", "source_rows", "source_items", "target_items", "categories", "latent_dim",
                     "rows_per_file", "row_group_rows"):
            v = getattr(self, name)
            check(v >= 1, f"{key}.{name}", f"expected a positive int, got {v}")
        check(0 < self.target_ratio <= 10, f"{key}.target_ratio", "expected a number in (0, 10]")
        check(0 <= self.test_fraction < 1, f"{key}.test_fraction", "expected a number in [0, 1)")


@dataclass
class TenrecConfig:
    """Converting Tenrec's QK-video (source) and QK-article (target) CSVs.

    Args:
        split: ``per_user`` (each user's last ``test_fraction`` of rows in time order is test) or
            ``global`` (the paper: the last ``test_fraction`` of each file).
        test_fraction: share of rows in the test split.
        chunk_rows: CSV rows read per streaming chunk.
        rows_per_file: rows per Parquet file.
        row_group_rows: rows per Parquet row group (the unit of reading and shuffling).
    """

    split: Literal["per_user", "global"] = "per_user"
    test_fraction: float = 0.2
    chunk_rows: int = 1_000_000
    rows_per_file: int = 2_000_000
    row_group_rows: int = 100_000

    def _validate(self, key: str) -> None:
        check(0 <= self.test_fraction < 1, f"{key}.test_fraction", "expected a number in [0, 1)")
        check(self.chunk_rows >= 1, f"{key}.chunk_rows", "expected a positive int")


# --------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------


@dataclass
class SequenceEncoderConfig:
    """Target attention of the candidate over each behaviour sequence.

    Args:
        encoder: ``din`` (DIN's activation unit over [q, k, q-k, q*k], softmax over valid positions),
            ``din_sum`` (the same unit with DIN's unnormalised weights: DIN drops the softmax "to keep the intensity
            of the interest", so the output grows with how many behaviours match the candidate) or ``mha``
            (multi-head attention with the candidate as the single query). The paper leaves the encoder open (3.2.1).
        attention_mlp: hidden sizes of DIN's activation unit.
        heads: heads for ``mha`` (must divide the embedding dim).
    """

    encoder: Literal["din", "din_sum", "mha"] = "din"
    attention_mlp: list[int] = field(default_factory=lambda: [32])
    heads: int = 2


@dataclass
class HFAConfig:
    """Heterogeneous Feature Alignment (paper 3.2.2, Eq. 3-6).

    Args:
        cross_input: ``text`` crosses the specific features WITH the shared ones (user, sequence,
            entity-shared), as the paper's text says; ``eq3`` crosses v_spec alone, as Eq. 3 is printed.
        cross_layers: layers of the DCN cross network (explicit cross).
        mlp: hidden sizes of the implicit-cross MLP.
        align: layer sizes of the alignment MLP; its last size is the aligned width of both entities.
        score: ``sigmoid``: each feature's score is 2 * sigmoid (Eq. 4, in (0, 2)); ``softmax`` (an extension):
            F * softmax over the entity's F specific features, so the scores average 1 and a feature can only gain
            weight at the others' expense (with independent sigmoids the next layer can undo any score, so their
            sizes are not identified; see README "Making each part of MKT pay off").
        score_penalty: an extension (0: off, the paper): the MEM's loss adds ``score_penalty`` x the mean HFA
            score of each entity's rows, an L1 pull towards 0 meant to leave high scores only where weighting a
            feature lowers the cross-entropy. Measured on the quickstart at 0.02 and 0.1 it drives every score,
            useful or noise, below 1e-4 (README "Making each part of MKT pay off"), hence off.
        fixed_scale: an extension (false: the paper). Every specific feature reaches the score-weighting at a
            fixed size, so that its weight in q can come from its score alone: each categorical feature's
            embedding is L2-normalised per row, a dense feature's learned vector w is used as w / |w| (the
            value keeps its size), and each feature's block of the alignment MLP's first weight matrix is
            scaled to unit norm. Without it a score is not identified: the embedding or the next layer can
            grow to undo it.
    """

    cross_input: Literal["text", "eq3"] = "text"
    cross_layers: int = 2
    mlp: list[int] = field(default_factory=lambda: [64, 32])
    align: list[int] = field(default_factory=lambda: [32])
    score: Literal["sigmoid", "softmax"] = "sigmoid"
    score_penalty: float = 0.0
    fixed_scale: bool = False


@dataclass
class CKEConfig:
    """Common Knowledge Extractor: an MMoE over q (paper 3.2.3, Eq. 7).

    Args:
        experts: number of experts (paper: 3).
        expert_layers: each expert's MLP; the last size is d_CKE (paper's shared network: [128, 64] public,
            [1024, 512] industrial).
    """

    experts: int = 3
    expert_layers: list[int] = field(default_factory=lambda: [128, 64])


@dataclass
class TEMConfig:
    """Target Entity Model (paper 3.3).

    Args:
        dnn: layer sizes; the last is 1 (paper: [128, 64, 16, 1] public, [1024, 512, 64, 1] industrial).
        cross_layer: index in ``dnn`` of the hidden layer whose output is the TEM's user-entity cross vector
            g_cross (Eq. 12); default 1, the 64-wide layer, the width of the CKE output.
        init_from_mem: (extension, on by default) the TEM's embedding tables and sequence encoder start from the
            stage-1 MEM's (the tables of the same name; the MEM itself stays frozen), instead of from random (false:
            the paper's TEM): stage 2 then starts from what the MEM learned on far more rows than the target entity
            has. With ``train.finetune_dense_lr`` below stage 1's rate it lifted the TEM above its own MEM on the
            quickstart (README "Making each part of MKT pay off").
        mem_logit: (extension) the frozen MEM's target-tower logit is added to the TEM's output, and the TEM's
            last layer starts at zero: stage 2 starts as the MEM's own target model and learns a correction.
        knowledge: ``mem``: the frozen MEM computes the knowledge; ``cache``: read from the knowledge cache
            (``cache.uri`` / ``cache.version``, KEEP's degenerated form: ``mkt_torchrec.cache.keys``), no MEM held.
    """

    dnn: list[int] = field(default_factory=lambda: [128, 64, 16, 1])
    cross_layer: int = 1
    init_from_mem: bool = True
    mem_logit: bool = False
    knowledge: Literal["mem", "cache"] = "mem"


@dataclass
class ModelConfig:
    """MEM + TEM, or one of the paper's baselines. Layer sizes default to the paper's public set-up (4.1.3).

    Args:
        name: the model: ``mkt`` (MEM + TEM), or a baseline of the paper's Table 2 (``mlp``, ``din``, ``fibinet``:
            single-domain, trained on target rows; ``mmoe``, ``ple``, ``star``, ``conet``: trained jointly on both
            entities' rows; ``minet``, ``finetune``, ``ctnet``: pre-trained (stage ``mem``), then fine-tuned on
            target rows (stage ``tem``)), or a model registered by a plugin; see ``mkt_torchrec.registry``.
        baselines: layer sizes of the baselines (ignored by ``mkt``).
        ablation: ``none`` or one of the paper's Table 4 ablations: ``no_hfa`` (specific features
            zero-padded and concatenated without HFA), ``no_pdl`` (gamma = 0), ``no_mem_pretrain`` (TEM alone,
            no knowledge), ``no_tem_finetune`` (the MEM's target tower is the final model).
        extractor_layers: SKE / TKE MLPs (Eq. 8); the last size must equal the CKE's.
        tower: each entity tower of the MEM (paper: [16, 1] public, [64, 1] industrial).
        pdl_gamma: weight of the Polarized Distribution Loss (Eq. 11; paper 0.01).
        pdl: its per-row term: ``cosine`` (Eq. 9-10 as printed: minimised, it drives g_ind towards -g_com) or
            ``squared_cosine`` (an extension: minimised, it makes the two vectors orthogonal, i.e. independent).
        pgtl: the PGTL baseline's settings (ignored by other models).
        keep: the KEEP baseline's settings (ignored by other models).
    """

    name: str = "mkt"
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    ablation: str = "none"
    sequence: SequenceEncoderConfig = field(default_factory=SequenceEncoderConfig)
    hfa: HFAConfig = field(default_factory=HFAConfig)
    cke: CKEConfig = field(default_factory=CKEConfig)
    extractor_layers: list[int] = field(default_factory=lambda: [128, 64])
    tower: list[int] = field(default_factory=lambda: [16, 1])
    pdl_gamma: float = 0.01
    pdl: Literal["cosine", "squared_cosine"] = "cosine"
    tem: TEMConfig = field(default_factory=TEMConfig)
    pgtl: PGTLConfig = field(default_factory=PGTLConfig)
    keep: KeepConfig = field(default_factory=KeepConfig)

    def _validate(self, key: str) -> None:
        from mkt_torchrec import registry  # no torch; plugins (MKT_MODELS) register here

        check(self.name in registry.model_names(), f"{key}.name",
               f"expected one of {list(registry.model_names())}, got {self.name!r}")
        check(self.ablation in registry.ablations(), f"{key}.ablation",
               f"expected one of {list(registry.ablations())}, got {self.ablation!r}")
        for name, layers in (("sequence.attention_mlp", self.sequence.attention_mlp), ("hfa.mlp", self.hfa.mlp),
                             ("hfa.align", self.hfa.align), ("cke.expert_layers", self.cke.expert_layers),
                             ("extractor_layers", self.extractor_layers), ("tower", self.tower),
                             ("tem.dnn", self.tem.dnn)):
            check(len(layers) > 0 and all(x >= 1 for x in layers), f"{key}.{name}",
                   f"expected a non-empty list of positive ints, got {layers}")
        check(self.cke.experts >= 1, f"{key}.cke.experts", "expected a positive int")
        check(self.hfa.cross_layers >= 1, f"{key}.hfa.cross_layers", "expected a positive int")
        check(self.hfa.score_penalty >= 0, f"{key}.hfa.score_penalty", "expected a number >= 0")
        check(self.sequence.heads >= 1, f"{key}.sequence.heads", "expected a positive int")
        check(self.extractor_layers[-1] == self.cke.expert_layers[-1], f"{key}.extractor_layers",
               f"the last size ({self.extractor_layers[-1]}) must equal cke.expert_layers' last "
               f"({self.cke.expert_layers[-1]}): PDL compares the two vectors")
        check(self.tower[-1] == 1, f"{key}.tower", f"the last size must be 1 (a logit), got {self.tower}")
        check(self.tem.dnn[-1] == 1, f"{key}.tem.dnn", f"the last size must be 1 (a logit), got {self.tem.dnn}")
        check(0 <= self.tem.cross_layer < len(self.tem.dnn) - 1, f"{key}.tem.cross_layer",
               f"expected a hidden-layer index in [0, {len(self.tem.dnn) - 2}], got {self.tem.cross_layer}")
        check(self.pdl_gamma >= 0, f"{key}.pdl_gamma", "expected a number >= 0")
        check(self.name == "mkt" or self.ablation == "none", f"{key}.ablation",
               f"the ablations are MKT's; model.name={self.name} takes ablation: none, got {self.ablation!r}")


# --------------------------------------------------------------------------------------------------------
# Training, planning
# --------------------------------------------------------------------------------------------------------


@dataclass
class PlannerConfig:
    """The topology TorchRec's planner shards for (``mkt plan`` flags override it).

    Args:
        compute_device: ``auto`` (cuda if available, else cpu), ``cpu`` or ``cuda``.
        cluster: the GPU nodes planned for: a preset, ``a100-ib``, ``h100-ib`` or ``h200-ib`` (datasheet HBM size
            and bandwidth, NVLink, InfiniBand, PCIe per GPU), a preset with figures overridden
            (``h100-ib:inter=25GB/s``) or ``custom:hbm=80GB,hbm_bw=3.35TB/s,intra=450GB/s,inter=50GB/s``
            (``mkt plan --help``); null: TorchRec's default bandwidths. Used on cuda only.
        hbm_gb: accelerator memory per rank, GB (10^9 bytes, as sold: 80 for an A100 / H100 80 GB); null: the
            cluster's, or 80 without one. The planner keeps 15% of it free for the CUDA context and allocator.
        ddr_gb: host memory per rank the planner may fill with embedding tables (UVM), GB (10^9 bytes). 24: the
            TorchX components give a cuda worker 32 GiB (34.4 GB) by default, and about 10 GB of that is the
            trainer itself, its loader processes, pinned batches and checkpoint staging. Raise both together
            (``--memMB`` of the component). Not part of a cluster preset.
        local_world_size: ranks per node (0: all ranks on one node, or LOCAL_WORLD_SIZE when launched).
        plan_file: a plan written by ``mkt plan``; when set the trainer uses it instead of planning.
        sharding_type: shard every table this way where its collection and the compute device allow it
            (``data_parallel``, ``table_wise``, ``column_wise``, ``row_wise``, ...); empty: the planner chooses.
        pooling_factors: mean ids looked up per row for each sparse key (feature or sequence name -> number
            > 0), which the planner's cost and memory estimates scale with, e.g. ``{hist_source_items: 31.5}``.
            A key missing here takes the dataset's measured mean (``mkt plan --data``, the trainer's data),
            else 1 for a single-valued feature and max_len for a sequence (an upper bound).
    """

    compute_device: Literal["auto", "cpu", "cuda"] = "auto"
    cluster: Optional[str] = None
    hbm_gb: Optional[float] = None
    ddr_gb: float = 24.0
    local_world_size: int = 0
    plan_file: Optional[str] = None
    sharding_type: str = ""
    pooling_factors: dict[str, float] = field(default_factory=dict)

    def _validate(self, key: str) -> None:
        allowed = ("", "data_parallel", "table_wise", "column_wise", "table_column_wise", "row_wise",
                   "table_row_wise", "grid_shard")
        check(self.sharding_type in allowed, f"{key}.sharding_type",
               f"expected one of {list(allowed[1:])} or empty, got {self.sharding_type!r}")
        for name, v in self.pooling_factors.items():  # the keys are checked against the schema when planning
            check(0 < v < float("inf"), f"{key}.pooling_factors.{name}",
                   f"expected a number > 0 (mean ids per row), got {v}")


@dataclass
class TrainConfig:
    """The trainer (``mkt train``).

    Args:
        epochs: passes over the training split (without early stopping).
        patience: early stopping: after each epoch the validation split (``data.validation_fraction``) is scored,
            and training stops once this many epochs in a row did not beat the best epoch by ``stop_on``;
            evaluation and export then use the best epoch's checkpoint. 0: no validation, train ``epochs`` epochs.
        stop_on: what makes an epoch the best: ``gauc`` (the highest validation GAUC among the epochs that rank
            better than chance, AUC >= 0.5, predict better than the constant base rate, log loss at most the
            click rate's entropy, and whose log loss is within ``logloss_slack`` of the lowest so far: GAUC alone
            picked TEM epochs with pooled AUC below 0.5, and on the demo epochs whose log loss had risen 9% past
            the base rate's) or ``logloss`` (the lowest validation log loss, what TorchRec's NE ranks by; on the
            demo it stopped the MEM after its first epoch, 0.036 GAUC below the second for 0.6% less log loss).
        logloss_slack: with ``stop_on: gauc``, how much higher (relative) than the lowest validation log loss so
            far an epoch's may be and still be the best (0.01: 1%).
        max_epochs: with ``patience`` > 0, the most epochs to train.
        init_at_click_rate: a new run starts the bias of each entity's logit at ``logit(click rate)`` of the
            train split rows it trains on (``mkt_torchrec.models.base_rate``), so its first predictions are the
            click rate instead of about 0.5; tensors loaded from a stage-1 run or a checkpoint replace it.
        max_steps: stop after this many steps in all (0: no limit).
        embedding_optimizer: fused optimizer of the embedding tables (applied in backward).
        embedding_lr: its learning rate.
        dense_optimizer: optimizer of every other (dense) parameter, in torch's fused implementation where it has one.
        dense_lr: its learning rate.
        finetune_dense_lr: the dense learning rate of a stage that starts from a stage-1 model (MKT's TEM beside its
            frozen MEM, a baseline's fine-tuning stage); null: ``dense_lr``. Such a stage trains on the target rows
            only, far fewer than stage 1's, and at stage 1's rate its fresh dense layers overfit within the first
            epoch. Models trained from scratch (single-domain, joint) keep ``dense_lr``.
        checkpoint_every: steps between checkpoints (0: none by step count).
        checkpoint_every_minutes: minutes of training between checkpoints (0: none by time); saves are
            asynchronous, so training does not wait for the write.
        keep_checkpoints: how many complete checkpoints to keep.
        log_every: steps between log lines / metrics records; also how often the losses are read back from the
            device (the only host sync of training) and rank 0's clock is checked for a time-based checkpoint.
        precision: ``bf16`` runs the dense towers under bfloat16 autocast (loss and optimizer state stay fp32);
            ``fp32`` runs everything in float32.
        embedding_precision: storage of the trainable embedding tables: ``fp16`` halves their memory (and the
            lookup traffic); the fused optimizer's state stays fp32. A frozen stage-1 MEM keeps its precision.
        seed: seed of parameter initialisation.
        threads: intra-op threads per rank (1 avoids oversubscribing small machines); at most 1024, on any machine
            (the config may be written on another one): 2048 and more crashed torch's thread pool (rc 139).
        tf32: on a CUDA device, matrix products and convolutions of the dense part in TensorFloat-32 (Ampere and
            later: about 8x the fp32 matmul rate, 10-bit mantissa products with fp32 accumulation). No effect on CPU.
        compile: ``torch.compile`` (dynamic batch) of the dense modules the pipeline's tracer leaves whole (HFA,
            CKE, source / target extractors, towers, sequence attention, gates), fewer kernel launches per step on
            a GPU; the first steps of every process then wait for compilation (measured in docs/benchmarks.md).
        planner: topology for TorchRec's planner.
        tensorboard: write the metrics records as TensorBoard scalars too, in ``RUN/tensorboard/`` (loss, step
            rate, validation curves; ``tensorboard --logdir OUT``).
    """

    epochs: int = 1
    patience: int = 0
    stop_on: Literal["gauc", "logloss"] = "gauc"
    logloss_slack: float = 0.01
    max_epochs: int = 20
    init_at_click_rate: bool = True
    max_steps: int = 0
    embedding_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    embedding_lr: float = 0.05
    dense_optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    dense_lr: float = 0.001
    finetune_dense_lr: Optional[float] = None
    checkpoint_every: int = 0
    checkpoint_every_minutes: float = 30.0
    keep_checkpoints: int = 2
    log_every: int = 50
    precision: Literal["fp32", "bf16"] = "fp32"
    embedding_precision: Literal["fp32", "fp16"] = "fp32"
    seed: int = 0
    threads: int = 1
    tf32: bool = True
    compile: bool = False
    tensorboard: bool = True
    planner: PlannerConfig = field(default_factory=PlannerConfig)

    def _validate(self, key: str) -> None:
        for name in ("epochs", "threads", "keep_checkpoints", "log_every", "max_epochs"):
            v = getattr(self, name)
            check(v >= 1, f"{key}.{name}", f"expected a positive int, got {v}")
        check(self.threads <= 1024, f"{key}.threads", f"{self.threads} threads per rank; at most 1024 (more crashed "
               f"torch's thread pool; this machine has {os.cpu_count()} CPUs)")
        for name in ("max_steps", "checkpoint_every", "patience"):
            v = getattr(self, name)
            check(v >= 0, f"{key}.{name}", f"expected an int >= 0, got {v}")
        check(self.embedding_lr > 0 and self.dense_lr > 0, key, "learning rates must be positive")
        check(self.finetune_dense_lr is None or self.finetune_dense_lr > 0, f"{key}.finetune_dense_lr",
               f"expected a positive number or null, got {self.finetune_dense_lr}")
        check(self.logloss_slack >= 0, f"{key}.logloss_slack", f"expected a number >= 0, got {self.logloss_slack}")
        check(self.checkpoint_every_minutes >= 0, f"{key}.checkpoint_every_minutes",
               f"expected a number >= 0, got {self.checkpoint_every_minutes}")


@dataclass
class EvalConfig:
    """Offline evaluation (``mkt evaluate``, ``mkt report``).

    Args:
        activity_bounds: user-activity group edges by number of past behaviours (paper Table 3: 0-10, 10-30,
            >30 -> ``[10, 30]``).
        bootstrap_samples: user-level bootstrap resamples for confidence intervals (0: none); at most 100,000
            (each costs a pass over the users; 1,000-2,000 already make the interval's ends stable).
        confidence: two-sided confidence level of the intervals.
        partitions: hash partitions by user for out-of-core GAUC (bounded memory).
        seed: bootstrap seed.
        calibration_bins: equal-width score bins over [0, 1] of the expected calibration error (ECE) in
            metrics.json (bin ``b`` holds ``b / bins <= score < (b + 1) / bins``, a score of 1.0 the last).
        min_gauc_users: a GAUC resting on fewer users with both a click and a non-click than this is shown as
            "too few users (n)" in reports instead of a number (0: always show the number).
        plot_sample_rows: rows per run kept (a seeded uniform sample) for the report's ROC and calibration
            plots; the report's tables never need them (0: no such plots).
    """

    activity_bounds: list[int] = field(default_factory=lambda: [10, 30])
    bootstrap_samples: int = 200
    confidence: float = 0.95
    partitions: int = 16
    seed: int = 0
    calibration_bins: int = 20
    min_gauc_users: int = 200
    plot_sample_rows: int = 100_000

    def _validate(self, key: str) -> None:
        b = self.activity_bounds
        check(all(x > 0 for x in b) and b == sorted(set(b)), f"{key}.activity_bounds",
               f"expected increasing positive ints, got {b}")
        check(0 <= self.bootstrap_samples <= 100_000, f"{key}.bootstrap_samples",
               f"expected an int in [0, 100000], got {self.bootstrap_samples}")
        check(0 < self.confidence < 1, f"{key}.confidence", "expected a number in (0, 1)")
        check(self.partitions >= 1, f"{key}.partitions", "expected a positive int")
        check(self.calibration_bins >= 1, f"{key}.calibration_bins", "expected a positive int")
        check(self.min_gauc_users >= 0, f"{key}.min_gauc_users", "expected an int >= 0")
        check(self.plot_sample_rows >= 0, f"{key}.plot_sample_rows", "expected an int >= 0")


# --------------------------------------------------------------------------------------------------------
# The whole file
# --------------------------------------------------------------------------------------------------------


@dataclass
class Config:
    """A whole config file. Sections other than ``schema`` have defaults."""

    schema: SchemaConfig
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    tenrec: TenrecConfig = field(default_factory=TenrecConfig)
    source: SourceConfig = field(default_factory=SourceConfig)  # mkt build: the logs and their mapping
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)  # the knowledge cache (mkt_torchrec/cache_config.py)

    def _validate(self, key: str) -> None:
        related = self.data.related_items
        if self.model.name == "pgtl" and not related.key:  # PGTL's prior reads the key (models/baselines/pgtl.py)
            related.key = "related_items"
        if not related.key:
            return
        where = "data.related_items"
        check(related.key not in self.schema.sparse_keys and related.key not in self.schema.dense, f"{where}.key",
               f"{related.key!r} is already a column of the schema")
        item = self.schema.features.get(related.item_feature)
        check(item is not None and item.group == "shared", f"{where}.item_feature",
               f"{related.item_feature!r} must name an entity-shared feature of schema.features")
        for name in related.relations:
            check(name == "co_click" or name in self.schema.features, f"{where}.relations",
                   f"{name!r} is neither co_click nor a feature of schema.features ({sorted(self.schema.features)})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_settings(self, settings: Mapping[str, Any]) -> "Config":
        """A new, validated config with ``{"dotted.key": value}`` set (typed values: nothing is parsed)."""
        raw = self.to_dict()
        for key, value in settings.items():
            node = raw
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return config_from_dict(raw)

    def for_evaluation(self, job: "Config") -> "Config":
        """This (a run's own) config with the job's :data:`EVALUATE_KEYS`: what ``evaluate`` scores with. The
        plan is made afresh (evaluation may run at another world size)."""
        if job.train.planner.plan_file:
            raise ValueError("train.planner.plan_file does not apply to evaluate: it plans for its own world size")
        job_raw = job.to_dict()
        settings: dict[str, Any] = {"train.planner.plan_file": None}
        for key in EVALUATE_KEYS:
            section, _, name = key.partition(".")
            settings[key] = job_raw[section][name] if name else job_raw[section]
        return self.with_settings(settings)

    def schema_digest(self) -> str:
        """A short hash of the schema: datasets record it, readers compare it."""
        schema = dataclasses.asdict(self.schema)
        for seq in schema["sequences"].values():  # without side features: the digest of before they existed
            if not seq["side_features"]:
                del seq["side_features"]
        blob = json.dumps(schema, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# what ``mkt evaluate`` takes from its --config / --set: the model, schema and planner come from the run itself
EVALUATE_KEYS = ("eval", "data.batch_size", "data.num_workers", "train.threads")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply ``dotted.key=value`` overrides, validate.

    Raises:
        ConfigError: naming the file and the dotted key that is wrong.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            raw = safe_yaml.load(f, path)  # duplicate keys, aliases, deep or huge values: a ConfigError
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a YAML config file (see configs/)") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}): not a YAML config") from None
    except OSError as e:
        raise ConfigError(f"{path}: unreadable: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())  # one line
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        apply_overrides(raw, overrides)
        return config_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """Apply ``a.b.c=value`` strings to a raw config dict in place (value parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        problem = "empty key segment" if not all(parts) else f"more than {safe_yaml.MAX_DEPTH} key segments"
        if not all(parts) or len(parts) > safe_yaml.MAX_DEPTH:
            raise ConfigError(f"override {short(key)}: {problem}")
        try:
            value = safe_yaml.load(text, f"override {key}")
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value is not valid YAML: {' '.join(str(e).split())}") from None
        node: Any = raw
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[p] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = value


def config_from_dict(raw: Mapping[str, Any]) -> Config:
    rest = {k: v for k, v in raw.items() if not (k == "extra" and v == {})}  # older run.json: an empty "extra"
    if "schema" not in rest:
        raise ConfigError("schema: missing required section")
    cfg = build(Config, rest, "")
    validate_tree(cfg, "")
    return cfg


def describe_keys(cfg: Optional[Config] = None) -> list[tuple[str, Any, str]]:
    """(dotted key, value, meaning) of every setting: ``cfg``'s values, or the defaults (without ``schema``,
    which has none: it describes a dataset). ``schema``'s named entries are listed one key each
    (``schema.tables.item_id.rows``)."""
    rows: list[tuple[str, Any, str]] = []

    def walk(obj: Any, prefix: str) -> None:
        docs = arg_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}.{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key)
            elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
                for name, entry in value.items():  # schema.tables.<name>, schema.features.<name>, ...
                    walk(entry, f"{key}.{name}")
            elif isinstance(value, (dict, list)) and not value and entry_type(type(obj), f.name) is not None:
                rows.append((key, value, docs.get(f.name, "")))  # empty: describe one entry's keys too
                walk(entry_type(type(obj), f.name)(), f"{key}.NAME" if isinstance(value, dict) else f"{key}[]")
            else:
                rows.append((key, value, docs.get(f.name, "")))

    names = ("schema", "data", "synth", "tenrec", "source", "model", "train", "eval", "cache") if cfg is not None \
        else ("data", "synth", "tenrec", "source", "model", "train", "eval", "cache")
    for name in names:
        section = getattr(cfg, name) if cfg is not None else {
            "data": DataConfig, "synth": SynthConfig, "tenrec": TenrecConfig, "source": SourceConfig, "model": ModelConfig,
            "train": TrainConfig, "eval": EvalConfig, "cache": CacheConfig}[name]()
        walk(section, name)
    return rows

