"""mkt report: evaluated run directories in (predictions written directly, metrics.json by compute_metrics), a
self-contained comparison report out: the paper's Table 2 layout over seeds (AUC, GAUC, log loss, calibration and
their differences side by side), the seed-level interval shown with two or more seeds, the labelled user-level
interval with one, the flags, the too-few-users rule, the pooled paired interval and bounded memory.
(Seed-level intervals on simulated seeds, planted nulls and effects: test_seed_intervals.py.)"""

from __future__ import annotations

import json
import os
import re
import statistics
import tracemalloc
import types

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats

from mkt_torchrec.config import EvalConfig
from mkt_torchrec.evaluation import bootstrap
from mkt_torchrec.evaluation.report import write_report
from mkt_torchrec.evaluation.report_runs import Run, family_of, load_models, pair_runs, scan_predictions
from mkt_torchrec.evaluation.streaming import SpillLimits, compute_metrics

SAMPLES = 30  # bootstrap resamples: enough for intervals, fast
CFG = EvalConfig(bootstrap_samples=SAMPLES, min_gauc_users=50, plot_sample_rows=500)


def test_rows(users: int = 300, seed: int = 0, rows_per_user: tuple = (4, 16)) -> pd.DataFrame:
    """One test split: users with 4-15 impressions, a per-user click bias; a few users (5%) have fewer than 10
    past behaviours, so the 0-10 activity group rests on a handful of users."""
    rng = np.random.default_rng(seed)
    n = rng.integers(*rows_per_user, users)
    user = np.repeat(np.arange(users, dtype=np.int64) * 7 + 3, n)
    activity = np.where(rng.random(users) < 0.05, rng.integers(0, 10, users), rng.integers(10, 60, users))
    logit = rng.normal(-0.5, 1.0, users)[np.repeat(np.arange(users), n)] + rng.normal(0, 1.2, len(user))
    p = 1 / (1 + np.exp(-logit))
    return pd.DataFrame({"user_id": user, "logit": logit, "label": (rng.random(len(user)) < p).astype(np.float32),
                         "activity": np.repeat(activity, n).astype(np.int64), "true_prob": p.astype(np.float32)})


TEST_SPLIT = test_rows()
test_rows.__test__ = False  # a helper, not a test


