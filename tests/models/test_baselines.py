"""The paper's ten baselines (mkt_torchrec.models.baselines): registry, forward / backward on real batches, the
trainer's sharded pipeline, the transfer contract, serving export."""

import json
import os

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mkt_torchrec.config import ConfigError
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec import registry
from mkt_torchrec.models.baselines import MODELS, build_train_module, final_stage
from mkt_torchrec.models.baselines.din import ActivationUnit
from mkt_torchrec.models.baselines.fibinet import Bilinear
from mkt_torchrec.models.baselines.minet import ItemAttention
from mkt_torchrec.models.baselines.star import PartitionedNorm
from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
from mkt_torchrec.modules.sparse import SparseArch
from mkt_torchrec.planning.embedding_optimizer import FROZEN_MODULE
from mkt_torchrec.training.distributed import launch

from tests.conftest import small_config

STAGE_RUNS = [(name, stage) for name, spec in MODELS.items() for stage in spec.stages]
SERVED = (("din", "tem"), ("star", "mem"))  # a single-domain and a joint model (which zero-fills source features)
BATCH = "data.batch_size=64"


def _cfg(name, *extra):
    return small_config(f"model.name={name}", BATCH, *extra)


def _batch(data, cfg, entity, split="train"):
    return next(iter(ParquetReader(data, split, cfg.schema, cfg.data, entity=entity, training=split == "train")))


def _rows(batch, index):
    """The batch's rows ``index`` (a list), rebuilt through the KJT."""
    jts = batch.sparse_features.to_dict()
    values, lengths = [], []
    for jt in jts.values():
        offsets = jt.offsets()
        for i in index:
            values.append(jt.values()[offsets[i]: offsets[i + 1]])
            lengths.append(int(offsets[i + 1] - offsets[i]))
    kjt = KeyedJaggedTensor(keys=list(jts), values=torch.cat(values), lengths=torch.tensor(lengths))
    idx = torch.tensor(index)
    return Batch(kjt, batch.dense_features[idx], batch.labels[idx], batch.entity[idx], batch.user_id[idx])


# ------------------------------------------------------------------------------------------------------------
# Registry and config
# ------------------------------------------------------------------------------------------------------------


def test_registry_has_the_papers_families_and_stages():
    """The paper's ten baselines, and KEEP, PGTL and PEPNet (the methods MKT's users weigh it against)."""
    names = set(registry.model_names()) - {"mkt"}  # what the config's model.name accepts
    assert set(MODELS) == names and len(MODELS) == 13
    families = {name: spec.family for name, spec in MODELS.items()}
    assert families == {"mlp": "single_domain", "din": "single_domain", "fibinet": "single_domain",
                        "mmoe": "joint", "ple": "joint", "star": "joint", "conet": "joint",
                        "minet": "pretrain_finetune", "finetune": "pretrain_finetune", "ctnet": "pretrain_finetune",
                        "keep": "pretrain_finetune", "pgtl": "joint", "pepnet": "joint"}
    for name, spec in MODELS.items():
        assert spec.name == name and spec.paper
        stages = {s: (st.entity, st.transfer) for s, st in spec.stages.items()}
        if spec.family == "single_domain":
            assert stages == {"tem": ("target", ())}
        elif spec.family == "joint":
            assert stages == {"mem": (None, ())}
        else:
            assert list(stages) == ["mem", "tem"] and stages["tem"][0] == "target"
            assert bool(stages["tem"][1]) != spec.stages["tem"].frozen_mem  # tensors transferred, or KEEP's frozen
            assert stages["mem"][1] == ()
    assert MODELS["finetune"].stages["mem"].entity == MODELS["ctnet"].stages["mem"].entity == "source"
    assert final_stage("mmoe") == "mem" and final_stage("ctnet") == "tem" and final_stage("din") == "tem"


