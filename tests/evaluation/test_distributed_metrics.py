"""Tests for mkt_torchrec.evaluation.distributed_metrics: real multi-process runs (gloo, accelerator emulation)
at 1, 2 and 3 ranks, compared bit for bit with the single-process compute_metrics."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation import bootstrap
from mkt_torchrec.evaluation.streaming import SpillLimits, compute_metrics
from mkt_torchrec.training.distributed import launch

from tests.evaluation.test_streaming import make_predictions, write_parts

# Tiny buckets and ranges: several user buckets and score ranges per rank, the saturated 1.0 scores in a
# single-score range of their own (streamed in pieces of batch_rows).
SMALL = SpillLimits(partition_rows=400, bucket_rows=250, batch_rows=150)


def _worker(scenarios: list, spill_dir: str) -> dict:
    """Every rank: each scenario with compute_metrics_distributed; returns rank 0's view of all ranks."""
    import torch
    import torch.distributed as dist

    from mkt_torchrec.evaluation import bootstrap as worker_bootstrap
    from mkt_torchrec.evaluation.distributed_metrics import compute_metrics_distributed
    from mkt_torchrec.training.distributed import init_distributed, shutdown

    torch.set_num_threads(1)
    info = init_distributed()
    out: dict = {}
    default_budget = worker_bootstrap.EXACT_AUC_BUDGET
    for name, pred_dir, cfg, limits, budget in scenarios:
        worker_bootstrap.EXACT_AUC_BUDGET = default_budget if budget is None else budget
        try:
            got = compute_metrics_distributed(pred_dir, cfg, info.device, spill_dir=spill_dir, limits=limits)
        except (ValueError, FileNotFoundError) as e:
            got = f"{type(e).__name__}: {e}"
        worker_bootstrap.EXACT_AUC_BUDGET = default_budget
        views: list = [None] * info.world_size
        dist.all_gather_object(views, got)
        out[name] = views
    shutdown()
    return out


def _nan_score_dir(root) -> str:
    df = make_predictions(60, seed=5)
    d = write_parts(df, root / "nan")
    t = pq.read_table(os.path.join(d, "part-00001.parquet")).to_pandas()
    t.loc[7, "score"] = np.nan
    pq.write_table(pa.Table.from_pandas(t, preserve_index=False), os.path.join(d, "part-00001.parquet"))
    return d


def _scenarios(root) -> list:
    full = write_parts(make_predictions(300, seed=0), root / "full", parts=3)
    # Without the optional columns, target only, split over more files than ranks; one user with a single
    # impression, one with a single class.
    df = make_predictions(120, seed=3, activity=False, true_prob=False)
    df = df[df["entity"] == "target"]
    df = pd.concat([df, pd.DataFrame({"user_id": [7, 8, 8], "entity": ["target"] * 3,
                                      "label": np.float32([1, 0, 0]), "score": np.float32([0.5, 0.1, 0.9])})])
    plain = write_parts(df, root / "plain", parts=5)
    # One file of one row group: the other ranks read no rows, yet own user buckets and score ranges.
    (root / "one").mkdir()
    pq.write_table(pa.Table.from_pandas(make_predictions(80, seed=11), preserve_index=False),
                   root / "one" / "part-00000.parquet")
    return [
        ("exact", full, EvalConfig(bootstrap_samples=30, seed=3), SMALL, None),
        ("linear", full, EvalConfig(bootstrap_samples=30, seed=3), SMALL, 0),
        ("plain", plain, EvalConfig(bootstrap_samples=20, confidence=0.9), SpillLimits(), None),
        ("no_bootstrap", full, EvalConfig(bootstrap_samples=0), SpillLimits(), None),
        ("one_file", str(root / "one"), EvalConfig(bootstrap_samples=10, seed=5), SMALL, 0),
        ("nan", _nan_score_dir(root), EvalConfig(bootstrap_samples=5), SMALL, None),
        ("missing", str(root / "no-such-dir"), EvalConfig(), SMALL, None),
    ]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    scenarios = _scenarios(root)
    want = {}
    for name, pred_dir, cfg, _, budget in scenarios:
        if name in ("nan", "missing"):
            continue
        saved = bootstrap.EXACT_AUC_BUDGET
        bootstrap.EXACT_AUC_BUDGET = saved if budget is None else budget
        try:
            want[name] = compute_metrics(pred_dir, cfg)
        finally:
            bootstrap.EXACT_AUC_BUDGET = saved
    return root, scenarios, want


@pytest.fixture(scope="module", params=[1, 2, 3])
def runs(request, inputs):
    """The scenarios at 1, 2 and 3 ranks (one launch each)."""
    root, scenarios, _ = inputs
    spill = root / f"spill-{request.param}"
    spill.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("MKT_EMULATE_ACCELERATOR", "1")  # collectives must not take host tensors (NCCL)
    try:
        got = launch(request.param, _worker, scenarios, str(spill))
    finally:
        mp.undo()
    return request.param, got, spill


@pytest.mark.parametrize("name", ["exact", "linear", "plain", "no_bootstrap", "one_file"])
def test_bit_identical_to_compute_metrics(runs, inputs, name):
    nproc, got, spill = runs
    want = inputs[2][name]
    views = got[name]
    assert len(views) == nproc
    for rank, m in enumerate(views):
        assert m == want, f"rank {rank} of {nproc}"  # exact equality: point metrics and bootstrap intervals
    assert list(spill.iterdir()) == []  # temporary files removed


def test_scenarios_cover_what_they_should(inputs):
    _, _, want = inputs
    for ent in ("source", "target"):
        e = want["exact"][ent]
        assert e["auc_ci"] is not None and e["gauc_ci"] is not None and len(e["groups"]) == 3
        assert e["users_skipped_single_class"] > 0 and e["ceiling"]["auc"] is not None
        # saturated 1.0 scores: the log loss's clip applies; the calibration bins sum up to the rows
        assert e["logloss"] > 0 and 0 < e["calibration"]["ece"] < 1
        assert sum(b["rows"] for b in e["calibration"]["per_bin"]) == e["rows"]
        assert all(g["users_evaluated"] <= g["users"] for g in e["groups"])
        assert want["linear"][ent]["auc"] == e["auc"] and want["linear"][ent]["auc_ci"] != e["auc_ci"]
    assert set(want["plain"]) == {"target", "bootstrap"} and want["plain"]["target"]["groups"] == []
    assert want["no_bootstrap"]["target"]["auc_ci"] is None


def test_needs_a_process_group(tmp_path):
    import torch.distributed as dist

    from mkt_torchrec.evaluation.distributed_metrics import compute_metrics_distributed

    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    with pytest.raises(RuntimeError, match="not initialised"):
        compute_metrics_distributed(str(tmp_path), EvalConfig(), torch.device("cpu"))


def test_errors_are_raised_on_every_rank(runs):
    nproc, got, spill = runs
    for msg in got["nan"]:
        assert msg.startswith("ValueError: "), msg
        assert "part-00001.parquet: column 'score' has 1 NaN/missing/infinite value(s) (first at row 7)" in msg
    for msg in got["missing"]:
        assert msg.startswith("FileNotFoundError: ") and "no-such-dir" in msg, msg
    assert list(spill.iterdir()) == []
