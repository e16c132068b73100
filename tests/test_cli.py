import json
import os

from mkt_torchrec.cli import main

from tests.conftest import QUICKSTART, SMALL


def _sets(*extra):
    out = []
    for s in (*SMALL, *extra):
        out += ["--set", s]
    return out


def test_synth_then_inspect_reads_every_row(tmp_path, capsys):
    out = str(tmp_path / "ds")
    assert main(["synth", "--config", QUICKSTART, *_sets(), "--out", out, "--seed", "3"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert main(["inspect", "--config", QUICKSTART, *_sets(), "--data", out, "--split", "test"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == written["test"]
    assert json.load(open(os.path.join(out, "manifest.json")))["source"]["synth"]["seed"] == 3


def test_config_error_exits_2_and_names_the_key(tmp_path, capsys):
    code = main(["synth", "--config", QUICKSTART, "--set", "synth.users=-1", "--out", str(tmp_path / "x")])
    assert code == 2
    assert "synth.users" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_output_exits_1_with_message(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    code = main(["synth", "--config", QUICKSTART, *_sets(), "--out", str(tmp_path / "x")])
    assert code == 1 and "already exists" in capsys.readouterr().err


def test_config_lists_every_key_with_value_and_meaning(capsys):
    from mkt_torchrec.cli import main
    from mkt_torchrec.config import describe_keys

    assert main(["config"]) == 0
    defaults = capsys.readouterr().out.splitlines()
    assert all(meaning for _, _, meaning in describe_keys()), "every setting documents its meaning"
    assert any(line.startswith("train.checkpoint_every_minutes = 30.0") for line in defaults)
    assert main(["config", "--config", QUICKSTART, "--set", "train.epochs=7"]) == 0
    assert any(line.startswith("train.epochs = 7 ") for line in capsys.readouterr().out.splitlines())
    assert main(["config", "--set", "train.epochs=7"]) == 2


def test_every_command_decides_progress_bars_the_same_way(monkeypatch):
    from mkt_torchrec import logs

    for value, expected in (("1", True), ("0", False)):
        monkeypatch.setenv("MKT_PROGRESS", value)
        assert logs.progress_enabled() is expected
    monkeypatch.delenv("MKT_PROGRESS")
    assert logs.progress_enabled() is False  # pytest's stderr is not a terminal


def test_an_os_error_is_a_one_line_error(tmp_path, capsys):
    """A read-only or full disk, or a path under a file, surfaces as one line naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["synth", "--config", QUICKSTART, *[w for s in SMALL for w in ("--set", s)],
                 "--out", str(blocker / "ds")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(blocker) in err, err
