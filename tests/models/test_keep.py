"""KEEP (mkt_torchrec.models.baselines.keep): the plug h_m + MLP(K), the knowledge vectors, the frozen extractor
in the trainer, and mem -> tem -> evaluate -> export at 1 and 2 ranks."""

import json
import math
import os

import pytest
import torch

from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.models.baselines import build_train_module
from mkt_torchrec.models.baselines.din import DINArch
from mkt_torchrec.models.baselines.keep import PLUG_LAYER, KeepServing, Knowledge
from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
from mkt_torchrec.training.distributed import launch, run_rank

from tests.conftest import small_config

SETS = ("model.name=keep", "data.batch_size=128", "train.max_steps=3", "train.log_every=1",
        "eval.bootstrap_samples=0", "eval.min_gauc_users=5")


def _cfg(*extra):
    return small_config(*SETS, *extra)


def _batch(data, cfg, entity="target", split="train"):
    return next(iter(ParquetReader(data, split, cfg.schema, cfg.data, entity=entity, training=split == "train")))


def _randomize(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


# ------------------------------------------------------------------------------------------------------------
# The model: knowledge, plug, frozen extractor (one process, no trainer)
# ------------------------------------------------------------------------------------------------------------


def test_one_knowledge_vector_at_a_time_is_what_the_plug_reads_and_serves(small_dataset):
    """model.keep.knowledge (the ablation of KEEP's knowledge vectors): the plug's input is those vectors alone."""
    cfg = _cfg("model.keep.knowledge=[interaction]")
    torch.manual_seed(0)
    model = build_train_module(cfg, "tem").model.eval()
    first = next(m for m in model.dense_arch.plug.modules() if isinstance(m, torch.nn.Linear))
    assert model.parts == ("interaction",) and first.in_features == cfg.model.baselines.dnn[-2]
    batch = _batch(small_dataset, cfg, entity="target")
    torch.nn.init.normal_(model.dense_arch.plug[-1].weight)  # (it starts at zero: the plain model)
    with torch.no_grad():
        plugged = model(batch.sparse_features, batch.dense_features, batch.entity)
        k = model.mem.knowledge(batch.sparse_features, batch.dense_features)
        h = model.dense_arch  # the same forward with K_ui given by hand
        expected = h(h_sparse := model.sparse_arch(batch.sparse_features), batch.dense_features, batch.entity,
                     k.interaction)
    assert h_sparse is not None and torch.equal(plugged, expected)


def test_knowledge_is_the_extractors_user_and_item_embeddings_and_its_last_hidden_layer(small_dataset):
    cfg = _cfg()
    torch.manual_seed(0)
    extractor = build_train_module(cfg, "mem").model.eval()
    batch = _batch(small_dataset, cfg, entity=None)  # both entities' rows: the extractor reads every feature
    b = len(batch)
    k = extractor.knowledge(batch.sparse_features, batch.dense_features)
    dims = {f: cfg.schema.tables[cfg.schema.table_of(f)].dim for f in cfg.schema.features}
    item_features = cfg.schema.features_of("shared")
    assert isinstance(k, Knowledge)
    assert k.user.shape == (b, dims["user_id"])
    assert k.item.shape == (b, sum(dims[f] for f in item_features))
    assert k.interaction.shape == (b, cfg.model.baselines.dnn[-2])
    assert k.vector().shape == (b, extractor.dense_arch.knowledge_dim()) == (b, 8 + 16 + 16)
    for parts, width in ((["user"], 8), (["item"], 16), (["interaction"], 16), (["interaction", "user"], 24)):
        assert extractor.dense_arch.knowledge_dim(parts) == width  # model.keep.knowledge: the ablation's widths
        assert torch.equal(k.vector(parts), torch.cat([getattr(k, p) for p in ("user", "item", "interaction")
                                                       if p in parts], dim=-1))
    # K_u, K_i: the extractor's own table rows of the row's ids (a null id: zeros)
    weights = extractor.sparse_arch.table_weights()
    jts = batch.sparse_features.to_dict()

    def rows_of(feature):
        jt, table = jts[feature], weights[cfg.schema.table_of(feature)]
        out = torch.zeros(b, table.shape[1])
        offsets = jt.offsets()
        for i in range(b):
            for j in range(int(offsets[i]), int(offsets[i + 1])):
                out[i] += table[jt.values()[j]]
        return out

    torch.testing.assert_close(k.user, rows_of("user_id"))
    torch.testing.assert_close(k.item, torch.cat([rows_of(f) for f in item_features], dim=-1))
    # K_ui is the layer before the logit: the DNN's last linear layer on it gives the extractor's own logits
    with torch.no_grad():
        logits = extractor(batch.sparse_features, batch.dense_features, batch.entity)
        last = extractor.dense_arch.dnn.net[-1]
        torch.testing.assert_close(last(k.interaction).squeeze(-1), logits, rtol=1e-5, atol=1e-5)


def test_the_plug_adds_mlp_of_k_to_the_hidden_layer_and_nothing_else(small_dataset):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_train_module(cfg, "tem").model.eval()
    arch = model.dense_arch
    plug_out = arch.plug[-1]
    assert not plug_out.weight.any() and not plug_out.bias.any()  # starts as the plain downstream model
    assert plug_out.out_features == cfg.model.baselines.dnn[PLUG_LAYER]
    batch = _batch(small_dataset, cfg)
    with torch.no_grad():
        k = model.mem.knowledge(batch.sparse_features, batch.dense_features).vector()
    # the din baseline's target model, with the same tensors (everything of the plugged model but plug.*)
    plain = DINArch(cfg.schema, "target", cfg.model.baselines.dnn, cfg.model.baselines.attention_mlp).eval()
    state = {n: v for n, v in arch.state_dict().items() if not n.startswith("plug.")}
    plain.load_state_dict(state)
    assert set(plain.state_dict()) == set(state)
    sparse = model.sparse_arch(batch.sparse_features)
    args = (sparse, batch.dense_features, batch.entity)
    with torch.no_grad():
        zeroed = arch(*args, k)
        torch.testing.assert_close(zeroed, plain(*args), rtol=0, atol=0)  # MLP(K) = 0: the plain model
        torch.testing.assert_close(model(batch.sparse_features, batch.dense_features, batch.entity), zeroed)
        _randomize(arch.plug)
        plugged = arch(*args, k)
        # reference: DIN's own forward with MLP(K) added to the output of hidden layer PLUG_LAYER (its Dice)
        dice = plain.dnn.net[2 * PLUG_LAYER + 1]
        handle = dice.register_forward_hook(lambda mod, inp, out: out + arch.plug(k))
        try:
            reference = plain(*args)
        finally:
            handle.remove()
    assert (plugged - zeroed).abs().max() > 1e-3  # the plug changes the scores ...
    torch.testing.assert_close(plugged, reference, rtol=1e-5, atol=1e-6)  # ... exactly by h_m + MLP(K)


def test_stage_tem_trains_the_downstream_model_and_the_plug_not_the_extractor(small_dataset):
    cfg = _cfg()
    torch.manual_seed(0)
    module = build_train_module(cfg, "tem")
    _randomize(module.model.dense_arch.plug)  # (its zero last layer would leave the first without a gradient)
    module.train()
    assert not module.model.mem.training  # Dice of the extractor keeps its moving averages
    frozen_buffers = {n: v.clone() for n, v in module.model.mem.named_buffers()}
    loss, out = module(_batch(small_dataset, cfg))
    loss.backward()
    frozen = {n: p for n, p in module.named_parameters() if n.startswith("model.mem.")}
    own = {n: p for n, p in module.named_parameters() if not n.startswith("model.mem.")}
    assert frozen and not [n for n, p in frozen.items() if p.requires_grad or p.grad is not None]
    assert not [n for n, p in own.items() if p.grad is None or not p.grad.any()]
    for n, v in module.model.mem.named_buffers():
        assert torch.equal(v, frozen_buffers[n]), n


# ------------------------------------------------------------------------------------------------------------
# The trainer: mem -> tem -> evaluate -> export, 1 and 2 ranks; the extractor frozen under the fused optimizer
# ------------------------------------------------------------------------------------------------------------


def _local(value):
    """This rank's tensors of a state-dict value (a ShardedTensor's local shards)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(value, ShardedTensor):
        return [s.tensor.detach().clone() for s in value.local_shards()]
    return [value.detach().clone()]


def _frozen_under_training(cfg, data, mem_run):
    """Stage tem assembled as the trainer does (plan, DMP, fused embedding optimizer), its extractor loaded from the
    mem run, 3 steps through TorchRec's train pipeline: which of this rank's tensors changed."""
    from mkt_torchrec.training.assembly import assemble
    from mkt_torchrec.training.distributed import all_gather_objects, init_distributed
    from mkt_torchrec.training.feed import _weighted, make_pipeline
    from mkt_torchrec.training.mem_transfer import load_mem_into_stage2

    info = init_distributed()
    asm = assemble(cfg, "tem", info)
    load_mem_into_stage2(asm.model, mem_run)
    optimized = list(asm.optimizer.params)  # parameter names, as named_parameters() gives them
    before = {k: _local(v) for k, v in asm.model.state_dict().items()}
    reader = ParquetReader(data, "train", cfg.schema, cfg.data, rank=info.rank, world_size=info.world_size,
                           entity="target")
    batches = [_weighted(b, float(len(b) * info.world_size), info.world_size, True)
               for _, b in zip(range(3), reader, strict=False)]
    asm.model.train()
    pipeline = make_pipeline(asm.model, asm.optimizer, info.device)
    feed = iter(batches)
    for _ in batches:
        pipeline.progress(feed)
    after = asm.model.state_dict()
    changed = sorted(k for k, v in before.items()
                     if any(not torch.equal(a, b) for a, b in zip(v, _local(after[k]), strict=True)))
    return all_gather_objects({"changed": changed, "keys": sorted(before), "optimized": optimized}, info.world_size)


def _mem_tem_evaluate(cfg, data, root):
    """Every rank: stage mem, stage tem from it, evaluate the tem run, then the frozen check."""
    from mkt_torchrec.training.recipe import train
    from mkt_torchrec.training.scoring import evaluate

    mem, tem = os.path.join(root, "mem"), os.path.join(root, "tem")
    train(cfg, "mem", data, mem)
    summary = train(cfg, "tem", data, tem, mem_run=mem)
    metrics = evaluate(cfg, tem, data)
    return {"mem": mem, "tem": tem, "summary": summary, "metrics": metrics,
            "frozen": _frozen_under_training(cfg, data, mem)}


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def keep_runs(request, small_dataset, tmp_path_factory):
    root = str(tmp_path_factory.mktemp(f"keep_{request.param}"))
    cfg = _cfg()
    if request.param == 1:  # a world of one in this process
        return request.param, run_rank(_mem_tem_evaluate, cfg, small_dataset, root)
    return request.param, launch(2, _mem_tem_evaluate, cfg, small_dataset, root)


def test_mem_then_tem_trains_and_evaluates(keep_runs, small_dataset):
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.mem_transfer import MEM_RECORD

    world, out = keep_runs
    assert out["summary"]["steps"] == 3 and out["summary"]["world_size"] == world
    assert math.isfinite(out["summary"]["loss"])
    metrics = out["metrics"]
    assert metrics["stage"] == "tem" and metrics["world_size"] == world
    test_rows = json.load(open(os.path.join(small_dataset, "manifest.json")))["rows"]["test"]["target"]
    assert metrics["target"]["rows"] == test_rows  # every target test row scored once
    assert 0.0 <= metrics["target"]["auc"] <= 1.0 and 0.0 <= metrics["target"]["gauc"] <= 1.0
    # the tem checkpoint records the mem checkpoint it was trained with and holds no copy of the extractor
    ckpt = checkpoint.latest_checkpoint(out["tem"])
    record = checkpoint.read_extra(ckpt)[MEM_RECORD]
    assert record["path"] == os.path.abspath(checkpoint.final_checkpoint(out["mem"]))
    keys = set(checkpoint.SafeFileSystemReader(ckpt).read_metadata().state_dict_metadata)
    assert not [k for k in keys if k.startswith("model.model.mem.")]
    assert any(k.startswith("model.model.dense_arch.plug.") for k in keys)
    assert json.load(open(os.path.join(out["tem"], "run.json")))["mem_run"] == os.path.abspath(out["mem"])


def test_the_extractor_is_frozen_under_the_trainers_optimizers(keep_runs):
    world, out = keep_runs
    ranks = out["frozen"]
    assert len(ranks) == world
    for rank in ranks:
        assert not [n for n in rank["optimized"] if n.startswith("model.mem.")], rank["optimized"]
        assert [n for n in rank["optimized"] if n.startswith("model.sparse_arch.")]  # the downstream tables are
        assert [k for k in rank["keys"] if k.startswith("model.mem.sparse_arch.")]  # tables held on this rank
        assert not [k for k in rank["changed"] if k.startswith("model.mem.")], rank["changed"]
        # and training did change the downstream model: its plug, dense layers ...
        assert [k for k in rank["changed"] if k.startswith("model.dense_arch.plug.")]
    # ... and its embedding tables (wherever the plan put them)
    assert [k for r in ranks for k in r["changed"] if k.startswith("model.sparse_arch.")]


def test_the_exported_model_scores_like_the_trained_one(keep_runs, small_dataset):
    """The serving model, loaded (DCP, resharded) from the run at either world size, scores the test rows as the
    trained model does; at 2 ranks it is also exported with ``torch.export`` (a single-process step whose input is
    that same serving model, whatever the world size that trained it: traced once here, to save 12 s)."""
    from mkt_torchrec.rundir import RunDir
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.export import export_run, serving_from_run
    from mkt_torchrec.training.mem_transfer import load_unsharded

    world, out = keep_runs
    run = out["tem"]
    cfg = RunDir(run).config()
    batch = _batch(small_dataset, cfg, split="test")
    model = load_unsharded(cfg, "tem", checkpoint.latest_checkpoint(run)).model.eval()  # extractor: mem run's
    mem = load_unsharded(cfg, "mem", checkpoint.final_checkpoint(out["mem"])).model
    for key, value in mem.state_dict().items():  # the extractor stage tem used is the mem run's, unchanged
        assert torch.equal(model.mem.state_dict()[key], value), key
    with torch.no_grad():
        reference = torch.sigmoid(model(batch.sparse_features, batch.dense_features, batch.entity))
    ids = padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema))
    if world == 1:
        _, serving = serving_from_run(run)
        assert isinstance(serving, KeepServing)
    else:
        serving = load_serving(export_run(run, small_dataset))
    torch.testing.assert_close(serving(ids, batch.dense_features), reference, rtol=1e-5, atol=1e-6)
