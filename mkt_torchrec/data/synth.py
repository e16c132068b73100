"""Synthetic marketplace impressions with planted cross-entity structure.

The generator plants what the MKT paper claims, so the claims can be tested:

* **Shared user interests.** Each user has a latent interest vector z_u (``latent_dim``). Items of both
  entities live in one space of ``categories`` category centres; an item's vector is its category centre
  plus noise. The click logit of user u on item i is ``a * <z_u, w_i> / sqrt(k)`` plus biases, for both
  entities, so what is learned about a user from products transfers to posts.
* **A sparse target entity.** Target rows are ``target_ratio`` of source rows, and are spread more
  unevenly over users (activity**1.5), so many users have few or no post impressions.
* **Behaviour sequences** reveal z_u: each user's past source / target engagements are drawn from
  categories by affinity softmax(<z_u, mu_c>). Sequences are the user's behaviour before the logging
  window (they do not depend on the logged labels, so there is no leakage). If the schema gives a sequence
  ``side_features`` (e.g. ``category: hist_source_categories``), each side column holds that attribute of each
  history item, step by step (written only when asked: the other columns stay the same, bit for bit).
* **Heterogeneous specific features.** Products: ``price_bucket`` (+``log_price`` dense) matter through a
  per-user price preference; ``condition`` is noise. Posts: ``style`` matters through a per-user style
  preference; ``post_length`` is noise. Different entity biases give different base rates.
* **Negative transfer (optional).** With ``flip_fraction`` > 0, a fixed random subset of
  ``round(flip_fraction * categories)`` categories is flipped: on posts of those categories the affinity term
  of the click logit changes sign (``-a * <z_u, w_i> / sqrt(k)``), and so does the affinity that draws the
  user's past posts and the posts shown to them by affinity. Products are unchanged, so what the source entity
  teaches about a user's taste in those categories misleads on the target entity. ``true_prob`` still holds the
  row's true probability (with the flip), so its AUC / GAUC is still the ceiling. ``flip_fraction`` = 0 gives
  the data of a generator without this option, bit for bit.
* **Time order.** Each user's rows are in time order: the last ``test_fraction`` is the test split, and the
  train split ends with every user's most recent ``RECENT_TRAIN_FRACTION`` (a quarter) of train rows, after all
  earlier ones. The validation split (``data.validation_fraction`` <= 0.25, the last rows of the train split) then
  holds the same users' latest train rows, as the test split holds their next ones; without this it would hold
  the last-written users' rows, users no training row has seen, and early stopping would tune for cold start.
* **Known optimum.** Each row stores ``true_prob``; the AUC / GAUC of ``true_prob`` is the best any
  model can reach on the data.

Generation streams user chunks (about ``row_group_rows * 10`` rows each) to a :class:`DatasetWriter`, so any
size fits in bounded memory. Feature names are those of ``configs/quickstart.yaml``; a schema without one
of them is rejected with the missing name.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import DatasetWriter, Manifest
from mkt_torchrec.data.jagged import gather_jagged

REQUIRED = {
    "features": ["user_id", "age", "gender", "item_id", "category", "price_bucket", "condition", "style",
                 "post_length"],
    "sequences": ["hist_source_items", "hist_target_items"],
    "dense": ["log_price"],
}
HISTORY_ENTITY = {"hist_source_items": 0, "hist_target_items": 1}  # sequence -> entity code of its items
# side features the generator can write per history item (schema ``side_features``): feature -> item attribute
SIDE_ATTRIBUTES = {0: {"category": "cat", "price_bucket": "price_bucket", "condition": "condition"},
                   1: {"category": "cat", "style": "style", "post_length": "post_length"}}
EARLY, RECENT, TEST = 0, 1, 2  # a row's place in its user's time order (see _chunk_rows)
RECENT_TRAIN_FRACTION = 0.25  # the train split ends with every user's most recent quarter of train rows
TARGET_ID_OFFSET = 1 << 40  # post ids live in their own range of the shared item-id space
ENTITY_BIAS = {0: -3.4, 1: -3.9}
AFFINITY_SCALE = 2.0


def _check_schema(cfg: Config) -> None:
    s = cfg.schema
    for kind, names in REQUIRED.items():
        have = getattr(s, kind)
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(f"mkt synth: schema.{kind} lacks {missing}; the synthetic generator writes the "
                             "features of configs/quickstart.yaml (copy its schema section)")
    for name, code in HISTORY_ENTITY.items():
        for feature in s.sequences[name].side_features:
            if feature not in SIDE_ATTRIBUTES[code]:
                raise ValueError(f"mkt synth: schema.sequences.{name}.side_features.{feature}: the synthetic "
                                 f"generator writes the side features {sorted(SIDE_ATTRIBUTES[code])} for this "
                                 "sequence's items")


class _World:
    """The catalogue: categories and items of both entities (small, held in memory)."""

    def __init__(self, cfg: Config) -> None:
        sc = cfg.synth
        rng = np.random.default_rng([sc.seed, 1])
        k = sc.latent_dim
        self.k = k
        self.mu = rng.normal(size=(sc.categories, k))  # (C, k) category centres
        cat_pop = 1.0 / np.arange(1, sc.categories + 1) ** 0.7
        self.cat_pop = cat_pop / cat_pop.sum()
        self.items = {}
        for code, n in ((0, sc.source_items), (1, sc.target_items)):
            cat = rng.choice(sc.categories, size=n, p=self.cat_pop)
            w = self.mu[cat] + 0.6 * rng.normal(size=(n, k))  # (I, k)
            bias = 0.3 * rng.normal(size=n)
            order = np.argsort(cat, kind="stable")  # items grouped by category for sampling
            cat, w, bias = cat[order], w[order], bias[order]
            starts = np.searchsorted(cat, np.arange(sc.categories + 1))
            item = {"cat": cat, "w": w, "bias": bias, "starts": starts}
            if code == 0:
                item["price_bucket"] = np.clip((rng.gamma(2.0, 2.5, size=n)).astype(np.int64), 0, 15)
                item["log_price"] = (item["price_bucket"] + rng.uniform(size=n)) / 4.0 - 2.0
                item["condition"] = rng.integers(0, 4, size=n)
            else:
                item["style"] = rng.integers(0, 8, size=n)
                item["post_length"] = rng.integers(0, 8, size=n)
            self.items[code] = item
        # drawn after everything above, so that flip_fraction = 0 leaves the catalogue (and the data) unchanged
        n_flip = int(round(sc.flip_fraction * sc.categories))
        self.flipped = np.sort(rng.choice(sc.categories, size=n_flip, replace=False))
        self.cat_sign = np.ones(sc.categories)  # (C,) sign of the target entity's affinity per category
        self.cat_sign[self.flipped] = -1.0

    def affinity_sign(self, code: int) -> Optional[np.ndarray]:
        """Per-category sign of the user-item affinity for entity ``code`` (None: +1 everywhere)."""
        return self.cat_sign if code == 1 else None

    def sample_items(self, rng: np.random.Generator, code: int, z: np.ndarray, temperature: float,
                     sign: Optional[np.ndarray] = None) -> np.ndarray:
        """For each row of z (N, k): a category by affinity softmax, then a random item of it.

        Args:
            sign: (C,) per-category sign of the affinity (see :meth:`affinity_sign`); None: +1.
        """
        aff = z @ self.mu.T  # (N, C)
        if sign is not None:
            aff = aff * sign
        logits = AFFINITY_SCALE * aff / math.sqrt(self.k) / temperature + np.log(self.cat_pop)
        gumbel = -np.log(-np.log(rng.uniform(size=logits.shape) + 1e-12) + 1e-12)
        cats = np.argmax(logits + gumbel, axis=1)
        starts = self.items[code]["starts"]
        lo, hi = starts[cats], starts[cats + 1]
        empty = hi == lo  # a category with no item of this entity: fall back to any item
        n_items = len(self.items[code]["cat"])
        lo = np.where(empty, 0, lo)
        hi = np.where(empty, n_items, hi)
        return lo + (rng.uniform(size=len(cats)) * (hi - lo)).astype(np.int64)


def _item_ids(code: int, idx: np.ndarray) -> np.ndarray:
    return idx.astype(np.int64) + (TARGET_ID_OFFSET if code == 1 else 0)


def _jagged_list(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.int64()))


@dataclass
class _Users:
    """One chunk's users: who they are (``mkt synth --days`` keeps them on every day and moves only ``z``)."""

    z: np.ndarray  # (U, k) latent interests
    age: np.ndarray  # (U,)
    gender: np.ndarray
    price_pref: np.ndarray  # informative, tied to age
    style_pref: np.ndarray
    user_bias: np.ndarray
    activity: np.ndarray  # lognormal: impressions and history length scale with it

    @classmethod
    def draw(cls, rng: np.random.Generator, n_users: int, k: int) -> "_Users":
        z = rng.normal(size=(n_users, k))
        age = rng.integers(0, 7, size=n_users)
        gender = rng.integers(0, 2, size=n_users)
        price_pref = np.clip(age * 2 + rng.integers(-2, 3, size=n_users), 0, 15)
        style_pref = rng.integers(0, 8, size=n_users)
        user_bias = 0.3 * rng.normal(size=n_users)
        activity = rng.lognormal(mean=0.0, sigma=0.8, size=n_users)
        return cls(z, age, gender, price_pref, style_pref, user_bias, activity)


