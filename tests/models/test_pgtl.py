"""PGTL (mkt_torchrec.models.baselines.pgtl) and its relation table (mkt_torchrec.data.relations): the table is the
train split's alone, relations in order with their counts, the gradient reversal, the discriminator's inputs,
the Table 3 ablations, and training / evaluation / export end to end at 1 and 2 ranks."""

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import torch

from mkt_torchrec.config import ConfigError
from mkt_torchrec.data import relations
from mkt_torchrec.data.dataset import DatasetWriter, open_dataset
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.data.schema import map_ids
from mkt_torchrec.models.baselines import build_train_module
from mkt_torchrec.models.baselines.pgtl import (PGTLArch, attach_loss, dann_lambda, reverse_gradient, serving_model,
                                                serving_schema)
from mkt_torchrec.modules.sparse import SparseFeatures
from mkt_torchrec.training.distributed import launch, run_rank

from tests.conftest import small_config

PGTL = ("model.name=pgtl", "data.batch_size=64")

# A tiny marketplace whose relations are known by construction. Source items 1-6, target items 1 (the same id as
# source item 1), 101 (category 20: source items 2 and 6), 102 (co-clicked with source item 3 by user 5) and 103
# (nothing in the train split). The validation rows (each entity's last quarter of the train files: user 7) and
# the test rows (user 6, source item 5 of category 88) would relate 102 and 103 to items 4 and 5: a table that read
# them would show it.
#              user item category label
SOURCE_TRAIN = [(1, 1, 10, 0), (2, 2, 20, 0), (5, 3, 30, 1), (3, 1, 10, 0), (4, 2, 20, 0), (8, 3, 30, 0),
                (9, 6, 20, 0), (9, 6, 20, 0), (10, 6, 20, 0), (7, 4, 40, 1), (7, 4, 40, 1), (7, 4, 40, 1)]
TARGET_TRAIN = [(1, 1, 30, 0), (2, 101, 20, 0), (5, 102, 77, 1), (3, 103, 88, 0), (4, 101, 20, 1), (8, 1, 30, 0),
                (7, 102, 77, 1), (7, 103, 88, 1)]
SOURCE_TEST = [(6, 4, 40, 1), (11, 5, 88, 0)]
TARGET_TEST = [(6, 102, 77, 1), (6, 103, 88, 1)]
FRACTION = "data.validation_fraction=0.25"  # 3 of 12 source rows, 2 of 8 target rows: user 7's


def _rows(cfg, entity, rows):
    n = len(rows)
    cols = {"entity": [entity] * n, "label": [r[3] for r in rows], "user_id": [r[0] for r in rows],
            "age": [1] * n, "gender": [0] * n, "item_id": [r[1] for r in rows], "category": [r[2] for r in rows]}
    for name, f in cfg.schema.features.items():
        if name not in cols:
            cols[name] = [1 if f.entity == ("source", "target")[entity] else None] * n
    for name in list(cfg.schema.sequences) + cfg.schema.side_keys:
        cols[name] = [[] for _ in range(n)]
    for name in cfg.schema.dense:
        cols[name] = [0.5] * n
    return pa.table(cols)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = small_config(*PGTL, FRACTION)
    out = str(tmp_path_factory.mktemp("pgtl") / "tiny")
    with DatasetWriter(out, cfg.schema, row_group_rows=100) as w:
        w.write("train", _rows(cfg, 0, SOURCE_TRAIN))
        w.write("train", _rows(cfg, 1, TARGET_TRAIN))
        w.write("test", _rows(cfg, 0, SOURCE_TEST))
        w.write("test", _rows(cfg, 1, TARGET_TEST))
    return out


def _table(data, *sets):
    cfg = small_config(*PGTL, FRACTION, *sets)
    relations._CACHE.clear()
    return relations.related_items(data, open_dataset(data, cfg.schema), cfg.schema, cfg.data, log=False), cfg


def _related(table):
    return {int(t): table.related[a:b].tolist()
            for t, a, b in zip(table.target_ids, table.offsets[:-1], table.offsets[1:], strict=True)}


def _rows_of(cfg, *raw):
    t = cfg.schema.tables["item_id"]
    return [int(v) for v in map_ids(np.array(raw, dtype=np.int64), "item_id", t)]


# ------------------------------------------------------------------------------------------------------------
# The relation table
# ------------------------------------------------------------------------------------------------------------


def test_relation_table_reads_the_train_rows_only(tiny):
    table, cfg = _table(tiny)
    assert _related(table) == {1: _rows_of(cfg, 1), 101: _rows_of(cfg, 6, 2), 102: _rows_of(cfg, 3)}
    assert table.used == {"item_id": 1, "category": 1, "co_click": 1, "none": 1}
    leaky, _ = _table(tiny, "data.validation_fraction=0")  # user 7's rows now train: 102 and 103 meet item 4
    # (one co-clicking user each: the more shown item 4 first)
    assert _related(leaky)[102] == _rows_of(cfg, 4, 3) and _related(leaky)[103] == _rows_of(cfg, 4)


