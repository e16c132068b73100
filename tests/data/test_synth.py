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


def _fingerprint(path: str, skip: tuple = ()) -> tuple:
    """(sha256 of the set of rows of each split, every column but ``true_prob`` (and ``skip``), sum of
    ``true_prob``): exact on the discrete columns and blind to row order within a split (the generator moved each
    user's recent train rows to the end of the train split); the float sum is compared with a tolerance, as float
    rounding may differ between machines."""
    import hashlib

    h = hashlib.sha256()
    prob_sum = 0.0
    for split in ("train", "test"):
        t = pq.read_table(os.path.join(path, split))
        names = sorted(set(t.column_names) - set(skip) - {"true_prob"})
        prob_sum += float(np.asarray(t["true_prob"], dtype=np.float64).sum())
        rows = sorted(repr(row) for row in zip(*(t[n].to_pylist() for n in names)))
        h.update(split.encode())
        h.update(repr(names).encode())
        h.update("\n".join(rows).encode())
    return h.hexdigest(), prob_sum


def test_no_flip_gives_the_data_of_before_flip_fraction(tmp_path):
    """flip_fraction = 0 (the default) must not change the data: the fingerprint was taken with the
    generator as it was before ``synth.flip_fraction`` existed."""
    generate(small_config("synth.users=100", "synth.source_rows=1000", *BEFORE, *NO_SIDE_FEATURES),
             str(tmp_path / "a"))
    digest, prob_sum = _fingerprint(str(tmp_path / "a"))
    assert digest == "35ad85192b1e740377018836bceab33e3fa57cdd6fdc62a662b0ef35be4043ca"
    assert prob_sum == pytest.approx(277.70956465904624, rel=1e-6)


NO_SIDE_FEATURES = ("schema.sequences.hist_source_items.side_features={}",
                    "schema.sequences.hist_target_items.side_features={}")
# the generator's settings the fingerprints were taken with (quickstart.yaml has since changed them)
BEFORE = ("synth.flip_fraction=0", "schema.sequences.hist_source_items.max_len=50",
          "schema.sequences.hist_target_items.max_len=50")


def test_side_columns_are_each_history_items_category_and_change_nothing_else(tmp_path):
    """The side columns quickstart.yaml asks for are added; every other column is the data of before."""
    import mkt_torchrec.data.synth as synth

    cfg = small_config("synth.users=100", "synth.source_rows=1000", *BEFORE)
    generate(cfg, str(tmp_path / "a"))
    side = ("hist_source_categories", "hist_target_categories")
    digest, prob_sum = _fingerprint(str(tmp_path / "a"), skip=side)
    assert digest == "35ad85192b1e740377018836bceab33e3fa57cdd6fdc62a662b0ef35be4043ca"
    assert prob_sum == pytest.approx(277.70956465904624, rel=1e-6)
    world = synth._World(cfg)
    t = pq.read_table(os.path.join(str(tmp_path / "a"), "train"))
    for code, seq, column in ((0, "hist_source_items", side[0]), (1, "hist_target_items", side[1])):
        items, cats = t[seq].to_pylist(), t[column].to_pylist()
        assert [len(c) for c in cats] == [len(i) for i in items] and sum(map(len, cats)) > 0
        offset = synth.TARGET_ID_OFFSET if code else 0
        flat = np.array([x - offset for i in items for x in i], dtype=np.int64)
        assert [x for c in cats for x in c] == world.items[code]["cat"][flat].tolist()


def test_a_side_feature_the_generator_cannot_write_is_rejected(tmp_path):
    cfg = small_config("schema.sequences.hist_target_items.side_features={price_bucket: hist_target_prices}")
    with pytest.raises(ValueError, match=r"hist_target_items.side_features.price_bucket: the synthetic generator "
                                         r"writes the side features \['category', 'post_length', 'style'\]"):
        generate(cfg, str(tmp_path / "a"))