def _chunk_rows(world: _World, cfg: Config, chunk: int, user_lo: int, user_hi: int) -> tuple[pa.Table, np.ndarray]:
    """Rows of users [user_lo, user_hi): returns (table, phase) with phase per row: ``EARLY`` / ``RECENT`` train
    rows (a user's most recent ``RECENT_TRAIN_FRACTION`` of train rows are ``RECENT``), or ``TEST``."""
    rng = np.random.default_rng([cfg.synth.seed, 2, chunk])
    people = _Users.draw(rng, user_hi - user_lo, world.k)
    return _user_rows(world, cfg, rng, people, user_lo)


def _user_rows(world: _World, cfg: Config, rng: np.random.Generator, people: _Users, user_lo: int,
               share: float = 1.0, test_fraction: Optional[float] = None) -> tuple[pa.Table, np.ndarray]:
    """The rows of :func:`_chunk_rows` for ``people`` (users ``user_lo, user_lo + 1, ...``), drawn from ``rng``:
    impressions, histories, labels, time order.

    Args:
        share: the fraction of ``synth.source_rows`` (and target rows) these rows are drawn for: each user's
            expected impressions scale with it (``mkt synth --days``: one day's share).
        test_fraction: the last fraction of each user's rows that is ``TEST``; None: ``synth.test_fraction``.
    """
    sc = cfg.synth
    test_fraction = sc.test_fraction if test_fraction is None else test_fraction
    n_users = len(people.z)
    k = world.k
    z, age, gender, price_pref, style_pref, user_bias, activity = (
        people.z, people.age, people.gender, people.price_pref, people.style_pref, people.user_bias,
        people.activity)
    mean_act = math.exp(0.8 ** 2 / 2)

    # impressions per user and entity
    src_rate = sc.source_rows / sc.users * activity / mean_act
    tgt_w = activity ** 1.5
    tgt_rate = sc.source_rows * sc.target_ratio / sc.users * tgt_w / math.exp(1.5 ** 2 * 0.8 ** 2 / 2)
    if share != 1.0:
        src_rate, tgt_rate = src_rate * share, tgt_rate * share
    counts = {0: rng.poisson(src_rate), 1: rng.poisson(tgt_rate)}

    # behaviour sequences (before the logging window)
    hist_len = {0: np.minimum(rng.poisson(12 * activity), 200), 1: np.minimum(rng.poisson(3 * activity), 200)}
    hist, hist_items = {}, {}
    for code in (0, 1):
        owner = np.repeat(np.arange(n_users), hist_len[code])
        items = world.sample_items(rng, code, z[owner], temperature=0.7, sign=world.affinity_sign(code))
        hist[code] = (hist_len[code], _item_ids(code, items))
        hist_items[code] = items  # catalogue index of each history element (its side features)
    hist_offsets = {c: np.concatenate([[0], np.cumsum(hist[c][0])]) for c in (0, 1)}

    tables = []
    for code in (0, 1):
        cnt = counts[code]
        u = np.repeat(np.arange(n_users), cnt)  # (N,) local user index of each row
        n = len(u)
        if n == 0:
            continue
        it = world.items[code]
        sign = world.affinity_sign(code)
        # half the candidates by affinity (what a recommender would show), half by popularity
        by_aff = world.sample_items(rng, code, z[u], temperature=1.5, sign=sign)
        by_pop = world.sample_items(rng, code, np.zeros((n, k)), temperature=1.0)
        idx = np.where(rng.uniform(size=n) < 0.5, by_aff, by_pop)
        aff = np.einsum("nk,nk->n", z[u], it["w"][idx])
        if sign is not None:
            aff = aff * sign[it["cat"][idx]]
        logit = (AFFINITY_SCALE * aff / math.sqrt(k)
                 + it["bias"][idx] + user_bias[u] + ENTITY_BIAS[code])
        if code == 0:
            logit = logit - 0.25 * np.abs(it["price_bucket"][idx] - price_pref[u])
        else:
            logit = logit + np.where(it["style"][idx] == style_pref[u], 1.2, -0.2)
        p = 1.0 / (1.0 + np.exp(-logit))
        label = (rng.uniform(size=n) < p).astype(np.int8)
        null = pa.nulls(n, pa.int64())
        seqs = {}
        for hc, name in ((0, "hist_source_items"), (1, "hist_target_items")):
            lens = hist[hc][0][u]
            seqs[name] = _jagged_list(lens, gather_jagged(hist_offsets[hc][u], lens, hist[hc][1]))
            side = cfg.schema.sequences[name].side_features  # only what the schema asks for: no RNG is drawn
            if side:
                elems = gather_jagged(hist_offsets[hc][u], lens, hist_items[hc])  # (sum lens,) catalogue index
                for feature, column in side.items():
                    attr = world.items[hc][SIDE_ATTRIBUTES[hc][feature]]
                    seqs[column] = _jagged_list(lens, attr[elems].astype(np.int64))
        t = pa.table({
            "entity": pa.array(np.full(n, code, np.int8)),
            "label": pa.array(label),
            "user_id": pa.array((user_lo + u).astype(np.int64)),
            "age": pa.array(age[u].astype(np.int64)),
            "gender": pa.array(gender[u].astype(np.int64)),
            "item_id": pa.array(_item_ids(code, idx)),
            "category": pa.array(it["cat"][idx].astype(np.int64)),
            "price_bucket": pa.array(it["price_bucket"][idx]) if code == 0 else null,
            "condition": pa.array(it["condition"][idx]) if code == 0 else null,
            "style": pa.array(it["style"][idx]) if code == 1 else null,
            "post_length": pa.array(it["post_length"][idx]) if code == 1 else null,
            **seqs,  # both sequences, and their side columns if the schema has any
            "log_price": (pa.array(it["log_price"][idx].astype(np.float32)) if code == 0
                          else pa.nulls(n, pa.float32())),
            "true_prob": pa.array(p.astype(np.float32)),
            "activity": pa.array((hist_len[0][u] + hist_len[1][u]).astype(np.int32)),
        })
        tables.append((t, u))
    if not tables:
        return pa.table({}), np.zeros(0, bool)
    table = pa.concat_tables([t for t, _ in tables], promote_options="permissive")
    users = np.concatenate([u for _, u in tables])
    # time order within each user: a random timestamp per row; the last test_fraction is the test split
    ts = rng.uniform(size=len(users))
    order = np.lexsort((ts, users))
    sorted_users = users[order]
    first = np.searchsorted(sorted_users, sorted_users, side="left")
    rank_in_user = np.arange(len(users)) - first
    n_user = np.bincount(users, minlength=n_users)[sorted_users]
    n_train = np.ceil((1.0 - test_fraction) * n_user - 1e-9)  # 1-row users: train
    phase_sorted = np.where(rank_in_user >= n_train, TEST,
                            np.where(rank_in_user >= np.ceil((1.0 - RECENT_TRAIN_FRACTION) * n_train - 1e-9),
                                     RECENT, EARLY))
    phase = np.empty(len(users), dtype=np.int8)
    phase[order] = phase_sorted
    # rows of a chunk are written in random order, so row groups mix users and entities
    shuffle = rng.permutation(len(users))
    return table.take(pa.array(shuffle)), phase[shuffle]