def test_relations_are_taken_in_the_configured_order_with_k_items_each(tiny):
    table, cfg = _table(tiny, "data.related_items.relations=[category, item_id, co_click]",
                        "data.related_items.max_related=1")
    # target item 1 has category 30, source item 3's; 101 keeps the more shown of its two (item 6)
    assert _related(table) == {1: _rows_of(cfg, 3), 101: _rows_of(cfg, 6), 102: _rows_of(cfg, 3)}
    assert table.used == {"category": 2, "item_id": 0, "co_click": 1, "none": 1}
    only_co, _ = _table(tiny, "data.related_items.relations=[co_click]")
    assert _related(only_co) == {102: _rows_of(cfg, 3)}
    assert only_co.used == {"co_click": 1, "none": 3}


def test_negative_values_relate_and_nulls_do_not():
    """Raw ids are int64 (hashed ids may be negative); only a null value relates nothing."""
    null = relations.NULL
    items = np.array([[0, 7, -5], [1, 50, -5], [1, 51, null], [0, 8, null]], dtype=np.int64)
    out, used = relations.relate(items, np.ones(4, dtype=np.int64), np.zeros((0, 3), dtype=np.int64), ["category"],
                                 ["category"], "item_id", 8)
    assert {t: r.tolist() for t, r in out.items()} == {50: [7]} and used == {"category": 1, "none": 1}


def test_the_reader_adds_the_key_on_target_rows(tiny):
    cfg = small_config(*PGTL, FRACTION)
    relations._CACHE.clear()
    expect = {_rows_of(cfg, t)[0]: _rows_of(cfg, *r) for t, r in ((1, [1]), (101, [6, 2]), (102, [3]), (103, []))}
    for split in ("train", "test"):
        batch = next(iter(ParquetReader(tiny, split, cfg.schema, cfg.data, training=False)))
        assert batch.sparse_features.keys()[-1] == "related_items"
        jt = batch.sparse_features.to_dict()
        related, items = jt["related_items"], jt["item_id"]
        seen = set()
        for i in range(len(batch)):
            got = related.values()[related.offsets()[i]:related.offsets()[i + 1]].tolist()
            item = int(items.values()[items.offsets()[i]])
            if batch.entity[i] == 0:
                assert got == []
            else:  # on a test row too: the train split's relation, nothing more
                assert got == expect[item]
                seen.add(item)
        assert seen == set(expect) if split == "train" else len(seen) == 2
    # a DataLoader worker gets the table with its reader's plan
    workers = dataclasses.replace(cfg.data, num_workers=1)
    pooled = next(iter(ParquetReader(tiny, "train", cfg.schema, workers, training=False)))
    assert torch.equal(pooled.sparse_features["related_items"].values(),
                       next(iter(ParquetReader(tiny, "train", cfg.schema, cfg.data, training=False)))
                       .sparse_features["related_items"].values())


def test_no_relation_in_the_data_is_a_one_line_error(small_dataset, tiny):
    # the synthetic marketplace namespaces post ids: no source item has a post's id
    cfg = small_config(*PGTL, "data.related_items.relations=[item_id]")
    relations._CACHE.clear()
    with pytest.raises(ValueError, match=r"relations \['item_id'\]: no target item") as e:
        ParquetReader(small_dataset, "train", cfg.schema, cfg.data)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data\.related_items\.relations: 'brand' is neither co_click"):
        small_config(*PGTL, "data.related_items.relations=[brand]")
    assert small_config().data.related_items.key == ""  # other models read no such key


# ------------------------------------------------------------------------------------------------------------
# Gradient reversal, the discriminator, the loss
# ------------------------------------------------------------------------------------------------------------


def test_gradient_reversal_flips_the_gradient_with_the_lambda_schedule():
    x, w = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    for step in (0, 100, 250, 1000, 5000):
        lam = dann_lambda(torch.tensor(step), 1000)
        p = min(1.0, step / 1000)
        assert float(lam) == pytest.approx(2 / (1 + np.exp(-10 * p)) - 1, rel=1e-6)
        x.grad = None
        y = reverse_gradient(x, lam)
        assert torch.equal(y, x)
        (y * w).sum().backward()
        torch.testing.assert_close(x.grad, -float(lam) * w)
    assert float(dann_lambda(torch.tensor(0), 1000)) == 0.0


