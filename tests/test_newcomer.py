"""What a new user meets first: the license, `mkt --help`, `mkt config`, `mkt export --help`, the summary of
`mkt run` and a URL where a path belongs."""

import os
import subprocess
import sys
import tomllib

import pytest

from mkt_torchrec.cli import main
from mkt_torchrec.pipeline import _over_seeds

from tests.conftest import QUICKSTART, REPO


def test_the_license_file_is_the_one_the_package_declares():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["license"]["text"]
    with open(os.path.join(REPO, "LICENSE"), encoding="utf-8") as f:
        first = f.readline().strip()
    assert (declared, first) == ("BSD-3-Clause", "BSD 3-Clause License")


def test_mkt_help_imports_neither_torch_nor_torchrec():
    """What made `mkt --help` take seconds: building the parser imported torch (through the report's and the
    planner's option modules)."""
    code = ("import sys\nfrom mkt_torchrec.cli import main\ntry:\n    main(['{}', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in ('torch', 'torchrec', 'numpy', 'pandas') if m in sys.modules))")
    for command in ("run", "plan", "report"):
        proc = subprocess.run([sys.executable, "-c", code.format(command)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "[]", (command, proc.stdout[-500:])


def test_mkt_config_lists_the_schema_and_each_key_with_its_own_meaning(capsys):
    assert main(["config", "--config", QUICKSTART]) == 0
    lines = capsys.readouterr().out.splitlines()
    meaning = {line.split(" = ")[0]: line.split("  # ", 1)[1] for line in lines[1:]}
    assert meaning["schema.tables.item_id.rows"].startswith("number of rows")
    assert meaning["schema.features.item_id.group"].startswith("``user`` (profile)")
    assert meaning["schema.sequences.hist_source_items.max_len"].startswith("the most recent")
    assert meaning["train.dense_lr"] == "its learning rate."
    assert meaning["train.dense_optimizer"].startswith("optimizer of every other (dense) parameter")
    assert meaning["synth.row_group_rows"] != meaning["synth.rows_per_file"]


def test_mkt_export_help_shows_only_what_export_takes(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "--run-dir" in out and "--config" not in out and "--set" not in out


def test_the_summary_gives_the_mean_and_std_over_seeds():
    seeds = [{"auc": 0.70, "gauc": 0.60, "logloss": 0.30, "rows": 10, "users": 4},
             {"auc": 0.74, "gauc": 0.66, "logloss": 0.28, "rows": 10, "users": 4}]
    got = _over_seeds(seeds)
    assert got["seeds"] == 2 and got["rows"] == 10 and got["users"] == 4
    assert got["gauc"] == pytest.approx(0.63) and got["gauc_std"] == pytest.approx(0.0424264, abs=1e-6)
    assert got["auc"] == pytest.approx(0.72) and got["logloss"] == pytest.approx(0.29)
    assert _over_seeds(seeds[:1])["gauc_std"] == 0.0 and _over_seeds([seeds[0], None]) is None


def test_a_url_where_a_path_belongs_is_one_line_before_anything_is_made(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["synth", "--config", QUICKSTART, "--out", "s3://bucket/data", "--layout", "parquet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mkt synth: error: --out s3://bucket/data: this option takes a local or shared POSIX path (a "
                   "mounted volume), not a URL; datasets (--data, mkt build --out), run directories (--run-dir, mkt "
                   "run --out) and reports (mkt report --out) may be on object storage"]
    assert not out.exists() and not os.path.exists(os.path.join(os.getcwd(), "s3:"))


def test_a_run_on_object_storage_needs_a_dataset(capsys):
    assert main(["run", "--config", QUICKSTART, "--out", "s3://bucket/runs"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "mkt run: error: --out s3://bucket/runs: a run on object storage needs --data (a dataset made by mkt build "
        "or mkt synth, local or on the store)"]
    assert not os.path.exists(os.path.join(os.getcwd(), "s3:"))


def test_the_wheel_holds_the_package_its_components_and_entry_points(tmp_path):
    """What `pip install .` installs (README "Installing"): the package alone (no top-level helper packages),
    the `mkt` script, the torchx components under the package's name, and the declared dependencies."""
    import zipfile

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), REPO], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("mkt_torchrec-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.startswith("mkt_torchrec-")} == {"mkt_torchrec"}
    assert "mkt_torchrec/components.py" in names and "mkt_torchrec/registry.py" in names
    dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "mkt = mkt_torchrec.cli:main" in entry_points
    assert "mkt = mkt_torchrec.components" in entry_points and "_builtins = torchx.components" in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "Requires-Dist: torchrec==1.8.0" in metadata and "License" in metadata
