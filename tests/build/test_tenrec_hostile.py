"""Hostile and careless Tenrec inputs (issue 27): duplicate impressions, a header-only file."""

from __future__ import annotations

import os

import pytest

from mkt_torchrec.data.tenrec import convert

from tests.data.test_tenrec import article_row, read_split, tenrec_config, video_row, write_pair


def _rows(out: str) -> list[dict]:
    return read_split(out, "train") + read_split(out, "test")


def _own_item_in_history(rows: list[dict]) -> int:
    """Rows whose behaviour sequence of their own entity holds their own item (encoded alike: 2 * x + entity)."""
    return sum(r["item_id"] in r["hist_source_items" if r["entity"] == 0 else "hist_target_items"] for r in rows)


def _clean():
    """Every (user, item) once per file, half of each user's rows liked: no row may see its own item."""
    video = [video_row(u, 10 * u + k, like=k % 2, category=k % 3) for k in range(6) for u in range(4)]
    article = [article_row(u, 10 * u + k, like=(k + 1) % 2) for k in range(4) for u in range(4)]
    return video, article


def test_duplicate_rows_are_dropped_and_counted(tmp_path, capsys):
    """Case 3: a liked row saw its twin in its own history (the label leaked through the sequence)."""
    video, article = _clean()
    cfg = tenrec_config("tenrec.test_fraction=0.25")
    clean = str(tmp_path / "clean")
    convert(*write_pair(tmp_path, video, article, "clean_in"), cfg, clean)
    clean_rows = _rows(clean)
    assert _own_item_in_history(clean_rows) == 0 and sum(r["label"] for r in clean_rows) > 4
    capsys.readouterr()
    # lines written twice (a writer's retry), some three times; each article line twice
    dup_video = [r for i, r in enumerate(video) for _ in range(1 + (i % 2) + (i % 5 == 0))]
    dup_article = [r for r in article for _ in (0, 1)]
    out = str(tmp_path / "dup")
    convert(*write_pair(tmp_path, dup_video, dup_article, "dup_in"), cfg, out)
    rows = _rows(out)
    assert len(rows) == len(clean_rows)
    assert _own_item_in_history(rows) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "exact duplicate" in line]
    copies = len(dup_video) + len(dup_article) - len(video) - len(article)
    assert len(said) == 1 and said[0].startswith(f"mkt tenrec: dropped {copies} exact duplicate rows"), said
    kept = str(tmp_path / "kept")  # the same files with source.duplicates: keep: every copy written, and the leak
    convert(*write_pair(tmp_path, dup_video, dup_article, "dup_in"), tenrec_config(
        "tenrec.test_fraction=0.25", "source.duplicates=keep"), kept)
    kept_rows = _rows(kept)
    assert len(kept_rows) == len(dup_video) + len(dup_article)
    assert _own_item_in_history(kept_rows) > 0


def test_rows_differing_in_a_column_read_are_not_duplicates(tmp_path, capsys):
    video, article = _clean()
    video = video + [dict(video[0], age=video[0]["age"] + 1)]  # the same impression but for the user's age
    out = str(tmp_path / "out")
    convert(*write_pair(tmp_path, video, article), tenrec_config(), out)
    assert len(_rows(out)) == len(video) + len(article)
    assert "exact duplicate" not in capsys.readouterr().err


@pytest.mark.parametrize("empty", ["video", "article"])
def test_a_header_only_file_is_refused(tmp_path, empty):
    """Case 7: a header-only article file converted to zero target rows, rc 0."""
    video, article = _clean()
    video_csv, article_csv = write_pair(tmp_path, [] if empty == "video" else video,
                                        [] if empty == "article" else article)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError) as e:
        convert(video_csv, article_csv, tenrec_config(), out)
    text = str(e.value)
    bad = video_csv if empty == "video" else article_csv
    assert text.startswith(f"{bad}: no data rows") and "\n" not in text
    assert not os.path.exists(out)