def make_run(root, name: str, *, noise: float, seed: int = 0, model_name: str = "mkt", ablation: str = "none",
             stage: str = "tem", rows: pd.DataFrame = TEST_SPLIT, old_metrics: bool = False,
             sign: float = 1.0) -> str:
    """A run directory as mkt train + mkt evaluate leave it: predictions (two rank files), metrics.json
    (compute_metrics plus evaluate's keys), run.json and metrics.jsonl. Scores are the true logit (times
    ``sign``: -1 ranks worse than chance) plus noise."""
    run_dir = os.path.join(str(root), name)
    pred = os.path.join(run_dir, "predictions")
    os.makedirs(pred)
    rng = np.random.default_rng([seed, int.from_bytes(name.encode(), "little") % 2**32])
    entities = {"target": rows}
    if stage == "mem":
        entities["source"] = test_rows(200, seed=1)
    frames = []
    for entity, df in entities.items():
        noisy = sign * df.logit + rng.normal(0, noise, len(df))
        frames.append(df.assign(entity=entity, score=(1 / (1 + np.exp(-noisy))).astype(np.float32)))
    preds = pd.concat(frames, ignore_index=True)[["user_id", "entity", "label", "score", "activity", "true_prob"]]
    half = len(preds) // 2
    for i, part in enumerate((preds.iloc[:half], preds.iloc[half:])):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False), os.path.join(pred, f"part-{i:05d}.parquet"))
    metrics = compute_metrics(pred, EvalConfig(bootstrap_samples=20))
    if old_metrics:  # metrics.json of before the CI / group / ceiling / calibration keys
        metrics = {e: {k: v for k, v in m.items() if k in ("rows", "users", "positives", "auc", "gauc",
                                                            "mean_user_auc", "users_skipped_single_class")}
                   for e, m in metrics.items() if e in ("source", "target")}
    metrics.update(run_dir=run_dir, checkpoint="step-00000300", stage=stage, ablation=ablation, world_size=2)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump({"stage": stage, "config": {"model": {"name": model_name, "ablation": ablation},
                                              "train": {"seed": seed}},
                   "data": "data", "mem_run": None, "world_size": 2, "created": "2025-01-01T00:00:00"}, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in range(10, 310, 10):
            bce = 0.7 * np.exp(-step / 150) + 0.45 + noise / 100
            f.write(json.dumps({"step": step, "epoch": 0, "loss": bce + (0.05 if stage == "mem" else 0.0), "bce": bce,
                                "pdl": 0.05 if stage == "mem" else 0.0, "time": float(step)}) + "\n")
    return run_dir


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """3 models x 2 seeds on one test split: MLP (single-domain), Finetune (pre-training & fine-tuning), MKT."""
    root = tmp_path_factory.mktemp("grouped")
    spec = {"MKT": ("mkt", 0.4), "MLP": ("mlp", 1.5), "Finetune": ("finetune", 0.9)}
    return {name: [make_run(root, f"{name}-s{s}", noise=noise, seed=s, model_name=model) for s in (0, 1)]
            for name, (model, noise) in spec.items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per model, the way mkt run lists them: MKT, the single-domain baseline (TEM alone), a MEM run."""
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root, "mkt", noise=0.4), make_run(root, "finetune", noise=1.5, ablation="no_mem_pretrain"),
            make_run(root, "mem", noise=0.8, stage="mem")]


@pytest.fixture
def no_figures(monkeypatch):
    """Tables-only reports: drawing the PNGs takes ~2 s per report and a few tests check them."""
    monkeypatch.setattr("mkt_torchrec.evaluation.report.draw_figures", lambda *args, **kw: {})


def _metrics(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        return json.load(f)


def _md_rows(md: str, table: int) -> dict:
    """Rows of Markdown table ``table`` (1-based)."""
    section = md.split(f"## Table {table}:")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [[c.strip() for c in line.strip()[1:-1].split(" | ")] for line in lines[2:]]
    return {"header": header, "rows": rows}


def _cell(table: dict, row: list, column: str) -> str:
    return row[table["header"].index(column)]


def _mean_std(values) -> str:
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


# --------------------------------------------------------------------------------------------------------
# Table 2 over seeds
# --------------------------------------------------------------------------------------------------------


def test_table2_layout_over_two_seeds(grouped, tmp_path):
    out = str(tmp_path / "report")
    s = write_report(grouped, out, baseline="MLP", eval_cfg=CFG)
    for name in ("report.html", "report.md", "report.json", "roc.png", "groups.png", "calibration.png", "loss.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".report-")]  # the staging directory is gone
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert html.count("data:image/png;base64,") == 4
    assert 'class="num pos"' in html  # MKT's seed-level intervals exclude 0: coloured
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|[^"'#d])""", html)  # nothing fetched from outside
    assert "http" not in html and "<link" not in html and "<script" not in html

    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    t = _md_rows(md, 1)
    assert t["header"][:5] == ["Family", "Model", "Seeds", "AUC", "GAUC (users)"]
    # Rows grouped by family in the paper's order, whatever order the models were given in; the family label
    # on the first row of its group.
    assert [(r[0], r[1]) for r in t["rows"]] == [("Single-domain", "MLP"), ("Pre-training & fine-tuning", "Finetune"),
                                                 ("MKT and ablations", "MKT")]
    base = [_metrics(d)["target"] for d in grouped["MLP"]]
    for row in t["rows"]:
        ms = [_metrics(d)["target"] for d in grouped[row[1]]]
        users = min(m["users_evaluated"] for m in ms)
        assert users >= 250
        assert _cell(t, row, "Seeds") == "2"
        assert _cell(t, row, "AUC") == _mean_std([m["auc"] for m in ms])
        assert _cell(t, row, "GAUC (users)") == f"{_mean_std([m['gauc'] for m in ms])} ({users:,} users)"
        if row[1] == "MLP":
            assert _cell(t, row, "Δ AUC vs baseline") == "baseline"
            continue
        d = statistics.fmean(m["auc"] for m in ms) - statistics.fmean(m["auc"] for m in base)
        ref = statistics.fmean(m["auc"] for m in base)
        assert _cell(t, row, "Δ AUC vs baseline") == f"{d:+.4f} ({100 * d / ref:+.2f}%)"
        # Two seeds: the interval shown is the seed-level Student-t one of the per-seed differences.
        model = next(m for m in s["models"] if m["name"] == row[1])
        assert model["interval"] == "seed_level" and model["interval_label"] is None
        for metric, label in (("auc", "AUC"), ("gauc", "GAUC"), ("logloss", "LogLoss")):
            diffs = [a[metric] - b[metric] for a, b in zip(ms, base)]
            half = scipy.stats.t.ppf(0.975, 1) * statistics.stdev(diffs) / np.sqrt(2)
            lo, hi = statistics.fmean(diffs) - half, statistics.fmean(diffs) + half
            assert model["seed_level"][metric]["ci"] == pytest.approx([lo, hi], abs=1e-12)
            star = " *" if lo > 0 or hi < 0 else ""
            assert model["significant"][metric] == bool(star)
            assert _cell(t, row, f"Δ {label} 95% CI") == f"[{lo:+.4f}, {hi:+.4f}]{star}"
        d = statistics.fmean(m["logloss"] for m in ms) - statistics.fmean(m["logloss"] for m in base)
        ref = statistics.fmean(m["logloss"] for m in base)
        assert _cell(t, row, "Δ LogLoss vs baseline") == f"{d:+.4f} ({100 * d / ref:+.2f}%)"
    # Log loss and calibration beside AUC and GAUC, mean ± std over the seeds.
    for row in t["rows"]:
        ms = [_metrics(d)["target"] for d in grouped[row[1]]]
        assert _cell(t, row, "LogLoss") == _mean_std([m["logloss"] for m in ms])
        assert _cell(t, row, "ECE") == _mean_std([m["calibration"]["ece"] for m in ms])
        cal = [m["calibration"] for m in ms]
        mean_score, click_rate = (statistics.fmean(c[k] for c in cal) for k in ("mean_score", "click_rate"))
        assert _cell(t, row, "Mean score / click rate") == f"{mean_score:.4f} / {click_rate:.4f}"
    mkt = next(m for m in s["models"] if m["name"] == "MKT")
    assert mkt["family"] == "mkt" and mkt["seeds"] == [0, 1] and mkt["user_level"]["pairs"] == 2
    assert mkt["seed_level"]["pairs"] == 2 and mkt["seed_level"]["seeds"] == [0, 1]
    assert mkt["seed_level"]["paired_by"] == "seed" and mkt["seed_level"]["left_out"] == []
    assert mkt["user_level"]["paired_by"] == "seed" and mkt["user_level"]["left_out"] == []
    assert mkt["user_level"]["auc_diff_ci"][0] > 0 and mkt["user_level"]["gauc_diff_ci"][0] > 0  # 0.4 vs 1.5 noise
    assert set(mkt["seed_level"]["groups"]) == {"0-10", "10-30", ">30"}
    assert "Student-t interval over seeds" in md and "test-user sampling only (1 seed)" in md
    assert s["families"] == {"single_domain": "Single-domain", "pretrain_finetune": "Pre-training & fine-tuning",
                             "mkt": "MKT and ablations"}

    # Every run's own table: bootstrap intervals, log loss and calibration from metrics.json.
    per_run = next(x for x in s["tables"] if x["key"] == "per_run")
    row = next(r for r in per_run["rows"] if r[0] == "MKT" and r[1] == "1")
    m = _metrics(grouped["MKT"][1])["target"]
    assert row[5:] == [f"{m['logloss']:.4f}", f"{m['calibration']['ece']:.4f}",
                       f"{m['calibration']['mean_score']:.4f}", f"{m['calibration']['click_rate']:.4f}"]
    # report.json repeats metrics.json unchanged.
    with open(os.path.join(out, "report.json")) as f:
        saved = json.load(f)
    # runs and models in table (family) order
    assert [r["run_dir"] for r in saved["runs"]] == [d for n in ("MLP", "Finetune", "MKT") for d in grouped[n]]
    assert [m["name"] for m in saved["models"]] == ["MLP", "Finetune", "MKT"]
    for r in saved["runs"]:
        assert r["metrics"] == {e: v for e, v in _metrics(r["run_dir"]).items() if e in ("source", "target")}


def test_pooled_paired_interval_matches_an_in_memory_reference(grouped, tmp_path, no_figures):
    """The streaming pooled interval equals the one computed from rows in memory: per pair (same seed) the
    replicate differences under the same user resamples, averaged over the pairs, then percentiles."""
    s = write_report(grouped, str(tmp_path / "r"), baseline="MLP", eval_cfg=CFG)
    mkt = next(m for m in s["models"] if m["name"] == "MKT")["user_level"]

    def in_memory(run_dir):
        df = pq.read_table(os.path.join(run_dir, "predictions")).to_pandas()
        df = df[df["entity"] == "target"]
        st = bootstrap.user_stats_from_rows(df["user_id"], df["label"], df["score"])
        m = _metrics(run_dir)["target"]
        return m, bootstrap.replicates(st, SAMPLES, CFG.seed)

    diffs = {"auc": [], "gauc": []}
    points = {"auc": [], "gauc": []}
    for run, base in zip(grouped["MKT"], grouped["MLP"]):
        (m, rm), (b, rb) = in_memory(run), in_memory(base)
        for k in diffs:
            diffs[k].append(getattr(rm, k) - getattr(rb, k))
            points[k].append(m[k] - b[k])
    for k in diffs:
        assert mkt[f"{k}_diff"] == pytest.approx(statistics.fmean(points[k]), abs=1e-12)
        want = bootstrap.percentile_ci(np.mean(diffs[k], axis=0), CFG.confidence)
        assert mkt[f"{k}_diff_ci"] == pytest.approx(want, abs=1e-12)
        assert mkt[f"{k}_diff_ci"][0] <= mkt[f"{k}_diff"] <= mkt[f"{k}_diff_ci"][1]
    assert mkt["samples"] == SAMPLES and mkt["rows"] == len(TEST_SPLIT)


def test_pairs_by_seed_and_leaves_out_runs_on_other_rows(grouped, tmp_path, no_figures):
    other = make_run(tmp_path, "other-rows", noise=0.4, seed=1, rows=test_rows(300, seed=5))
    # MKT lists seed 1 first: pairing goes by seed, not position; its seed-1 run is on other rows.
    runs = {"MLP": grouped["MLP"], "MKT": [other, grouped["MKT"][0]]}
    s = write_report(runs, str(tmp_path / "r"), eval_cfg=CFG)
    model = next(m for m in s["models"] if m["name"] == "MKT")
    for p in (model["user_level"], model["seed_level"]):
        assert p["paired_by"] == "seed" and p["pairs"] == 1
        assert p["runs"] == [[grouped["MKT"][0], grouped["MLP"][0]]]
        assert [x["run"] for x in p["left_out"]] == [other]
        assert "not on the same rows" in p["left_out"][0]["reason"]
    # One usable pair of two seeds: the user-level interval, labelled, never significant.
    assert model["interval"] == "user_level" and model["significant"] == {}
    cols = s["tables"][0]["columns"]
    row = next(r for r in s["tables"][0]["rows"] if r[1] == "MKT")
    assert row[cols.index("Δ AUC 95% CI")].endswith("] (test-user sampling only, 1 seed)")
    # Only runs on other rows: no interval, the reason in the cell.
    s = write_report({"MLP": grouped["MLP"][:1], "X": [other]}, str(tmp_path / "r2"), eval_cfg=CFG)
    row = next(r for r in s["tables"][0]["rows"] if r[1] == "X")
    cells = {row[cols.index(f"Δ {k} 95% CI")] for k in ("AUC", "GAUC", "LogLoss")}
    assert cells and all(c.startswith("n/a (not on the same rows: ") for c in cells), cells
    # Without seeds in run.json: by position.
    mlp, mkt = load_models(runs)
    for r in mlp.runs + mkt.runs:
        r.seed = None
    pairs, how = pair_runs(mkt, mlp)
    assert how == "position" and [(a.run_dir, b.run_dir) for a, b in pairs] == list(zip(runs["MKT"], runs["MLP"]))


def test_flags_below_chance_and_worse_than_base_rate(grouped, tmp_path, no_figures):
    """A model whose seed-1 run has inverted scores (AUC < 0.5, and a log loss far above the base rate's), and
    a very noisy one (overconfident: log loss above the base rate's on every seed): flagged in the row, under
    the table, in the header and in report.json."""
    inverted = [grouped["MKT"][0], make_run(tmp_path, "inv-s1", noise=0.4, seed=1, sign=-1.0)]
    noisy = [make_run(tmp_path, f"noisy-s{s}", noise=4.0, seed=s) for s in (0, 1)]
    out = str(tmp_path / "r")
    s = write_report({"MLP": grouped["MLP"], "Inverted": inverted, "Noisy": noisy}, out, baseline="MLP",
                     eval_cfg=CFG)
    models = {m["name"]: m for m in s["models"]}
    inv = {f["code"]: f for f in models["Inverted"]["flags"]}
    assert set(inv) == {"auc_below_chance", "logloss_above_base_rate"}
    assert inv["auc_below_chance"]["seeds"] == [1] and not inv["auc_below_chance"]["all_runs"]
    assert inv["auc_below_chance"]["values"] == [_metrics(inverted[1])["target"]["auc"]]
    m = _metrics(noisy[0])["target"]
    p = m["calibration"]["click_rate"]
    assert m["logloss"] > -(p * np.log(p) + (1 - p) * np.log(1 - p))
    assert [(f["code"], f["all_runs"]) for f in models["Noisy"]["flags"]] == [("logloss_above_base_rate", True)]
    runs = {r["run_dir"]: r for r in s["runs"]}
    assert [f["code"] for f in runs[inverted[1]]["flags"]] == ["auc_below_chance", "logloss_above_base_rate"]
    assert runs[inverted[0]]["flags"] == []
    t = s["tables"][0]
    rows = {r[1]: r for r in t["rows"]}
    flags = t["columns"].index("Flags")
    assert rows["Inverted"][flags] == ("⚠ below chance (AUC < 0.5) (seed 1); "
                                       "⚠ worse than base rate (log loss) (seed 1)")
    assert rows["Noisy"][flags] == "⚠ worse than base rate (log loss)"
    md = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "**Flagged:**" in md and "- Noisy: ⚠ worse than base rate (log loss)" in md
    assert "Flagged here: " in md.split("## Table 1:")[1].split("## Table 2:")[0]
    html = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert "⚠ below chance (AUC &lt; 0.5) (seed 1)" in html
    # Noisy's Δ log loss is worse than the baseline's; side by side with the AUC and GAUC differences.
    assert rows["Noisy"][t["columns"].index("Δ LogLoss vs baseline")].startswith("+")


# --------------------------------------------------------------------------------------------------------
# Too few users
# --------------------------------------------------------------------------------------------------------


def test_gauc_resting_on_too_few_users_is_not_shown(grouped, tmp_path, no_figures):
    s = write_report(grouped, str(tmp_path / "r"), baseline="MLP", eval_cfg=CFG)
    groups = next(t for t in s["tables"] if t["key"] == "groups")
    cols = groups["columns"]
    few = [r for r in groups["rows"] if r[0] == "0-10" or (r[0] == "" and groups["rows"].index(r) < 3)]
    assert len(few) == 3
    for r in few:
        m = [_metrics(d)["target"] for d in grouped[r[1]]]
        n = min(next(g for g in x["groups"] if g["name"] == "0-10")["users_evaluated"] for x in m)
        assert 0 < n < CFG.min_gauc_users
        assert r[cols.index("GAUC (users)")] == f"too few users ({n})"
        assert r[cols.index("GAUC improv.")] in ("-", "n/a (too few users)")  # "-" on the baseline's row
    mkt_rows = [r for r in groups["rows"] if r[1] == "MKT"]
    assert mkt_rows[0][cols.index("GAUC improv.")] == "n/a (too few users)"
    assert re.fullmatch(r"\d\.\d{4} ± \d\.\d{4} \(\d+ users\)", mkt_rows[2][cols.index("GAUC (users)")])
    assert re.fullmatch(r"[+-]\d+\.\d{2}%( \*)?", mkt_rows[2][cols.index("GAUC improv.")])  # *: seed-level
    # The same rule in the overall table, its paired interval and the per-run table.
    s = write_report(grouped, str(tmp_path / "r2"), baseline="MLP",
                     eval_cfg=EvalConfig(bootstrap_samples=5, min_gauc_users=10_000))
    t = s["tables"][0]
    cols = t["columns"]
    for r in t["rows"]:
        n = min(_metrics(d)["target"]["users_evaluated"] for d in grouped[r[1]])
        assert r[4] == f"too few users ({n})"
        if r[1] != "MLP":
            assert r[cols.index("Δ GAUC vs baseline")] == r[cols.index("Δ GAUC 95% CI")] == "n/a (too few users)"
            assert r[cols.index("Δ AUC vs baseline")] != "n/a (too few users)"  # the AUC needs no users
            assert r[cols.index("Δ AUC 95% CI")] != "n/a (too few users)"
    assert not any(m["significant"].get("gauc") for m in s["models"])
    per_run = next(x for x in s["tables"] if x["key"] == "per_run")
    assert all(r[4].startswith("too few users (") for r in per_run["rows"])


# --------------------------------------------------------------------------------------------------------
# Families, baseline, the old list form
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, ablation, family", [
    ("mlp", "none", "single_domain"), ("din", "none", "single_domain"), ("fibinet", "none", "single_domain"),
    ("mmoe", "none", "joint"), ("ple", "none", "joint"), ("star", "none", "joint"), ("conet", "none", "joint"),
    ("minet", "none", "pretrain_finetune"), ("finetune", "none", "pretrain_finetune"),
    ("ctnet", "none", "pretrain_finetune"), ("mkt", "none", "mkt"), ("mkt", "no_hfa", "mkt"),
    ("mkt", "no_tem_finetune", "mkt"), ("mkt", "no_mem_pretrain", "single_domain"), ("xgboost", "none", "other"),
])
def test_family_from_run_json(name, ablation, family):
    assert family_of(Run("m", "d", "tem", ablation, {}, {}, [], model_name=name)) == family


