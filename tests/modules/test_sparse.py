"""Side features of behaviour sequences (DIN): lookups in training and serving, and what attention sees."""

import pytest
import torch

from mkt_torchrec.config import ENTITIES
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.models.serving import serving_keys
from mkt_torchrec.modules.sparse import GroupArch, PaddedLookup, SparseArch, padded_ids

from tests.conftest import small_config

NO_SIDE_FEATURES = ("schema.sequences.hist_source_items.side_features={}",
                    "schema.sequences.hist_target_items.side_features={}")


def _batch(data, cfg):
    return next(iter(ParquetReader(data, "test", cfg.schema, cfg.data, training=False)))


def test_side_columns_share_their_features_table_and_serving_looks_them_up_alike(small_dataset):
    cfg = small_config()
    torch.manual_seed(0)
    arch = SparseArch(cfg.schema, list(cfg.schema.features), list(cfg.schema.sequences))
    assert arch.side_keys == ["hist_source_categories", "hist_target_categories"]
    assert "category" in arch.seq_keys and "category" not in arch.bag_keys  # moved to the EmbeddingCollection
    assert arch.ec.embedding_configs()[1].feature_names == ["category", "hist_source_categories",
                                                           "hist_target_categories"]
    batch = _batch(small_dataset, cfg)
    with torch.no_grad():
        trained = arch(batch.sparse_features)
    keys = list(cfg.schema.features) + list(cfg.schema.sequences) + cfg.schema.side_keys
    assert set(serving_keys(cfg.schema)) >= set(cfg.schema.side_keys)
    lookup = PaddedLookup(cfg.schema, list(cfg.schema.features), list(cfg.schema.sequences), arch.table_weights())
    served = lookup(padded_ids(batch.sparse_features, cfg.schema, keys))
    assert set(served.sequences) == set(trained.sequences) == set(cfg.schema.sequences) | set(arch.side_keys)
    for name, value in trained.pooled.items():
        torch.testing.assert_close(served.pooled[name], value)
    for name, value in trained.sequences.items():
        torch.testing.assert_close(served.sequences[name], value)
        torch.testing.assert_close(served.lengths[name], trained.lengths[name])
    src = cfg.schema.sequences["hist_source_items"]
    assert torch.equal(trained.lengths["hist_source_categories"], trained.lengths["hist_source_items"])
    assert trained.sequences["hist_source_categories"].shape[1] == src.max_len


@pytest.mark.parametrize("side", [True, False])
def test_attention_steps_add_the_side_embeddings_and_the_query_the_candidates(small_dataset, side):
    """GroupArch's v_seq against a hand-built reference: step = item + category, query = item + category."""
    cfg = small_config() if side else small_config(*NO_SIDE_FEATURES)
    torch.manual_seed(0)
    arch = SparseArch(cfg.schema, list(cfg.schema.features), list(cfg.schema.sequences))
    assert ("category" in arch.seq_keys) == side
    groups = GroupArch(cfg.schema, cfg.model.sequence, ENTITIES)
    batch = _batch(small_dataset, cfg)
    with torch.no_grad():
        sparse = arch(batch.sparse_features)
        got = groups(sparse, batch.dense_features).seq
        expect = []
        for s, column in (("hist_source_items", "hist_source_categories"),
                          ("hist_target_items", "hist_target_categories")):
            query, steps = sparse.pooled["item_id"], sparse.sequences[s]
            if side:
                query, steps = query + sparse.pooled["category"], steps + sparse.sequences[column]
            expect.append(groups.attention[s](query, steps, sparse.lengths[s]))
    torch.testing.assert_close(got, torch.cat(expect, dim=-1))
    assert got.shape[1] == groups.seq_dim == 16  # the sum keeps the width


def test_a_specific_side_feature_is_left_out_of_a_target_only_query(small_dataset):
    """A source-specific side feature is null on target rows: leaving it out of a target-only caller's query
    (which does not look it up) gives what the full model computes on those rows."""
    cfg = small_config("schema.sequences.hist_source_items.side_features={price_bucket: hist_source_prices}")
    groups = GroupArch(cfg.schema, cfg.model.sequence, ENTITIES)
    si = groups.sequence_inputs
    pooled = {"item_id": torch.ones(2, 8), "price_bucket": torch.full((2, 8), 2.0)}
    assert torch.equal(si.query(pooled, "hist_source_items"), torch.full((2, 8), 3.0))
    assert torch.equal(si.query(pooled, "hist_source_items", skip=["price_bucket"]), torch.ones(2, 8))
    assert si.side_features == {"hist_source_items": ["price_bucket"], "hist_target_items": ["category"]}
