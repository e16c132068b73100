"""``mkt daily``: incremental training day by day (mkt_torchrec/daily.py)."""

import json
import os
import shutil

import pytest
import torch

from mkt_torchrec.cli import main
from mkt_torchrec.data.synth import generate
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.mem_transfer import load_unsharded
from mkt_torchrec.rundir import RunDir

from tests.conftest import QUICKSTART, set_flags, small_config

DAY = ["synth.users=200", "synth.source_rows=2400", "synth.source_items=800", "synth.target_items=300",
       "synth.row_group_rows=300", "synth.rows_per_file=1200"]
TRAIN = ["data.batch_size=96", "train.checkpoint_every=3", "train.checkpoint_every_minutes=0", "train.log_every=3",
         "eval.bootstrap_samples=0"]


@pytest.fixture(scope="module")
def days(tmp_path_factory):
    """Three small day datasets (three draws of the generator) listed by a days.json."""
    root = tmp_path_factory.mktemp("days")
    names = []
    for d in range(3):
        names.append(f"day-{d + 1:03d}")
        generate(small_config(*DAY, f"synth.seed={d}"), str(root / names[-1]))
    (root / "days.json").write_text(json.dumps({"days": names}))
    return str(root)


def _flags(*extra):
    from tests.conftest import SMALL

    return ["--config", QUICKSTART, *set_flags(*SMALL, *DAY, *TRAIN, *extra)]


def _state(run):
    """Every tensor of a run's final checkpoint (model and optimizer), in one process."""
    ckpt = checkpoint.final_checkpoint(run)
    sizes = checkpoint.global_sizes(ckpt)
    state = {k: torch.empty(v) for k, v in sizes.items()}
    checkpoint.load(ckpt, state, no_dist=True)
    return state


def test_three_days_at_two_ranks_killed_and_rerun_end_bit_equal(days, tmp_path, monkeypatch, capsys):
    """Day 2's stage 2 killed at its step 3 (after day 1 ran alone, as yesterday's job): the rerun with all three
    days resumes it and ends with the same tensors, predictions and metrics as an uninterrupted sequence. The MEM is
    refreshed every 2 days, so day 3's stage 2 moves to a new MEM. (In-process launcher, 2 real rank processes.)"""
    day_sets = [os.path.join(days, f"day-{d:03d}") for d in (1, 2, 3)]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    job = ["daily", *_flags(), "--nproc", "2", "--mem-every", "2"]
    assert main([*job, "--days", days, "--out", straight]) == 0, capsys.readouterr().err[-3000:]
    assert main([*job, "--days", day_sets[0], "--out", killed]) == 0  # yesterday: day 1 alone
    monkeypatch.setenv("MKT_FAIL_AT_STEP", "tem:3")
    assert main([*job, "--days", *day_sets, "--out", killed]) == 1
    assert "without a message" in capsys.readouterr().err
    monkeypatch.delenv("MKT_FAIL_AT_STEP")
    assert RunDir(os.path.join(killed, "seed0", "day-002", "tem")).has_checkpoint()
    assert not RunDir(os.path.join(killed, "seed0", "day-002", "tem")).evaluated()
    assert main([*job, "--days", *day_sets, "--out", killed]) == 0, capsys.readouterr().err[-3000:]

    runs = [("day-001", "mem"), ("day-003", "mem"), ("day-001", "tem"), ("day-002", "tem"), ("day-003", "tem")]
    for day, stage in runs:
        a, b = (_state(os.path.join(o, "seed0", day, stage)) for o in (straight, killed))
        assert a.keys() == b.keys()
        assert any(k.startswith("optim.") for k in a)  # the optimizer state is carried too
        for k in a:
            assert torch.equal(a[k], b[k]), f"{day}/{stage}: {k}"
    assert not os.path.exists(os.path.join(straight, "seed0", "day-002", "mem"))  # --mem-every 2
    table = {o: json.load(open(os.path.join(o, "summary.json")))["table"] for o in (straight, killed)}
    assert table[straight] == table[killed]
    assert [r["mem_day"] for r in table[straight]] == [1, 1, 3]
    assert [r["mem_switch"] for r in table[straight]] == [False, False, True]
    assert all(r["incremental"]["gauc"] is not None and r["frozen"]["gauc"] is not None for r in table[straight])
    for d in (2, 3):  # the frozen model is day 1's, scored on day d's test rows
        frozen = json.load(open(os.path.join(straight, "seed0", "frozen", f"day-{d:03d}", "metrics.json")))
        assert frozen["scored_from"] == os.path.join(straight, "seed0", "day-001", "tem")
        assert frozen["target"]["rows"] == json.load(open(os.path.join(
            straight, "seed0", f"day-{d:03d}", "tem", "metrics.json")))["target"]["rows"]
    record = json.load(open(os.path.join(straight, "seed0", "day-003", "tem", "run.json")))
    assert record["mem_run"] == os.path.join(straight, "seed0", "day-003", "mem")
    assert record["init_from"]["run"] == os.path.join(straight, "seed0", "day-002", "tem")
    assert os.path.isfile(os.path.join(straight, "seed0", "day-003", "tem", "serving", "model.pt2"))
    assert os.path.isfile(os.path.join(straight, "daily.png")) and "| 3 | 3 (new) |" in open(
        os.path.join(straight, "daily.md")).read()