def test_families_override_and_errors(grouped, tmp_path, no_figures):
    s = write_report(grouped, str(tmp_path / "r"), eval_cfg=EvalConfig(bootstrap_samples=0),
                     families={"MLP": "joint"})
    assert [(r[0], r[1]) for r in s["tables"][0]["rows"]][0] == ("Joint training", "MLP")
    assert s["baseline"] == "MKT"  # no no_mem_pretrain model: the first one
    # No bootstrap, nothing streamed for pairing: the seed-level intervals still come from metrics.json.
    others = [m for m in s["models"] if not m["is_baseline"]]
    assert [m["interval"] for m in others] == ["seed_level"] * 2
    assert all(m["seed_level"]["pairs"] == 2 and m["user_level"] == {"error": "n/a (no bootstrap)"} for m in others)
    with pytest.raises(ValueError, match="unknown families"):
        write_report(grouped, str(tmp_path / "x"), families={"MLP": "deep"})
    with pytest.raises(ValueError, match="not in the report"):
        write_report(grouped, str(tmp_path / "x"), families={"Nope": "joint"})
    with pytest.raises(ValueError, match="different families"):
        write_report({"Mixed": [grouped["MLP"][0], grouped["MKT"][0]]}, str(tmp_path / "x"))
    with pytest.raises(ValueError, match="names apply to a list"):
        write_report(grouped, str(tmp_path / "x"), names=["a", "b", "c"])
    assert not os.path.exists(tmp_path / "x")


