"""The single-process serving export of a finished run (mkt_torchrec.training.export)."""

import json
import os
import shutil

import pytest
import torch

from mkt_torchrec.cli import main
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
from mkt_torchrec.training import checkpoint, export
from mkt_torchrec.training.export import export_run, serving_from_run
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.training.mem_transfer import load_unsharded

from tests.conftest import QUICKSTART, SMALL

SETS = ["train.max_steps=3", "data.batch_size=128"]
SOURCE_ONLY = ("price_bucket", "condition", "hfa.source", "extractors.source", "towers.source")


def _train(stage, data, run, *extra_args, sets=()):
    args = ["train", "--config", QUICKSTART, "--stage", stage, "--data", data, "--run-dir", run, *extra_args]
    for s in (*SMALL, *SETS, *sets):
        args += ["--set", s]
    assert main(args) == 0  # in this process, a world of one


@pytest.fixture(scope="module")
def runs(small_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_runs")
    mem, tem = str(root / "mem"), str(root / "tem")
    _train("mem", small_dataset, mem)
    _train("tem", small_dataset, tem, "--mem-run", mem)
    return {"mem": mem, "tem": tem}


def _test_batch(cfg, data):
    return next(iter(ParquetReader(data, "test", cfg.schema, cfg.data, training=False, entity="target")))


def _reference(run, stage, batch):
    """Click probabilities of the run's final model, rebuilt whole with the trainer's load_unsharded."""
    cfg = RunDir(run).config()
    model = load_unsharded(cfg, stage, checkpoint.latest_checkpoint(run)).model.eval()
    with torch.no_grad():
        if stage == "mem":
            return torch.sigmoid(model(batch.sparse_features, batch.dense_features, batch.entity).logits)
        return torch.sigmoid(model(batch.sparse_features, batch.dense_features))


def _served(path, cfg, batch):
    ids = padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema))
    return load_serving(path)(ids, batch.dense_features)


def test_export_equals_the_stage2_forward_and_replaces_the_trainers_export(runs, small_dataset):
    run = runs["tem"]
    assert os.path.isfile(os.path.join(run, "serving", "model.pt2"))  # the trainer's own export, replaced here
    path = export_run(run, small_dataset)
    assert path == os.path.join(run, "serving", "model.pt2") and os.path.isfile(path)
    assert json.load(open(os.path.join(run, "serving", "serving.json")))["file"] == "model.pt2"
    assert not [n for n in os.listdir(run) if n.startswith(".serving")]  # no temporary directory is left
    cfg = RunDir(run).config()
    batch = _test_batch(cfg, small_dataset)
    torch.testing.assert_close(_served(path, cfg, batch), _reference(run, "tem", batch), rtol=0, atol=1e-6)


def test_export_without_data_uses_a_synthetic_example(runs, small_dataset, tmp_path):
    run = runs["tem"]
    path = export_run(run, out_dir=str(tmp_path / "serving"))
    assert path == str(tmp_path / "serving" / "model.pt2")
    cfg = RunDir(run).config()
    batch = _test_batch(cfg, small_dataset)
    ref = _reference(run, "tem", batch)
    torch.testing.assert_close(_served(path, cfg, batch), ref, rtol=0, atol=1e-6)
    ids = padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema))
    one = {k: v[:1] for k, v in ids.items()}  # the batch dim stays dynamic
    torch.testing.assert_close(load_serving(path)(one, batch.dense_features[:1]), ref[:1], rtol=0, atol=1e-6)


