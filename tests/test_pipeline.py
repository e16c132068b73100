"""The main job end to end on a small planted-structure dataset (2 ranks, gloo, CPU)."""

import json
import os

from mkt_torchrec.cli import main

from tests.conftest import QUICKSTART

SETS = ["synth.users=3000", "synth.source_rows=60000", "synth.source_items=4000", "synth.target_items=1000",
        "synth.row_group_rows=5000", "synth.rows_per_file=50000", "synth.seed=0", "data.batch_size=256",
        "eval.bootstrap_samples=50"]


def test_mkt_beats_the_single_domain_baseline_on_the_target_entity(tmp_path, capsys):
    out = tmp_path / "job"
    args = ["run", "--config", QUICKSTART, "--out", str(out), "--runs", "mkt", "no_mem_pretrain"]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.load(open(out / "summary.json"))
    mkt, base = summary["target"]["mkt"], summary["target"]["no_mem_pretrain"]
    assert mkt["auc"] > base["auc"] + 0.02, (mkt, base)
    # the GAUC lift shrank from ~0.1 to ~0.011 once replicated tables trained with the embedding optimizer at any
    # world size (issue 8); making each part of MKT pay off again is issue 12
    assert mkt["gauc"] > base["gauc"] + 0.005, (mkt, base)
    report = out / "report"
    for name in ("report.html", "report.md"):
        assert (report / name).is_file()
    assert "report.html" in capsys.readouterr().out
    assert os.path.isfile(out / "runs" / "mkt" / "seed0" / "tem" / "serving" / "model.pt2")