def test_list_of_runs_is_one_model_each(runs, tmp_path, no_figures):
    """write_report(run_dirs, ...) as mkt run called it: names, baseline by run directory."""
    s = write_report(runs, str(tmp_path / "r"), baseline=runs[1], names=["mkt", "no_mem_pretrain", "mem"],
                     eval_cfg=CFG)
    assert s["baseline"] == "no_mem_pretrain"
    rows = {r[1]: r for r in s["tables"][0]["rows"]}
    assert rows["no_mem_pretrain"][0] == "Single-domain" and rows["mkt"][0] == "MKT and ablations"
    assert rows["mkt"][2] == "1" and " ± " not in rows["mkt"][3]
    assert rows["mkt"][3] == f"{_metrics(runs[0])['target']['auc']:.4f}"
    # Clearly better, but with a single seed: the user-level interval, labelled, neither * nor coloured.
    cols = s["tables"][0]["columns"]
    mkt_model = next(m for m in s["models"] if m["name"] == "mkt")
    lo, hi = mkt_model["user_level"]["auc_diff_ci"]
    assert lo > 0 and mkt_model["interval"] == "user_level"
    assert mkt_model["interval_label"] == "test-user sampling only (1 seed): does not include training variance"
    assert rows["mkt"][cols.index("Δ AUC 95% CI")] == f"[{lo:+.4f}, {hi:+.4f}] (test-user sampling only, 1 seed)"
    assert rows["mkt"][cols.index("Δ LogLoss 95% CI")] == "n/a (1 seed)"
    html = open(tmp_path / "r" / "report.html", encoding="utf-8").read()
    assert 'class="num pos"' not in html and 'class="num neg"' not in html
    # The default baseline is the no_mem_pretrain run although it is not the first; default names.
    s = write_report(runs, str(tmp_path / "r2"), eval_cfg=EvalConfig(bootstrap_samples=0))
    assert s["baseline"] == "finetune (w/o MEM pretrain)"
    assert s["tables"][0]["rows"][1][s["tables"][0]["columns"].index("Δ AUC 95% CI")] == "n/a (no bootstrap)"
    entities = next(t for t in s["tables"] if t["key"] == "entities")  # only the MEM run, both entities
    mem = _metrics(runs[2])
    assert [r[0] for r in entities["rows"]] == ["mem"]
    assert entities["rows"][0][3].startswith(f"{mem['source']['auc']:.4f} [")