def test_attached_loss_back_propagates_as_a_term_of_the_loss():
    a, b = torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)
    out = attach_loss(a * 2, (b ** 2).sum())
    torch.testing.assert_close(out, a * 2)
    out.sum().backward()
    torch.testing.assert_close(a.grad, torch.full((5,), 2.0))
    torch.testing.assert_close(b.grad, 2 * b.detach())


def _features(cfg, batch, k=3, seed=0):
    """Random SparseFeatures of every field of the schema, with ``k`` related items per target row but row 1's."""
    g = torch.Generator().manual_seed(seed)
    pooled = {f: torch.randn(batch, 8, generator=g) for f in cfg.schema.features}
    seqs = {s: torch.randn(batch, 4, 8, generator=g) for s in list(cfg.schema.sequences) + cfg.schema.side_keys}
    lengths = {s: torch.full((batch,), 4) for s in seqs}
    seqs["related_items"] = torch.randn(batch, k, 8, generator=g)
    lengths["related_items"] = torch.full((batch,), k)
    return SparseFeatures(pooled, seqs, lengths)


def test_the_discriminator_tells_source_rows_from_target_rows_priors():
    cfg = small_config(*PGTL)
    torch.manual_seed(0)
    arch = PGTLArch(cfg.schema, cfg.model.pgtl, "related_items").train()
    entity = torch.tensor([0, 1, 1, 0, 1])
    sparse = _features(cfg, 5)
    sparse.lengths["related_items"][2] = 0  # a target row without related items
    sparse.sequences["related_items"][2] = 0.0
    seen = []
    arch.discriminator.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
    dense = torch.randn(5, len(cfg.schema.dense))
    arch(sparse, dense, entity)
    items = torch.stack(arch.items(sparse, dense), dim=1)
    z_s = arch.generators["source"](arch.attention["source"](items).flatten(1))
    mean = sparse.sequences["related_items"].mean(dim=1, keepdim=True)  # (B, 1, D): x^p
    z_p = arch.generators["prior"](arch.attention["source"](mean).flatten(1))
    torch.testing.assert_close(seen[0][[0, 3]], z_s[[0, 3]].detach())
    torch.testing.assert_close(seen[0][[1, 4]], z_p[[1, 4]].detach())  # the prior's, not the target fields'
    # the same rows with other target item fields: the target rows' samples do not move
    other = SparseFeatures({**sparse.pooled, "style": torch.randn(5, 8)}, sparse.sequences, sparse.lengths)
    arch(other, dense, entity)
    torch.testing.assert_close(seen[1][[1, 4]], seen[0][[1, 4]])
    # its loss: labels source 0 / prior 1, target rows without a prior left out (reference by hand)
    logit = arch.discriminator(seen[0]).squeeze(-1)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(logit, entity.float(), reduction="none")
    ref = ce[[0, 1, 3, 4]].mean()
    loss = arch.adversarial_loss(z_s, z_p, entity, sparse.lengths["related_items"] > 0)
    torch.testing.assert_close(loss, ref)
    assert int(arch.step) == 2  # two training forwards
    arch.eval()(sparse, dense, entity)
    assert int(arch.step) == 2  # evaluation does not count


def test_the_adversarial_gradient_reaches_the_generators_reversed():
    """The discriminator descends its cross-entropy; the generators G_f^s / G_f^p get -lambda times that gradient."""
    cfg = small_config(*PGTL, "model.pgtl.lambda_steps=1")
    torch.manual_seed(0)
    arch = PGTLArch(cfg.schema, cfg.model.pgtl, "related_items").train()
    arch.step.fill_(5)  # lambda = 2 / (1 + e^-10) - 1
    entity, sparse = torch.tensor([0, 1, 0, 1]), _features(cfg, 4)
    dense = torch.randn(4, len(cfg.schema.dense))
    items = torch.stack(arch.items(sparse, dense), dim=1)
    z_s = arch.generators["source"](arch.attention["source"](items).flatten(1))
    mean = sparse.sequences["related_items"].mean(dim=1, keepdim=True)
    z_p = arch.generators["prior"](arch.attention["source"](mean).flatten(1))
    has = torch.ones(4, dtype=torch.bool)
    reversed_ = torch.autograd.grad(arch.adversarial_loss(z_s, z_p, entity, has), [z_p] + list(
        arch.discriminator.parameters()), retain_graph=True)
    # the same loss without the reversal
    sample = torch.where((entity == 1).unsqueeze(-1), z_p, z_s)
    plain_ce = torch.nn.functional.binary_cross_entropy_with_logits(arch.discriminator(sample).squeeze(-1),
                                                                    entity.float())
    plain = torch.autograd.grad(plain_ce, [z_p] + list(arch.discriminator.parameters()))
    lam = float(dann_lambda(torch.tensor(5), 1))
    torch.testing.assert_close(reversed_[0], -lam * plain[0])
    for r, p in zip(reversed_[1:], plain[1:], strict=True):
        torch.testing.assert_close(r, p)


