"""What a knowledge-cache version holds, and the int64 key of each entry (KEEP's decomposition and degeneration).

KEEP (arXiv 2208.10174, section 5.2) cannot cache the pre-trained model's knowledge of every (user, item) pair, so it
caches user-level and item-level vectors (*decomposition*) and, where the knowledge needs both, replaces the item by
its category (*degeneration*: under 1,000 categories). The MKT MEM hands the TEM four vectors (paper 3.3,
:class:`mkt_torchrec.models.mkt.Knowledge`); two of them already are decomposed, two need the pair:

=================  ===========================================  ============================================
kind               vector (MEM target path)                     key
=================  ===========================================  ============================================
``user``           v_u: the user features' embeddings            the rows of every user feature
``item``           v_shared: the entity-shared features'         the rows of every shared feature
                   embeddings (item id, category, ...)
``user_category``  [v_seq || g_com^t]: the sequence vector        the user key and the category row
                   (target attention with the candidate) and
                   the CKE output through the target gate,
                   degenerated (see below)
=================  ===========================================  ============================================

**Exact where it can be.** v_u and v_shared are functions of their features' table rows (and of the user or shared
*dense* features, where a schema has any: then an entry is the mean over its key's rows, and ``mkt cache build``
warns), so keying them by those rows loses nothing: the cached vector is the MEM's. v_seq and g_com^t depend on the row's whole
input (the behaviour sequence at that time, the candidate item, its specific features). Degeneration, our reading:
the entry of (user, category c) is the *mean* of the MEM's vectors over the build data's target rows of that user
with an item of category c. KEEP retrains its extractor with category features in place of item features; the MKT
MEM was not trained on such inputs, so feeding it a category-only item would ask it about inputs it never saw,
where the mean over the pair's real impressions stays in its training distribution.

**Keys.** Features are read as *table rows* (after :func:`mkt_torchrec.data.schema.map_ids`), as the model sees
them, so training (from the batch's KJT) and serving (from a request's raw ids, mapped) compute the same key. A key
folds the rows of its features, in schema order, with the reader's splitmix64 finaliser
(:func:`mkt_torchrec.data.schema.mix64`, one salt per position); a feature with no value in a row counts as row -1.
Features must be single-valued (one value or none per row): a multi-valued user or shared feature is refused,
naming it. Keys are 64-bit hashes: two different rows collide with probability about n**2 / 2**65 (a billion
users: 0.03 over all pairs), the same order as the id hashing before them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence

import numpy as np

from mkt_torchrec.config import SchemaConfig

KINDS = ("user", "item", "user_category")
_SALT0 = 0x5EED_CAC4E  # position salts: _SALT0 + position (any fixed numbers: they only separate positions)


@dataclass(frozen=True)
class KeySpec:
    """Which features make each kind's key.

    Attributes:
        user: the schema's user features (in schema order).
        item: the schema's entity-shared features.
        category: the shared feature that stands in for the item in ``user_category`` keys.
    """

    user: tuple
    item: tuple
    category: str

    @property
    def features(self) -> List[str]:
        return list(dict.fromkeys([*self.user, *self.item, self.category]))

    def to_dict(self) -> Dict[str, object]:
        return {"user": list(self.user), "item": list(self.item), "category": self.category}


def key_spec(schema: SchemaConfig, category_feature: str) -> KeySpec:
    """The key features of ``schema``; ``category_feature`` must be one of its shared features.

    Raises:
        ValueError: ``category_feature`` is not an entity-shared feature (naming the ones there are), or the schema
            has no user feature.
    """
    shared = tuple(schema.features_of("shared"))
    if category_feature not in shared:
        raise ValueError(f"cache.category_feature: {category_feature!r} is not an entity-shared feature of the schema "
                         f"(its shared features: {list(shared)})")
    user = tuple(schema.features_of("user"))
    if not user:
        raise ValueError("schema: no user feature; the knowledge cache keys its user vectors by them")
    return KeySpec(user=user, item=shared, category=category_feature)


def kind_dims(user: int, seq: int, shared: int, cross: int) -> Dict[str, int]:
    """Each kind's vector width from the widths of the MEM's (user, seq, shared, cross) knowledge vectors."""
    return {"user": int(user), "item": int(shared), "user_category": int(seq) + int(cross)}


def single_rows(kjt: "object", names: Sequence[str]) -> Dict[str, np.ndarray]:
    """The table row of each of ``names`` in each row of a host KeyedJaggedTensor: name -> (B,) int64, -1 where
    the row has no value.

    Raises:
        ValueError: a feature holds more than one value in some row (naming it).
    """
    out: Dict[str, np.ndarray] = {}
    for name in names:
        jt = kjt[name]  # type: ignore[index]
        lengths = jt.lengths().numpy()
        if lengths.size and int(lengths.max()) > 1:
            raise ValueError(f"feature {name!r}: holds {int(lengths.max())} values in a row; knowledge-cache keys "
                             "need single-valued user and shared features")
        rows = np.full(lengths.shape[0], -1, dtype=np.int64)
        rows[lengths == 1] = jt.values().numpy().astype(np.int64, copy=False)
        out[name] = rows
    return out


def fold(columns: Sequence[np.ndarray]) -> np.ndarray:
    """One int64 key per row from int64 columns (B,) each: splitmix64 of each column with its position's salt,
    combined by XOR of rotated mixes (order matters)."""
    from mkt_torchrec.data.schema import mix64

    if not columns:
        raise ValueError("fold: no columns")
    h = np.zeros(columns[0].shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i, col in enumerate(columns):
            z = mix64(np.asarray(col, dtype=np.int64), np.uint64(_SALT0 + i))
            h = mix64((h ^ z).view(np.int64), np.uint64(_SALT0 - 1 - i))
    return h.view(np.int64)


def keys_of(rows: Mapping[str, np.ndarray], spec: KeySpec) -> Dict[str, np.ndarray]:
    """kind -> (B,) int64 keys from the rows of ``spec.features`` (name -> (B,) int64, -1 for no value)."""
    user = fold([rows[n] for n in spec.user])
    return {"user": user, "item": fold([rows[n] for n in spec.item]),
            "user_category": fold([user, rows[spec.category]])}
