"""README "Your own data", end to end on a real S3 server (moto, on localhost): Spark-style logs in a bucket ->
`mkt build` with DuckDB and with Spark (the same rows) -> `mkt run --data s3://...` trains MKT and a baseline ->
the run directories (checkpoints, logs, predictions, exports) and the report on S3 too (`mkt run --out s3://...`),
and `mkt report` reading those runs."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from mkt_torchrec import storage
from mkt_torchrec.cli import main

from tests.conftest import REPO

pytest_plugins = ["tests.s3"]

LOGS = os.path.join(REPO, "configs", "logs.yaml")
SMALL_LOGS = ["synth.users=300", "synth.source_rows=4000", "synth.source_items=1500", "synth.target_items=500",
              "data.batch_size=128", "data.num_workers=0", "source.row_group_rows=500",
              "train.patience=1", "train.max_epochs=2", "train.log_every=10", "eval.bootstrap_samples=10",
              "eval.min_gauc_users=5", "source.split.by=time", "source.split.valid_from=2026-11-12",
              "source.split.test_from=2026-11-13"]


def rows_of(location: str) -> dict:
    """split -> entity -> the dataset's rows in manifest order, read through the storage layer."""
    manifest = json.loads(storage.read_bytes(storage.join(location, "manifest.json")))
    fs, root = storage.filesystem(location)
    out: dict = {}
    for split, files in manifest["splits"].items():
        for fi in files:
            table = pq.read_table(f"{root.rstrip('/')}/{fi['path']}", filesystem=fs)
            for row in table.to_pylist():
                out.setdefault(split, {}).setdefault(row["entity"], []).append(row)
    return out


def test_spark_style_logs_on_s3_build_with_both_engines_and_train_from_s3(s3_bucket, tmp_path, capsys):
    sets = [w for s in SMALL_LOGS for w in ("--set", s)]
    assert main(["synth", "--config", LOGS, *sets, "--layout", "logs", "--out", str(tmp_path / "logs")]) == 0
    fs, bucket = storage.filesystem(s3_bucket)
    pafs.copy_files(str(tmp_path / "logs"), f"{bucket}/logs", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    sets += ["--set", f"source.inputs=[{{path: {s3_bucket}/logs}}]"]
    assert main(["build", "--config", LOGS, *sets, "--out", f"{s3_bucket}/ds"]) == 0
    built = rows_of(f"{s3_bucket}/ds")
    assert set(built) == {"train", "valid", "test"} and all(len(built[s]) == 2 for s in built)
    if shutil.which("java"):
        assert main(["build", "--config", LOGS, *sets, "--engine", "spark", "--out", f"{s3_bucket}/ds-spark"]) == 0
        assert rows_of(f"{s3_bucket}/ds-spark") == built
    capsys.readouterr()
    out = f"{s3_bucket}/exp"  # run directories, checkpoints, exports and the report: all on the store
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MKT_RUN_CACHE", str(tmp_path / "cache"))  # the jobs' local copies
        assert main(["run", "--config", LOGS, *sets, "--data", f"{s3_bucket}/ds", "--out", out, "--runs", "mkt",
                     "finetune", "--seeds", "1"]) == 0
    summary = json.loads(storage.read_bytes(f"{out}/summary.json"))
    assert summary["data"] == f"{s3_bucket}/ds"
    for name in ("mkt", "finetune"):
        assert summary["target"][name]["rows"] == sum(1 for _ in built["test"][1]), name
    runs = summary["runs"]
    assert runs["mkt"] == [f"{out}/runs/mkt/seed0/tem"]
    stored = set(storage.listdir(f"{out}/runs", recursive=True))
    for stage in ("mkt/seed0/mem", "mkt/seed0/tem", "finetune/seed0/mem", "finetune/seed0/tem"):
        assert {f"{stage}/run.json", f"{stage}/plan.json", f"{stage}/metrics.jsonl",
                f"{stage}/checkpoints/latest"} <= stored, stage
        assert f"{stage}/.lock" not in stored  # released
    for final in ("mkt/seed0/tem", "finetune/seed0/tem"):
        assert {f"{final}/metrics.json", f"{final}/predictions/part-00000.parquet",
                f"{final}/predictions/part-00001.parquet", f"{final}/serving/model.pt2",
                f"{final}/serving/serving.json"} <= stored, final
    assert {"mkt/seed0/mem/metrics.json", "finetune/seed0/mem/DONE"} <= stored  # (MKT's MEM is evaluated too)
    record = json.loads(storage.read_bytes(f"{runs['mkt'][0]}/run.json"))
    assert record["data"] == f"{s3_bucket}/ds" and record["mem_run"] == f"{out}/runs/mkt/seed0/mem"
    assert "testing" not in json.dumps(record)  # no credentials recorded
    assert "MKT" in storage.read_bytes(f"{out}/report/report.md").decode()
    # `mkt report` reads runs on the store (their predictions come to a local copy) and writes to it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MKT_RUN_CACHE", str(tmp_path / "cache2"))
        assert main(["report", "--model", f"Finetune={runs['finetune'][0]}", "--model", f"MKT={runs['mkt'][0]}",
                     "--out", f"{s3_bucket}/report", "--config", LOGS, "--set", "eval.bootstrap_samples=10"]) == 0
    published = set(storage.listdir(f"{s3_bucket}/report"))
    assert {"report.html", "report.md", "report.json"} <= published
    assert "MKT" in storage.read_bytes(f"{s3_bucket}/report/report.md").decode()


def test_a_report_on_s3_replaces_only_a_report_and_drops_its_stale_plots(s3_bucket, tmp_path):
    from mkt_torchrec.evaluation.report import _upload
    from mkt_torchrec.evaluation.report_figures import PLOT_FILES

    first, second = tmp_path / "first", tmp_path / "second"
    for d, names in ((first, ["report.html", "report.md", "report.json", PLOT_FILES[0]]),
                     (second, ["report.html", "report.md", "report.json"])):
        d.mkdir()
        for name in names:
            (d / name).write_text(f"{d.name} {name}")
    _upload(str(first), f"{s3_bucket}/r")
    _upload(str(second), f"{s3_bucket}/r")
    assert set(storage.listdir(f"{s3_bucket}/r")) == {"report.html", "report.md", "report.json"}
    assert storage.read_bytes(f"{s3_bucket}/r/report.html") == b"second report.html"
    storage.write_bytes_atomic(f"{s3_bucket}/other/thesis.txt", b"precious")
    with pytest.raises(FileExistsError, match="thesis.txt"):
        _upload(str(second), f"{s3_bucket}/other")
    assert set(storage.listdir(f"{s3_bucket}/other")) == {"thesis.txt"}