def test_config_names_a_bad_model_or_an_ablation_of_a_baseline():
    assert small_config().model.name == "mkt"
    with pytest.raises(ConfigError, match=r"model\.name: expected one of"):
        small_config("model.name=dien")
    with pytest.raises(ConfigError, match=r"model\.ablation: the ablations are MKT's"):
        small_config("model.name=din", "model.ablation=no_pdl")
    with pytest.raises(ConfigError, match=r"model\.baselines\.tower: the last size must be 1"):
        small_config("model.name=mmoe", "model.baselines.tower=[16, 2]")
    with pytest.raises(ValueError, match="has no stage 'mem'"):
        build_train_module(_cfg("din"), "mem")


# ------------------------------------------------------------------------------------------------------------
# Forward / backward on real batches
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,stage", STAGE_RUNS)
def test_forward_backward_gives_every_dense_parameter_a_gradient(small_dataset, name, stage):
    cfg = _cfg(name)
    entity = MODELS[name].stages[stage].entity
    torch.manual_seed(0)
    module = build_train_module(cfg, stage)
    arch = module.get_submodule(module.trainable_sparse_arch)
    assert arch is module.model.sparse_arch and isinstance(arch, SparseArch)
    frozen = FROZEN_MODULE.get(stage, "") + "."  # KEEP's stage tem holds its frozen extractor there, as MKT's TEM
    trains = lambda n: not n.startswith(frozen)  # noqa: E731   # its MEM (tests/models/test_keep.py: it never changes)
    collections = [n for n, m in module.named_modules() if type(m).__name__ in ("EmbeddingBagCollection",
                                                                                  "EmbeddingCollection") and trains(n)]
    assert collections and all(n.startswith("model.sparse_arch.") for n in collections)  # every table trains
    batch = _batch(small_dataset, cfg, entity)
    codes = set(batch.entity.tolist())
    assert codes == ({0, 1} if entity is None else {("source", "target").index(entity)})
    loss, out = module(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert out.logits.shape == (len(batch),) and torch.isfinite(out.logits).all()
    loss.backward()
    dense = {n: p for n, p in module.named_parameters() if not n.startswith("model.sparse_arch.") and trains(n)}
    assert dense and not [n for n, p in dense.items() if p.grad is None]
    assert any(p.grad.abs().sum() > 0 for p in dense.values())


def test_bf16_autocast_and_fp16_tables_keep_the_loss_in_fp32(small_dataset):
    for name, stage in STAGE_RUNS:
        cfg = _cfg(name, "train.embedding_precision=fp16", "train.precision=bf16")
        module = build_train_module(cfg, stage)
        module.autocast_device = "cpu"  # what the trainer sets for train.precision=bf16
        loss, out = module(_batch(small_dataset, cfg, MODELS[name].stages[stage].entity))
        loss.backward()
        assert loss.dtype == out.logits.dtype == torch.float32 and torch.isfinite(loss), name


@pytest.mark.parametrize("name", ["mmoe", "ple", "star", "conet", "minet"])
def test_joint_models_score_a_row_by_its_own_entity_alone(small_dataset, name):
    """In a mixed batch a target row's logit is the one it gets in a batch of target rows only (eval mode)."""
    cfg = _cfg(name)
    torch.manual_seed(0)
    model = build_train_module(cfg, "mem").model.eval()
    batch = _batch(small_dataset, cfg, None)
    target = [i for i, e in enumerate(batch.entity.tolist()) if e == 1]
    with torch.no_grad():
        mixed = model(batch.sparse_features, batch.dense_features, batch.entity)
        alone = _rows(batch, target)
        only = model(alone.sparse_features, alone.dense_features, alone.entity)
    torch.testing.assert_close(only, mixed[target], rtol=1e-5, atol=1e-5)


def test_transfer_prefixes_name_the_same_tensors_in_both_stages():
    for name, spec in MODELS.items():
        if "tem" not in spec.stages or not spec.stages["tem"].transfer:
            continue
        cfg = _cfg(name)
        mem = build_train_module(cfg, "mem", torch.device("meta")).state_dict()
        tem = build_train_module(cfg, "tem", torch.device("meta")).state_dict()
        prefixes = spec.stages["tem"].transfer
        moved = [k for k in tem if k.startswith(prefixes)]
        assert moved, name
        for k in moved:
            assert k in mem and mem[k].shape == tem[k].shape, (name, k)
        if name == "ctnet":  # embeddings only: the user, entity-shared and target-specific tables
            assert sorted(k.split(".")[-2] for k in moved) == sorted(
                ["user_id", "age", "gender", "item_id", "category", "style", "post_length"])
        else:
            assert moved == list(tem)  # all of it


# ------------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references of the numeric layers
# ------------------------------------------------------------------------------------------------------------


def test_partitioned_norm_is_batch_norm_of_each_domains_rows():
    torch.manual_seed(0)
    x, entity = torch.randn(10, 3) * 3 + 1, torch.tensor([0, 1, 1, 0, 0, 1, 1, 1, 0, 0])
    norm = PartitionedNorm(3)
    with torch.no_grad():
        norm.domain_gamma.copy_(torch.rand(2, 3) + 0.5)
        norm.domain_beta.copy_(torch.randn(2, 3))
    out = norm(x, entity)
    for code in (0, 1):
        rows = entity == code
        xs = x[rows]
        ref = (xs - xs.mean(0)) / torch.sqrt(xs.var(0, unbiased=False) + 1e-5)
        ref = ref * norm.domain_gamma[code] + norm.domain_beta[code]
        torch.testing.assert_close(out[rows], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.running_mean[code], 0.1 * xs.mean(0), rtol=1e-5, atol=1e-6)
    only_source = norm.running_mean[1].clone()
    norm(x[entity == 0], entity[entity == 0])  # a batch without target rows leaves the target averages alone
    torch.testing.assert_close(norm.running_mean[1], only_source)


def test_din_activation_unit_is_the_unnormalised_weighted_sum_of_valid_behaviours():
    torch.manual_seed(0)
    unit = ActivationUnit(4, [8, 4])
    q, keys, lengths = torch.randn(3, 4), torch.randn(3, 5, 4), torch.tensor([5, 2, 0])
    out = unit(q, keys, lengths)
    for b in range(3):
        ref = torch.zeros(4)
        for j in range(int(lengths[b])):
            e = keys[b, j]
            ref = ref + unit.net(torch.cat([q[b], e, q[b] - e, q[b] * e]).unsqueeze(0))[0, 0] * e
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2], torch.zeros(4))