def test_logs_with_a_time_column_drop_equal_rows_of_one_time_and_never_see_a_tie(tmp_path, capsys):
    """The rule for rows of one user at one time (``source.duplicates``): equal in every column read -> one
    impression; otherwise both kept, and neither is in the other's sequence (a step is strictly earlier)."""
    from mkt_torchrec.build.run import build_dataset

    from tests.build.test_build import _entity_csv_config, dataset_rows

    t = "2026-11-01 08:00:{}"
    (tmp_path / "products.csv").write_text("uid,item,clicked,cat_a,price,ts\n" + "".join(
        f"u1,{item},1,3,5,{t.format(s)}\n" for item, s in (("a", 10), ("b", 10), ("a", 10), ("a", 20))))
    (tmp_path / "posts.csv").write_text(f"uid,item,clicked,cat_b,style,ts\nu1,x,1,7,2,{t.format(15)}\n")
    cfg = _entity_csv_config(tmp_path, time={"column": "ts"}, split={"by": "fraction", "test_fraction": 0.0})
    manifest = build_dataset(cfg, str(tmp_path / "ds"))
    a, b, later = dataset_rows(str(tmp_path / "ds"))["train"][0]  # the copy of row 1 (same time) is left out
    assert manifest.source["rows_read"] == 5 and manifest.rows["train"] == {"source": 3, "target": 1}
    assert a["item_id"] == later["item_id"] != b["item_id"]
    assert a["hist_source_items"] == b["hist_source_items"] == []  # a tie never sees the other
    assert later["hist_source_items"] == [a["item_id"], b["item_id"]]  # the same item later: a new impression
    kept = build_dataset(_entity_csv_config(tmp_path, time={"column": "ts"}, duplicates="keep",
                                            split={"by": "fraction", "test_fraction": 0.0}), str(tmp_path / "kept"))
    assert kept.rows["train"]["source"] == 4


def test_refuse_names_the_first_copy_and_its_twin_and_writes_nothing(tmp_path):
    """``source.duplicates: refuse``: logs that must be clean stop the build at their first copy (file and row)."""
    video, article = _clean()
    dup_video = video[:5] + [video[4]] + video[5:] + [video[-1], video[-1]]  # data rows 6 (= 5) and the last two
    video_csv, article_csv = write_pair(tmp_path, dup_video, article)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError) as e:
        convert(video_csv, article_csv, tenrec_config("source.duplicates=refuse"), out)
    text = str(e.value)
    assert text.startswith("source.duplicates: refuse: 3 rows are exact copies of the line before it"), text
    assert f"(first: {video_csv}: data row 6 (line 7) repeats data row 5 (line 6))" in text and "\n" not in text
    assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith("out")]
    convert(*write_pair(tmp_path, video, article, "clean_in"), tenrec_config("source.duplicates=refuse"), out)
    assert len(_rows(out)) == len(video) + len(article)  # clean logs build as with drop


def test_mkt_build_prints_and_records_what_it_dropped_and_refuses_across_files(tmp_path, capsys):
    """A copy of the same time may be in another file: it is found there, counted, and named when refused."""
    from mkt_torchrec.build.run import build_dataset

    from tests.build.test_build import _entity_csv_config

    t = "2026-11-01 08:00:{}"
    header = "uid,item,clicked,cat_a,price,ts\n"
    (tmp_path / "products.csv").write_text(header + "".join(
        f"u1,{item},{c},3,5,{t.format(s)}\n" for item, c, s in (("a", 1, 10), ("b", 0, 11), ("a", 1, 10))))
    (tmp_path / "posts.csv").write_text(f"uid,item,clicked,cat_b,style,ts\nu1,x,1,7,2,{t.format(15)}\n"
                                        f"u1,a,1,3,0,{t.format(10)}\n")  # not a copy of product a: another entity
    kwargs = dict(time={"column": "ts"}, split={"by": "fraction", "test_fraction": 0.0})
    manifest = build_dataset(_entity_csv_config(tmp_path, **kwargs), str(tmp_path / "ds"))
    assert manifest.source["rows_duplicate"] == 1 and manifest.rows["train"] == {"source": 2, "target": 2}
    said = [line for line in capsys.readouterr().err.splitlines() if "exact duplicate" in line]
    products = str(tmp_path / "products.csv")
    assert said == [f"mkt build: dropped 1 exact duplicate row (each equal to an earlier row of the same time in "
                    f"every column read; first: {products}: data row 3 (line 4) repeats data row 1 (line 2); "
                    "source.duplicates: keep writes them, refuse stops)"], said

    (tmp_path / "products.csv").write_text(header + f"u1,a,1,3,5,{t.format(10)}\nu1,b,0,3,5,{t.format(11)}\n")
    (tmp_path / "products_late.csv").write_text(header + f"u1,b,0,3,5,{t.format(11)}\n")  # a copy, another file
    cfg = _entity_csv_config(tmp_path, **kwargs, duplicates="refuse")
    cfg.source.inputs[0].path = str(tmp_path / "products*.csv")
    with pytest.raises(ValueError) as e:
        build_dataset(cfg, str(tmp_path / "refused"))
    assert str(e.value) == (
        f"source.duplicates: refuse: 1 row is an exact copy of an earlier row of the same time in every column "
        f"read (first: {tmp_path / 'products_late.csv'}: data row 1 (line 2) repeats {products}: data row 2 "
        "(line 3)); fix the logs, or set source.duplicates: drop to leave the copies out"), str(e.value)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("refused")]