def _user_chunks(cfg: Config) -> list[tuple[int, int, int]]:
    """``(chunk, user_lo, user_hi)`` of each chunk of users: about ``row_group_rows * 10`` rows each."""
    sc = cfg.synth
    rows_per_user = sc.source_rows * (1 + sc.target_ratio) / sc.users
    users_per_chunk = max(1, int(sc.row_group_rows * 10 / max(rows_per_user, 1e-9)))
    return [(chunk, lo, min(sc.users, lo + users_per_chunk))
            for chunk, lo in enumerate(range(0, sc.users, users_per_chunk))]


def generate(cfg: Config, out_dir: str, overwrite: bool = False,
             progress: Optional[Callable[[int], None]] = None) -> Manifest:
    """Write a synthetic dataset for ``cfg`` to ``out_dir`` (atomically). Returns its manifest.

    Args:
        progress: called with the number of rows written after each chunk.
    """
    _check_schema(cfg)
    sc = cfg.synth
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with DatasetWriter(out_dir, cfg.schema, optional=("true_prob", "activity"), rows_per_file=sc.rows_per_file,
                       row_group_rows=sc.row_group_rows, overwrite=overwrite,
                       schema_digest=cfg.schema_digest()) as writer, \
            tempfile.TemporaryDirectory(prefix=".synth-recent-", dir=parent) as spill_dir:
        world = _World(cfg)
        spill_path = os.path.join(spill_dir, "recent.parquet")
        spill: Optional[pq.ParquetWriter] = None
        for chunk, lo, hi in _user_chunks(cfg):
            table, phase = _chunk_rows(world, cfg, chunk, lo, hi)
            if table.num_rows == 0:
                continue
            writer.write("train", table.filter(pa.array(phase == EARLY)))
            writer.write("test", table.filter(pa.array(phase == TEST)))
            recent = table.filter(pa.array(phase == RECENT))
            if recent.num_rows:  # held on disk until every user's earlier rows are written
                if spill is None:
                    spill = pq.ParquetWriter(spill_path, recent.schema)
                spill.write_table(recent.cast(spill.schema), row_group_size=sc.row_group_rows)
            if progress is not None:
                progress(table.num_rows - recent.num_rows)
        if spill is not None:
            spill.close()
            recent_file = pq.ParquetFile(spill_path)
            for i in range(recent_file.num_row_groups):
                part = recent_file.read_row_group(i)
                writer.write("train", part)
                if progress is not None:
                    progress(part.num_rows)
        writer.set_source({"kind": "synth", "synth": asdict(sc)})
        return writer.close()
