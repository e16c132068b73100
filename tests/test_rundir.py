"""The run directory object, and one resolved config per run (no override strings past the command line)."""

import ast
import json
import os
import pathlib

import pytest

from mkt_torchrec import registry
from mkt_torchrec.config import EVALUATE_KEYS, ConfigError, load_config
from mkt_torchrec.rundir import RunDir, read_json, write_json

from tests.conftest import QUICKSTART, REPO


def test_records_round_trip_and_broken_ones_are_one_line_errors_naming_the_file(tmp_path):
    run = RunDir(str(tmp_path / "run"))
    assert not run.exists() and not run.evaluated() and not run.done() and run.history() == []
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        run.record()
    os.makedirs(run.path)
    cfg = load_config(QUICKSTART)
    run.write_record({"stage": "mem", "config": cfg.to_dict()})
    assert run.stage() == "mem" and run.config() == cfg
    assert os.listdir(run.path) == ["run.json"]  # the temporary file was renamed into place
    for text, why in (("{not json", "unreadable"), ("[1, 2]", "not a run record"), ('{"stage": "mem"}', "'config'")):
        pathlib.Path(run.file("run.json")).write_text(text)
        with pytest.raises(ValueError) as e:
            run.record()
        assert run.file("run.json") in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    run.write_record({"stage": "mem", "config": {**cfg.to_dict(), "model": {"name": "no_such_model"}}})
    with pytest.raises(ValueError, match=r"run\.json: config model\.name"):
        run.config()  # a record from elsewhere is validated as a config file is
    with pytest.raises(FileNotFoundError, match="metrics.json: not found"):
        run.metrics()


def test_history_appends_and_a_resume_drops_the_steps_trained_again(tmp_path):
    run = RunDir(str(tmp_path))
    for step in (10, 20, 30):
        run.log({"step": step, "loss": 1.0 / step})
    with open(run.file(RunDir.HISTORY), "a") as f:
        f.write('{"step": 40, "lo')  # a run killed mid-write
    assert [r["step"] for r in run.history()] == [10, 20, 30]
    run.truncate_history(20)
    assert [r["step"] for r in run.history()] == [10, 20]
    assert sorted(os.listdir(run.path)) == ["metrics.jsonl"]


def test_read_json_names_the_file_and_what_it_lacks(tmp_path):
    path = str(tmp_path / "x.json")
    write_json(path, {"a": 1})
    assert read_json(path, "a thing", ("a",)) == {"a": 1}
    with pytest.raises(ValueError, match=r"x\.json: not a thing \(needs 'a', 'b'\)"):
        read_json(path, "a thing", ("a", "b"))


def test_a_runs_config_is_the_jobs_with_typed_settings_and_nothing_parsed():
    base = load_config(QUICKSTART, ["train.seed=7", "data.batch_size=64"])
    cfg = registry.get("no_hfa").config(base, seed=2)
    assert (cfg.model.name, cfg.model.ablation, cfg.train.seed, cfg.data.seed) == ("mkt", "no_hfa", 9, 9)
    assert cfg.data.batch_size == 64 and base.model.ablation == "none"  # the job's config is left as it was
    assert registry.get("din").config(base).model.name == "din"
    assert registry.get("no_tem_finetune").config(base).model.ablation == "none"  # made as mkt: mkt's settings
    with pytest.raises(ConfigError, match="data.batch_size"):
        base.with_settings({"data.batch_size": "many"})  # validated as a config file is


def test_evaluate_takes_exactly_its_keys_from_the_job():
    run = load_config(QUICKSTART, ["model.ablation=no_hfa", "eval.bootstrap_samples=3", "data.batch_size=32"])
    job = load_config(QUICKSTART, ["model.ablation=no_pdl", "eval.bootstrap_samples=11", "data.batch_size=128",
                                   "train.threads=1"])
    cfg = run.for_evaluation(job)
    assert cfg.model == run.model and cfg.schema == run.schema  # the run's own model
    assert (cfg.eval, cfg.data.batch_size, cfg.train.threads) == (job.eval, 128, 1)
    assert set(EVALUATE_KEYS) == {"eval", "data.batch_size", "data.num_workers", "train.threads"}
    with pytest.raises(ValueError, match="plan_file does not apply"):
        run.for_evaluation(load_config(QUICKSTART, ["train.planner.plan_file=x.json"]))


def test_override_strings_are_parsed_only_where_the_command_line_is_read():
    """One resolved Config per job: the command line's --config / --set are parsed once, by the CLIs; ranks,
    runs and stages get Config objects (``RunSpec.config``, ``RunDir.config``), never a path and strings."""
    parsers = {"load_config", "apply_overrides"}
    users = set()
    for path in pathlib.Path(REPO, "mkt_torchrec").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | \
            {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        if names & parsers:
            users.add(str(path.relative_to(REPO)))
    assert users == {"mkt_torchrec/config.py", "mkt_torchrec/cli.py", "mkt_torchrec/planning/cli.py"}, users


def test_the_records_of_a_run_are_written_under_temporary_names(tmp_path, monkeypatch):
    """No reader sees half a run.json / metrics.json: each is written whole under another name, then renamed."""
    run = RunDir(str(tmp_path))
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst), json.load(open(src))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    run.write_metrics({"target": {"auc": 0.7}})
    assert seen[0][1] == "metrics.json" and seen[0][0] != "metrics.json" and seen[0][2] == {"target": {"auc": 0.7}}
    assert run.metrics() == {"target": {"auc": 0.7}} and run.evaluated()


def test_mkt_run_does_not_reuse_a_run_made_by_other_code(tmp_path):
    """A finished run's results are its code's: ``mkt run`` refuses to reuse a run whose run.json names another
    source digest (or none: an older release), in one line naming the run; this code's own run is reused."""
    from mkt_torchrec.pipeline import _check_reuse, _run_dirs
    from mkt_torchrec.provenance import provenance

    cfg = load_config(QUICKSTART)
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    run = _run_dirs(out, "mkt", 0)["mem"]
    os.makedirs(run.path)
    record = {"stage": "mem", "config": registry.get("mkt").config(cfg).to_dict(), "data": data, **provenance()}
    run.write_record(record)
    _check_reuse(cfg, data, out, ["mkt"], 1, synthesised=False)  # this code's run: reused
    for code in ({**record["code"], "source": "0123456789abcdef"}, None):
        run.write_record({**record, "code": code} if code else {k: v for k, v in record.items() if k != "code"})
        with pytest.raises(ValueError) as e:
            _check_reuse(cfg, data, out, ["mkt"], 1, synthesised=False)
        message = str(e.value)
        assert run.path in message and ("other code" in message or "no code version" in message)
        assert "\n" not in message and "--overwrite" in message