@pytest.mark.parametrize("make", [lambda: ActivationUnit(4, [8]), lambda: ItemAttention(4, 3, [8], transfer=True)])
def test_sequence_attention_ignores_whatever_sits_in_the_padding(make):
    torch.manual_seed(0)
    att = make()
    q, user, lengths = torch.randn(4, 4), torch.randn(4, 3), torch.tensor([5, 3, 1, 0])
    keys = torch.randn(4, 5, 4) * (torch.arange(5) < lengths.unsqueeze(1)).unsqueeze(-1)
    garbage = keys + 100 * torch.randn(4, 5, 4) * (torch.arange(5) >= lengths.unsqueeze(1)).unsqueeze(-1)
    call = (lambda k: att(q, k, lengths)) if isinstance(att, ActivationUnit) else (lambda k: att(q, user, k, lengths))
    torch.testing.assert_close(call(garbage), call(keys), rtol=1e-5, atol=1e-6)
    assert torch.equal(call(garbage)[3], torch.zeros(4))


@pytest.mark.parametrize("kind", ["field_all", "field_each", "field_interaction"])
def test_bilinear_interaction_matches_the_pairwise_loop(kind):
    torch.manual_seed(0)
    layer, v = Bilinear(4, 3, kind), torch.randn(2, 4, 3)
    out = layer(v)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    for p, (i, j) in enumerate(pairs):
        w = layer.weight[{"field_all": 0, "field_each": i, "field_interaction": p}[kind]]
        torch.testing.assert_close(out[:, p], (v[:, i] @ w) * v[:, j])


# ------------------------------------------------------------------------------------------------------------
# The trainer's machinery: sharded (DMP), TorchRec's train pipeline, checkpoint, serving export
# ------------------------------------------------------------------------------------------------------------