def test_baseline_errors_and_source_entity(runs, tmp_path, no_figures):
    s = write_report(runs, str(tmp_path / "a"), baseline="mem", entity="source", eval_cfg=CFG)
    assert s["baseline"] == "mem"
    rows = {r[1]: r for r in s["tables"][0]["rows"]}
    assert rows["mkt"][3] == "no source rows"
    assert rows["mem"][3] == f"{_metrics(runs[2])['source']['auc']:.4f}"
    with pytest.raises(ValueError, match="baseline 'nope'"):
        write_report(runs, str(tmp_path / "c"), baseline="nope")
    with pytest.raises(ValueError, match="2 names for 3 runs"):
        write_report(runs, str(tmp_path / "c"), names=["A", "B"])
    with pytest.raises(ValueError, match="entity"):
        write_report(runs, str(tmp_path / "c"), entity="item")
    assert not os.path.exists(tmp_path / "c")


def test_missing_metrics_or_predictions_names_the_run_dir(runs, tmp_path):
    fresh = str(tmp_path / "never_evaluated")
    os.makedirs(fresh)
    with pytest.raises(FileNotFoundError,
                       match=re.escape(fresh) + r": metrics.json is missing; run mkt evaluate first"):
        write_report([runs[0], fresh], str(tmp_path / "out"))
    with open(os.path.join(fresh, "metrics.json"), "w") as f:
        json.dump({"stage": "tem"}, f)
    with pytest.raises(FileNotFoundError, match=re.escape(fresh) + r": no predictions"):
        write_report({"A": [runs[0]], "B": [fresh]}, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["never_evaluated"]  # nothing half-written


def test_metrics_json_without_intervals_groups_or_ceiling(tmp_path):
    old = [make_run(tmp_path, "a", noise=0.3, old_metrics=True),
           make_run(tmp_path, "b", noise=0.9, ablation="no_hfa", old_metrics=True)]
    s = write_report(old, str(tmp_path / "out"), eval_cfg=EvalConfig(bootstrap_samples=0, plot_sample_rows=300))
    assert [t["key"] for t in s["tables"]] == ["overall", "per_run"]
    assert s["baseline"] == "a" and s["tables"][0]["rows"][1][1] == "b (w/o HFA)"
    assert s["tables"][0]["rows"][0][4].endswith("(? users)")  # no users_evaluated in old metrics.json
    assert s["tables"][1]["rows"][0][5:] == ["-"] * 4  # no log loss / calibration
    assert set(s["plots"]) == {"roc", "calibration", "loss"}
    # Rewriting into the same directory replaces the report and drops plots it no longer draws.
    os.makedirs(tmp_path / "out2")
    (tmp_path / "out2" / "groups.png").write_bytes(b"old")
    (tmp_path / "out2" / "notes.txt").write_text("mine")
    write_report(old, str(tmp_path / "out2"), eval_cfg=EvalConfig(bootstrap_samples=0, plot_sample_rows=300))
    assert sorted(os.listdir(tmp_path / "out2")) == ["calibration.png", "loss.png", "notes.txt", "report.html",
                                                    "report.json", "report.md", "roc.png"]


# --------------------------------------------------------------------------------------------------------
# Memory: samples and streaming
# --------------------------------------------------------------------------------------------------------


def test_plot_sample_is_bounded_seeded_and_shared_by_runs_on_the_same_rows(grouped):
    mlp, mkt = load_models({"MLP": grouped["MLP"][:1], "MKT": grouped["MKT"][:1]})
    a = scan_predictions(mlp.runs[0], "target", 200, seed=3, batch_rows=7)
    b = scan_predictions(mlp.runs[0], "target", 200, seed=3, batch_rows=100_000)
    c = scan_predictions(mkt.runs[0], "target", 200, seed=3, batch_rows=64)
    assert a.rows == b.rows == c.rows == len(TEST_SPLIT) and a.digest == b.digest == c.digest
    assert a.sample["label"].shape == (200,)
    for k in a.sample:
        np.testing.assert_array_equal(a.sample[k], b.sample[k])  # independent of the batch size
    np.testing.assert_array_equal(a.sample["label"], c.sample["label"])  # the same rows of another run
    assert not np.array_equal(a.sample["score"], c.sample["score"])
    d = scan_predictions(mlp.runs[0], "target", 200, seed=4)
    assert not np.array_equal(a.sample["true_prob"], d.sample["true_prob"])  # another seed, another sample
    assert scan_predictions(mlp.runs[0], "target", 0, seed=3).sample is None


def _report_peak_bytes(root, rows_per_user: tuple, tag: str) -> tuple:
    """tracemalloc peak of one report over two single-seed models on a split of 1,000 users."""
    split = test_rows(1000, seed=7, rows_per_user=rows_per_user)
    runs = {"A": [make_run(root, f"a-{tag}", noise=1.0, rows=split)],
            "B": [make_run(root, f"b-{tag}", noise=0.5, rows=split)]}
    # Spill from the first row; one user partition of at most ~20,000 rows, score buckets of ~10,000.
    limits = SpillLimits(threshold_rows=0, partition_rows=20_000, bucket_rows=10_000, batch_rows=8192)
    cfg = EvalConfig(bootstrap_samples=10, plot_sample_rows=1000, partitions=1)
    tracemalloc.start()
    try:
        write_report(runs, os.path.join(str(root), f"report-{tag}"), eval_cfg=cfg, limits=limits,
                     spill_dir=str(root))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return len(split), peak


def test_report_memory_does_not_grow_with_the_rows(tmp_path, monkeypatch, no_figures):
    """Ten times the rows (same users): the report's peak of traced (numpy and Python) memory stays within 1.5x
    (measured 1.12x: 2.37 MB for 20,000 rows, 2.66 MB for 200,000), far below the predictions themselves. The
    peak is set by the spill limits, the plot sample and O(users). Beyond EXACT_AUC_BUDGET the AUC replicates are
    linearised, as here; below it at most EXACT_AUC_BUDGET / samples rows are held in score order."""
    monkeypatch.setattr(bootstrap, "EXACT_AUC_BUDGET", 0)
    _report_peak_bytes(tmp_path, (20, 21), "warm")  # imports and caches first: tracemalloc would count them
    rows_small, small = _report_peak_bytes(tmp_path, (20, 21), "small")
    rows_large, large = _report_peak_bytes(tmp_path, (200, 201), "large")
    assert rows_large == 10 * rows_small == 200_000
    assert large < 1.5 * small, (small, large)
    # Both runs' prediction columns (user_id, label, score, activity, true_prob: 25 bytes a row) of the larger split:
    assert large < 0.5 * 2 * 25 * rows_large, (small, large)


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------


def test_cli(runs, grouped, tmp_path, capsys, no_figures):
    import argparse

    from mkt_torchrec import cli
    from mkt_torchrec.evaluation.report_cli import add_arguments, run

    assert "report" in cli._COMMANDS  # mkt report dispatches to report_cli (the full parser imports torchrec: slow)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = types.SimpleNamespace(eval=EvalConfig(bootstrap_samples=0))
    out = str(tmp_path / "r")
    args = parser.parse_args([*runs, "--out", out, "--name", "MKT", "--name", "Finetune", "--name", "MEM",
                              "--baseline", "Finetune", "--entity", "target"])
    assert run(args, cfg) == 0
    printed = capsys.readouterr().out
    assert os.path.join(out, "report.html") in printed and "baseline Finetune" in printed
    line = next(line for line in printed.splitlines() if line.startswith("MKT "))
    m, base = _metrics(runs[0])["target"], _metrics(runs[1])["target"]
    assert f"{m['auc']:.4f}" in line and f"{m['auc'] - base['auc']:+.4f}" in line
    with pytest.raises(ValueError, match="baseline 'x'"):
        run(parser.parse_args([runs[0], "--out", out, "--baseline", "x"]), cfg)
    # Models with several seeds, a family set by hand.
    args = parser.parse_args(["--model", "MLP=" + ",".join(grouped["MLP"]), "--model",
                              "MKT=" + ",".join(grouped["MKT"]), "--family", "MLP=joint", "--baseline", "MLP",
                              "--out", out])
    assert run(args, cfg) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("MKT "))
    assert " 2 " in line and " ± " in line
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["models"][0]["family"] == "joint"
    with pytest.raises(ValueError, match="not both"):
        run(parser.parse_args([runs[0], "--model", f"X={runs[1]}", "--out", out]), cfg)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        run(parser.parse_args(["--model", runs[1], "--out", out]), cfg)


def test_report_needs_no_config(runs, tmp_path, capsys, no_figures):
    """The README's `mkt report RUN ... --out DIR` works as written (it used to require --config)."""
    from mkt_torchrec.cli import main

    out = str(tmp_path / "nocfg")
    assert main(["report", *runs, "--out", out, "--set", "eval.bootstrap_samples=0"]) == 2  # --set needs --config
    assert main(["report", *runs, "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "report.html"))