def test_a_day_continues_the_previous_days_parameters(days, tmp_path):
    """A day starts from the previous day's final state (``init_from``, what mkt daily passes each day after the
    first): trained on with a learning rate of 1e-30 (updates below any weight's float32 resolution), every tensor
    is still the previous day's (nothing re-initialised, the click-rate bias start included), in both stages, and
    the run records the checkpoint it started from."""
    from mkt_torchrec.daily import day_config
    from mkt_torchrec.training.distributed import run_rank
    from mkt_torchrec.training.recipe import train

    tiny = "train.dense_lr=1e-30", "train.embedding_lr=1e-30", "train.finetune_dense_lr=1e-30", "train.max_steps=2"
    d1, d2 = (os.path.join(days, f"day-00{d}") for d in (1, 2))
    for stage in ("mem", "tem"):
        first, second = str(tmp_path / f"{stage}1"), str(tmp_path / f"{stage}2")
        mem = (str(tmp_path / "mem1"), str(tmp_path / "mem2")) if stage == "tem" else (None, None)
        run_rank(train, day_config(small_config(*DAY, *TRAIN, "train.max_steps=2"), 0), stage, d1, first, False,
                 mem[0])
        run_rank(train, day_config(small_config(*DAY, *TRAIN, *tiny), 0), stage, d2, second, False, mem[1], first)
        a, b = (load_unsharded(RunDir(r).config(), stage, checkpoint.final_checkpoint(r)).state_dict()
                for r in (first, second))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=0, atol=1e-25), f"{stage}: {k}"
        assert RunDir(second).record()["init_from"]["run"] == first


def test_bad_days_are_refused_before_training(days, tmp_path, capsys):
    other = str(tmp_path / "other")
    shutil.copytree(os.path.join(days, "day-002"), other)
    manifest = json.load(open(os.path.join(other, "manifest.json")))
    manifest["schema_digest"] = "0" * 16
    json.dump(manifest, open(os.path.join(other, "manifest.json"), "w"))
    out = str(tmp_path / "out")
    code = main(["daily", *_flags(), "--nproc", "1", "--days", os.path.join(days, "day-001"), other, "--out", out])
    err = capsys.readouterr().err
    assert code == 1 and other in err and "schema" in err, err
    assert not os.path.exists(out)  # refused before anything was written

    code = main(["daily", *_flags(), "--days", os.path.join(days, "day-001"), os.path.join(days, "day-001"),
                 "--out", out])
    assert code == 1 and "listed twice" in capsys.readouterr().err


def test_a_rerun_may_add_days_but_not_change_them(days, tmp_path, capsys):
    out = str(tmp_path / "out")
    d1, d2, d3 = (os.path.join(days, f"day-{d:03d}") for d in (1, 2, 3))
    os.makedirs(out)
    record = {"days": [d1, d2], "mem_every": 1, "config": small_config(*DAY, *TRAIN).to_dict()}
    json.dump(record, open(os.path.join(out, "daily.json"), "w"))
    code = main(["daily", *_flags(), "--days", d1, d3, "--out", out])
    assert code == 1 and "day 2 was" in capsys.readouterr().err
    code = main(["daily", *_flags(), "--days", d1, d2, d3, "--out", out, "--mem-every", "2"])
    assert code == 1 and "--mem-every 1" in capsys.readouterr().err