def _pipelined_steps(data: str, out: str) -> dict:
    """Every baseline and stage: assemble as the trainer does (meta build, fused embedding optimizer, plan, DMP),
    3 steps through TorchRec's TrainPipelineSparseDist under the accelerator emulation, which records every host
    sync our code makes; the SERVED runs save a checkpoint and run.json."""
    from mkt_torchrec.training import checkpoint, device_check
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.assembly import assemble, state_of
    from mkt_torchrec.training.feed import _weighted, make_pipeline

    torch.set_num_threads(1)
    info = init_distributed()
    results = {"emulated": device_check.enabled()}
    for name, stage in STAGE_RUNS:
        cfg = _cfg(name)
        asm = assemble(cfg, stage, info)
        reader = ParquetReader(data, "train", cfg.schema, cfg.data, entity=MODELS[name].stages[stage].entity)
        batches = [_weighted(b, float(len(b)), 1, real=True) for _, b in zip(range(3), reader)]
        pipeline = make_pipeline(asm.model, asm.optimizer, info.device)
        feed = iter(batches)
        device_check.SYNCS.clear()
        losses = [pipeline.progress(feed).loss for _ in batches]
        syncs = list(device_check.SYNCS)
        results[f"{name}/{stage}"] = {"pipelined": len(pipeline._pipelined_modules), "syncs": syncs,
                                      "losses": [float(v) for v in losses]}
        if (name, stage) in SERVED:
            run = os.path.join(out, name)
            checkpoint.save(run, 3, state_of(asm, cfg), {"step": 3, "epoch": 0, "readers": []}, info.is_main, 1)
            with open(os.path.join(run, "run.json"), "w", encoding="utf-8") as f:
                json.dump({"stage": stage, "config": cfg.to_dict()}, f)
    return results


@pytest.fixture(scope="module")
def pipelined(small_dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("baseline_runs"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MKT_EMULATE_ACCELERATOR", "1")
        return launch(1, _pipelined_steps, small_dataset, out), out


def test_every_baseline_trains_sharded_through_the_train_pipeline_without_host_syncs(pipelined):
    results, _ = pipelined
    assert results.pop("emulated"), "the accelerator emulation is off: the sync check could not fail"
    assert sorted(results) == sorted(f"{n}/{s}" for n, s in STAGE_RUNS)
    for key, r in results.items():
        assert r["pipelined"] >= 1, f"{key}: TorchRec's pipeline found no collection to pipeline"
        assert len(r["losses"]) == 3 and all(0 < v < 10 for v in r["losses"]), (key, r["losses"])
        assert not r["syncs"], f"{key}: host syncs in a training step at {r['syncs']}"


@pytest.mark.parametrize("name,stage", SERVED)
def test_serving_export_scores_target_rows_like_the_trained_model(pipelined, small_dataset, name, stage):
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.export import export_run, serving_from_run
    from mkt_torchrec.training.mem_transfer import load_unsharded

    run = os.path.join(pipelined[1], name)
    cfg = _cfg(name)
    batch = _batch(small_dataset, cfg, "target", split="test")
    model = load_unsharded(cfg, stage, checkpoint.latest_checkpoint(run)).model.eval()
    with torch.no_grad():
        reference = torch.sigmoid(model(batch.sparse_features, batch.dense_features, batch.entity))
    ids = padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema))
    _, serving = serving_from_run(run)
    torch.testing.assert_close(serving(ids, batch.dense_features), reference, rtol=1e-5, atol=1e-6)
    exported = load_serving(export_run(run))  # torch.export, then a file any process can load
    torch.testing.assert_close(exported(ids, batch.dense_features), reference, rtol=1e-5, atol=1e-6)


def test_a_pretraining_run_is_not_exported(tmp_path):
    from mkt_torchrec.training.export import serving_from_run

    with open(tmp_path / "run.json", "w", encoding="utf-8") as f:
        json.dump({"stage": "mem", "config": _cfg("finetune").to_dict()}, f)
    with pytest.raises(ValueError, match="is pre-training; export its stage 'tem' run"):
        serving_from_run(str(tmp_path))
