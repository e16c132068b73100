"""mkt_torchrec.registry: the one table of runnable models, and a baseline added through it alone."""

import json
import os
import subprocess
import sys

import pytest

from mkt_torchrec import registry
from mkt_torchrec.config import ConfigError, load_config

from tests.conftest import QUICKSTART, REPO, SMALL, set_flags

FAKE = '''"""A baseline from outside the package: its network is MLP's, its name and label its own."""
from mkt_torchrec import registry
from mkt_torchrec.models.baselines.mlp import build_model  # noqa: F401  (what the registry entry's module offers)

PAPER = "a plugin's baseline (tests/test_registry.py)"
registry.register(registry.RunSpec("fake_mlp", "single_domain", "Fake MLP", {"tem": registry.StageSpec("target")},
                                   model="fake_mlp", module=__name__, served=True))
'''


def _mkt(*args, env):
    proc = subprocess.run([sys.executable, "-m", "mkt_torchrec.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "MKT_PROGRESS": "0", **env})
    return proc.returncode, proc.stdout, proc.stderr


def test_every_entry_names_its_stages_family_and_a_module_that_builds_it():
    import importlib

    for name, spec in registry.runs().items():
        assert spec.family in registry.FAMILIES and spec.final_stage in spec.stages, name
        if spec.is_baseline:
            module = importlib.import_module(spec.module)
            assert callable(module.build_model) and module.PAPER, name
        # (a variant with extra settings, such as mkt_cached, trains as its model's entry)
        assert registry.of_config(spec.model, spec.ablation) is spec or spec.made_as or spec.extra, name
    assert "mkt_cached" not in registry.mkt_names()  # asked for by name: not among the default runs
    assert registry.evaluated_stages("mkt") == ("mem", "tem")  # its MEM is no_tem_finetune's model
    assert registry.evaluated_stages("finetune") == ("tem",)  # pre-training is not evaluated
    assert [n for n, s in registry.runs().items() if not s.served] == ["mmoe", "ple", "star", "conet", "pgtl", "pepnet"]


def test_a_config_names_only_registered_models():
    with pytest.raises(ConfigError, match=r"model.name: expected one of \['mkt', 'mlp'.*got 'wide_deep'"):
        load_config(QUICKSTART, ["model.name=wide_deep"])
    with pytest.raises(ConfigError, match="model.ablation: expected one of"):
        load_config(QUICKSTART, ["model.ablation=no_cke"])


def test_a_name_taken_or_a_malformed_entry_is_refused():
    with pytest.raises(ValueError, match="'mlp' is registered already"):
        registry.register(registry.RunSpec("mlp", "joint", "x", {"mem": registry.StageSpec(None)}, model="mlp",
                                           module="m"))
    with pytest.raises(ValueError, match="stages must be"):
        registry.register(registry.RunSpec("odd", "joint", "x", {"tem": registry.StageSpec(None),
                                                                  "mem": registry.StageSpec(None)}, model="odd",
                                           module="m"))
    assert "odd" not in registry.names()


def test_a_baseline_registered_by_a_plugin_alone_runs_through_mkt_run(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fake_baseline.py").write_text(FAKE)
    env = {"MKT_MODELS": "fake_baseline",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")]))}
    sets = set_flags(*SMALL, "train.epochs=1", "eval.bootstrap_samples=0", "eval.min_gauc_users=5")
    out = tmp_path / "out"
    code, stdout, err = _mkt("run", "--config", QUICKSTART, *sets, "--runs", "fake_mlp", "--nproc", "1",
                             "--out", str(out), env=env)
    assert code == 0, err[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["target"]["fake_mlp"]["rows"] > 0
    run_dir = out / "runs" / "fake_mlp" / "seed0" / "tem"
    assert json.load(open(run_dir / "run.json"))["config"]["model"]["name"] == "fake_mlp"
    assert (run_dir / "serving" / "model.pt2").is_file()  # served, as its entry says
    assert "Single-domain" in (out / "report" / "report.md").read_text()  # its family, from the entry

    code, _, err = _mkt("run", "--config", QUICKSTART, *sets, "--runs", "fake_mlp", "--out", str(tmp_path / "o2"),
                        env={"MKT_MODELS": ""})  # without the plugin the name is unknown, before anything runs
    assert code != 0 and "fake_mlp" in err.strip().splitlines()[-1] and not (tmp_path / "o2" / "runs").exists()
    code, _, err = _mkt("config", "--config", QUICKSTART, env={"MKT_MODELS": "no_such_plugin"})
    assert code != 0 and "MKT_MODELS: cannot import 'no_such_plugin'" in err.strip().splitlines()[-1]