@pytest.mark.parametrize("ablation", ["no_specific_embedding", "no_prior"])
def test_the_papers_ablations_are_reachable_by_config(small_dataset, ablation):
    cfg = small_config(*PGTL, f"model.pgtl.ablation={ablation}")
    torch.manual_seed(0)
    module = build_train_module(cfg, "mem")
    arch = module.model.dense_arch
    batch = next(iter(ParquetReader(small_dataset, "train", cfg.schema, cfg.data)))
    loss, _ = module(batch)
    loss.backward()
    if ablation == "no_specific_embedding":
        assert arch.attention is None  # the shared embeddings only
    else:  # the target item's fields stand in for the prior: the related items change nothing
        first = next(m for m in arch.generators["prior"].modules() if isinstance(m, torch.nn.Linear))
        assert first.in_features == arch.items.out_dim
        module.eval()
        sparse = module.model.sparse_arch(batch.sparse_features)
        seqs = dict(sparse.sequences)
        seqs["related_items"] = torch.randn_like(seqs["related_items"])
        with torch.no_grad():
            a = arch(sparse, batch.dense_features, batch.entity)
            b = arch(SparseFeatures(sparse.pooled, seqs, sparse.lengths), batch.dense_features, batch.entity)
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------------
# End to end: train (TorchRec's sharded pipeline), evaluate, export, at 1 and 2 ranks
# ------------------------------------------------------------------------------------------------------------


def _train_and_evaluate(cfg, data, run):
    import hashlib

    import torch.distributed as dist

    from mkt_torchrec.training.distributed import all_gather_objects
    from mkt_torchrec.training.recipe import train
    from mkt_torchrec.training.scoring import evaluate

    summary = train(cfg, "mem", data, run)
    metrics = evaluate(cfg, run, data)
    table = relations.related_items(data, open_dataset(data, cfg.schema), cfg.schema, cfg.data, log=False)
    digest = hashlib.sha256(table.target_ids.tobytes() + table.related.tobytes()).hexdigest()
    digests = all_gather_objects(digest, dist.get_world_size())
    return {"summary": summary, "metrics": metrics, "digests": digests}


@pytest.mark.parametrize("nproc", [1, 2])
def test_trains_evaluates_and_exports_at_one_and_two_ranks(small_dataset, tmp_path, nproc):
    """A world of one trains in this process; two ranks through torch elastic. Both runs' serving models score the
    target test rows like the trained model; the two-rank run's is also exported (``torch.export``) and loaded."""
    from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.mem_transfer import load_unsharded

    cfg = small_config(*PGTL, "train.max_steps=4", "train.log_every=2", "eval.bootstrap_samples=0",
                       "data.batch_size=256")
    run = str(tmp_path / "run")
    out = run_rank(_train_and_evaluate, cfg, small_dataset, run) if nproc == 1 else \
        launch(nproc, _train_and_evaluate, cfg, small_dataset, run)
    assert out["summary"]["steps"] == 4 and np.isfinite(out["summary"]["loss"])
    assert len(out["digests"]) == nproc and len(set(out["digests"])) == 1  # every rank built the same table
    metrics = out["metrics"]
    assert metrics["world_size"] == nproc and metrics["source"]["rows"] > 0 and metrics["target"]["rows"] > 0
    assert 0 <= metrics["target"]["auc"] <= 1
    model = load_unsharded(cfg, "mem", checkpoint.latest_checkpoint(run)).model.eval()
    assert int(model.dense_arch.step) == 4  # lambda's step count is in the checkpoint
    batch = next(iter(ParquetReader(small_dataset, "test", cfg.schema, cfg.data, training=False, entity="target")))
    assert (batch.sparse_features["related_items"].lengths() > 0).any()
    with torch.no_grad():
        reference = torch.sigmoid(model(batch.sparse_features, batch.dense_features, batch.entity))
    schema = serving_schema(cfg)
    ids = padded_ids(batch.sparse_features, schema, serving_keys(schema))
    assert ids["related_items"].shape == (len(batch), cfg.data.related_items.max_related)
    serving = serving_model(cfg, model).eval()
    if nproc == 2:  # `mkt export`'s path: the run's own config and checkpoint, the test rows as the example
        from mkt_torchrec.training.export import export_run

        serving = load_serving(export_run(run, small_dataset))
    with torch.no_grad():
        torch.testing.assert_close(serving(ids, batch.dense_features), reference, rtol=1e-5, atol=1e-6)
        without = dict(ids, related_items=torch.full_like(ids["related_items"], -1))  # the prior matters
        assert not torch.allclose(serving(without, batch.dense_features), reference)