def _signed_transfer(flip_fraction: float, flipped: np.ndarray) -> dict:
    """Correlations between the source-entity affinity <z_u, w_i> and the true click probability, per entity
    and per group of categories (in ``flipped`` or not), and the mean affinity of each user's past items."""
    import mkt_torchrec.data.synth as synth

    cfg = small_config(f"synth.flip_fraction={flip_fraction}")
    world = synth._World(cfg)
    table, _ = synth._chunk_rows(world, cfg, 0, 0, cfg.synth.users)
    # the user interests z are the first draw of the chunk's generator
    z = np.random.default_rng([cfg.synth.seed, 2, 0]).normal(size=(cfg.synth.users, world.k))
    entity, user = table["entity"].to_numpy(), table["user_id"].to_numpy()
    item, prob = table["item_id"].to_numpy(), table["true_prob"].to_numpy()
    out = {}
    for code in (0, 1):
        m = entity == code
        idx = item[m] - (synth.TARGET_ID_OFFSET if code == 1 else 0)
        aff = np.einsum("nk,nk->n", z[user[m]], world.items[code]["w"][idx])
        in_flipped = np.isin(world.items[code]["cat"][idx], flipped)
        for g in (True, False):
            sel = in_flipped == g
            assert sel.sum() > 200
            out[("corr", code, g)] = np.corrcoef(aff[sel], prob[m][sel])[0, 1]
            out[("shown", code, g)] = aff[sel].mean()  # half the shown items are chosen by affinity
    # past items: each user's history (the same on all their rows), affinity to its category centre
    _, first = np.unique(user, return_index=True)
    for code, name in ((0, "hist_source_items"), (1, "hist_target_items")):
        hist = table[name].take(first).combine_chunks()
        owner = np.repeat(user[first], hist.value_lengths().to_numpy())
        idx = hist.flatten().to_numpy() - (synth.TARGET_ID_OFFSET if code == 1 else 0)
        cat = world.items[code]["cat"][idx]
        aff = np.einsum("nk,nk->n", z[owner], world.mu[cat])
        for g in (True, False):
            out[("hist", code, g)] = aff[np.isin(cat, flipped) == g].mean()
    return out


def test_flip_fraction_plants_negative_transfer_in_the_flipped_categories():
    import mkt_torchrec.data.synth as synth

    world = synth._World(small_config("synth.flip_fraction=0.5"))
    flipped = world.flipped
    assert len(flipped) == 32 and len(np.unique(flipped)) == 32  # round(0.5 * 64) categories
    assert (world.cat_sign[flipped] == -1).all() and (np.delete(world.cat_sign, flipped) == 1).all()
    # the catalogue is the same as without flips (the flips are drawn last)
    base = synth._World(small_config("synth.flip_fraction=0"))
    assert len(base.flipped) == 0 and (base.cat_sign == 1).all()
    assert np.array_equal(base.mu, world.mu) and np.array_equal(base.items[1]["w"], world.items[1]["w"])

    flip = _signed_transfer(0.5, flipped)
    # products: unchanged, the affinity raises the click probability in every category
    assert flip[("corr", 0, True)] > 0.5 and flip[("corr", 0, False)] > 0.5
    assert flip[("hist", 0, True)] > 0.5 and flip[("hist", 0, False)] > 0.5
    # posts: the product affinity lowers the click probability in flipped categories only ...
    assert flip[("corr", 1, True)] < -0.5 and flip[("corr", 1, False)] > 0.5
    # ... and the posts shown by affinity and the user's past posts follow the signed affinity
    assert flip[("shown", 1, True)] < -0.5 and flip[("shown", 1, False)] > 0.5
    assert flip[("hist", 1, True)] < -0.5 and flip[("hist", 1, False)] > 0.5
    # control: the same categories without flips transfer positively
    same = _signed_transfer(0.0, flipped)
    assert same[("corr", 1, True)] > 0.5 and same[("shown", 1, True)] > 0.5 and same[("hist", 1, True)] > 0.5


def test_flip_fraction_extremes():
    import mkt_torchrec.data.synth as synth

    assert (synth._World(small_config("synth.flip_fraction=1")).cat_sign == -1).all()
    assert len(synth._World(small_config("synth.flip_fraction=0.01")).flipped) == 1  # round(0.64)