def test_only_served_tensors_are_loaded_once_into_the_serving_model(runs, monkeypatch):
    """The TEM's tensors come from the stage-2 checkpoint, the MEM's from the MEM run's (stage 2 saves no MEM)."""
    run = runs["tem"]
    loaded = {}  # checkpoint -> {key: tensor loaded into}
    real_load = checkpoint.load

    def recording_load(ckpt, state, no_dist=False):
        assert no_dist and not torch.distributed.is_initialized()
        loaded.setdefault(ckpt, {}).update(state)
        real_load(ckpt, state, no_dist=no_dist)

    monkeypatch.setattr(checkpoint, "load", recording_load)
    _, serving = serving_from_run(run)
    tem_ckpt, mem_ckpt = checkpoint.latest_checkpoint(run), checkpoint.final_checkpoint(runs["mem"])
    assert set(loaded) == {tem_ckpt, mem_ckpt}
    own, mem = sorted(loaded[tem_ckpt]), sorted(loaded[mem_ckpt])
    assert not [k for k in own + mem if any(s in k for s in SOURCE_ONLY)], "a source-entity tensor was loaded"
    assert not [k for k in mem if k.startswith(("model.model.extractors", "model.model.towers"))]
    assert "model.model.sparse_arch.ec.embeddings.item_id.weight" in mem  # the MEM's, under the MEM run's name
    assert "model.model.tem.sparse_arch.ec.embeddings.item_id.weight" in own
    assert not [k for k in own if k.startswith("model.model.mem.")]
    for ckpt, keys in ((tem_ckpt, own), (mem_ckpt, mem)):
        in_ckpt = set(checkpoint.SafeFileSystemReader(ckpt).read_metadata().state_dict_metadata)
        assert set(keys) <= in_ckpt, ckpt
    assert any("price_bucket" in k for k in in_ckpt)  # the MEM checkpoint has the source tables
    # every served tensor is the very one DCP loaded into: the tables exist once, as serving buffers
    ptrs = {v.data_ptr() for part in loaded.values() for v in part.values()}
    tables = {k: v for k, v in serving.state_dict().items() if "table__" in k}
    assert tables and all(v.data_ptr() in ptrs for v in tables.values())
    assert len(own) + len(mem) == len(serving.state_dict())


def test_mem_run_is_exported_only_under_no_tem_finetune(runs, small_dataset, tmp_path):
    with pytest.raises(ValueError, match="no_tem_finetune"):
        export_run(runs["mem"], small_dataset)
    assert not os.path.exists(os.path.join(runs["mem"], "serving"))

    run = str(tmp_path / "mem_only")
    _train("mem", small_dataset, run, sets=("model.ablation=no_tem_finetune",))
    path = export_run(run)
    cfg = RunDir(run).config()
    batch = _test_batch(cfg, small_dataset)
    torch.testing.assert_close(_served(path, cfg, batch), _reference(run, "mem", batch), rtol=0, atol=1e-6)


def test_interrupted_export_leaves_no_serving_dir_and_keeps_the_previous(runs, tmp_path, monkeypatch):
    out = tmp_path / "serving"

    def failing(schema, model, out_dir, ids, dense, knowledge=None):
        open(os.path.join(out_dir, "model.pt2"), "w").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "export_serving", failing)
    with pytest.raises(KeyboardInterrupt):
        export_run(runs["tem"], out_dir=str(out))
    assert os.listdir(tmp_path) == []
    out.mkdir()
    (out / "model.pt2").write_text("previous")
    (out / "serving.json").write_text("{}")  # an export of ours (only those are replaced)
    with pytest.raises(KeyboardInterrupt):
        export_run(runs["tem"], out_dir=str(out))
    assert sorted(os.listdir(tmp_path)) == ["serving"] and (out / "model.pt2").read_text() == "previous"
    assert (out / "serving.json").read_text() == "{}"


def test_run_without_checkpoint_is_refused(runs, tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    shutil.copy(os.path.join(runs["tem"], "run.json"), run / "run.json")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_run(str(run))


def test_export_command_uses_the_runs_own_config(runs, tmp_path, capsys):
    from mkt_torchrec.cli import main

    out = str(tmp_path / "cli-export")
    assert main(["export", "--run-dir", runs["tem"], "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "model.pt2"))
    capsys.readouterr()
    for extra in (["--set", "model.ablation=no_hfa"], ["--config", QUICKSTART]):  # export takes neither
        with pytest.raises(SystemExit) as refused:
            main(["export", "--run-dir", runs["tem"], *extra])
        assert refused.value.code == 2 and f"unrecognized arguments: {extra[0]}" in capsys.readouterr().err
