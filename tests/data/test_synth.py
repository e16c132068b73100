import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from mkt_torchrec.data.synth import generate

from tests.conftest import QUICKSTART, SMALL, set_flags, small_config


def test_planted_structure(small_dataset):
    manifest = json.load(open(os.path.join(small_dataset, "manifest.json")))
    rows = manifest["rows"]
    src = rows["train"]["source"] + rows["test"]["source"]
    tgt = rows["train"]["target"] + rows["test"]["target"]
    assert 0.2 < tgt / src < 0.5  # the target entity is the sparse one (about 1/3)
    t = pq.read_table(os.path.join(small_dataset, "train")).to_pandas()
    # entity-specific features are null on the other entity's rows
    assert t.loc[t.entity == 0, "style"].isna().all() and t.loc[t.entity == 1, "price_bucket"].isna().all()
    assert t.loc[t.entity == 0, "price_bucket"].notna().all() and t.loc[t.entity == 1, "style"].notna().all()
    # many users have few target rows
    per_user_tgt = t[t.entity == 1].groupby("user_id").size().reindex(t.user_id.unique(), fill_value=0)
    assert (per_user_tgt <= 2).mean() > 0.3
    # the true probability is calibrated and informative
    for code in (0, 1):
        g = t[t.entity == code]
        assert abs(g.label.mean() - g.true_prob.mean()) < 0.03
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(t.label, t.true_prob) > 0.75


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    cfg = small_config("synth.users=100", "synth.source_rows=1000")
    a = generate(cfg, str(tmp_path / "a"))
    b = generate(cfg, str(tmp_path / "b"))
    assert a.rows == b.rows
    ta = pq.read_table(str(tmp_path / "a" / "train"))
    assert ta.equals(pq.read_table(str(tmp_path / "b" / "train")))
    cfg.synth.seed = 1
    generate(cfg, str(tmp_path / "c"))
    assert not ta.equals(pq.read_table(str(tmp_path / "c" / "train")))


def test_split_is_per_user_time_order_fraction(small_dataset):
    m = json.load(open(os.path.join(small_dataset, "manifest.json")))["rows"]
    test = m["test"]["source"] + m["test"]["target"]
    total = test + m["train"]["source"] + m["train"]["target"]
    assert 0.1 < test / total < 0.2  # ceil per user keeps a little over 80% in train


def test_interrupted_write_leaves_no_dataset(tmp_path, monkeypatch):
    import mkt_torchrec.data.synth as synth

    calls = {"n": 0}
    real = synth._chunk_rows

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "_chunk_rows", failing)
    out = tmp_path / "ds"
    with pytest.raises(KeyboardInterrupt):
        generate(small_config("synth.users=400"), str(out))
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith("ds")]


def test_existing_output_is_kept_without_overwrite(small_dataset):
    with pytest.raises(FileExistsError, match="already exists"):
        generate(small_config(), small_dataset)


def test_schema_without_synth_features_is_rejected():
    cfg = small_config("schema.features.style.group=shared", "schema.features.style.entity=null")
    del cfg.schema.features["style"]
    del cfg.schema.tables["style"]
    with pytest.raises(ValueError, match=r"schema.features lacks \['style'\]"):
        generate(cfg, "/nonexistent/never-written")


def test_overwrite_replaces_only_what_this_tool_wrote(tmp_path, capsys):
    """``--overwrite`` used to delete any directory (``mkt synth --out victim --overwrite``)."""
    from mkt_torchrec.cli import main

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    args = ["synth", "--config", QUICKSTART, *set_flags(*SMALL), "--out", str(victim),
            "--overwrite"]
    assert main(args) == 1
    assert "is not a dataset" in capsys.readouterr().err
    assert (victim / "thesis.txt").read_text() == "years of work"
    out = tmp_path / "ds"
    assert main([*args[:-3], "--out", str(out)]) == 0
    assert main([*args[:-3], "--out", str(out), "--overwrite"]) == 0  # a dataset is replaced
    run_out = tmp_path / "notarun"
    run_out.mkdir()
    (run_out / "keep.txt").write_text("x")
    assert main(["run", "--config", QUICKSTART, "--out", str(run_out), "--overwrite"]) == 1
    assert (run_out / "keep.txt").exists() and "is not the output of mkt run" in capsys.readouterr().err
