"""Hostile and careless dataset manifests and plan files (issue 27): each ends as one line naming the file and key.

A tiny synthetic dataset is written once; each test copies it and edits its manifest the way a careless hand or
a lying tool would, then opens it as every reader does (:func:`open_dataset`).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from torch import nn

from mkt_torchrec.data.dataset import MANIFEST, open_dataset
from mkt_torchrec.planning.plan_file import load_plan

from tests.conftest import small_config

TINY = ["synth.users=40", "synth.source_rows=300", "synth.source_items=100", "synth.target_items=50",
        "synth.row_group_rows=40", "synth.rows_per_file=100"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from mkt_torchrec.data.synth import generate

    out = str(tmp_path_factory.mktemp("hostile") / "tiny")
    generate(small_config(*TINY), out)
    return out


def _edited(tiny: str, tmp_path, edit) -> str:
    """A copy of the dataset whose manifest ``edit(doc)`` changed in place."""
    data = str(tmp_path / "ds")
    shutil.copytree(tiny, data)
    path = os.path.join(data, MANIFEST)
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    edit(doc)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return data


def _one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def test_the_tiny_dataset_opens(tiny):
    m = open_dataset(tiny, small_config().schema)
    assert len(m.splits["train"]) >= 2 and m.splits["test"]
    assert any(len(set(fi.row_group_entity)) > 1 for fi in m.splits["train"])  # both entities in one file


def test_train_file_listed_under_test_is_refused(tiny, tmp_path):
    """Case 2: the same file in train and test made evaluate count training rows as test rows, rc 0."""
    def edit(doc):
        doc["splits"]["test"].append(doc["splits"]["train"][0])
    data = _edited(tiny, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        open_dataset(data, small_config().schema)
    text = _one_line(e)
    n = len(json.load(open(os.path.join(tiny, MANIFEST)))["splits"]["test"])
    assert os.path.join(data, MANIFEST) in text
    assert f"splits.test[{n}].path" in text and "splits.train[0]" in text and "listed twice" in text


def test_file_listed_twice_in_one_split_is_refused(tiny, tmp_path):
    def edit(doc):
        doc["splits"]["train"].append(dict(doc["splits"]["train"][1], path="./" + doc["splits"]["train"][1]["path"]))
    data = _edited(tiny, tmp_path, edit)
    with pytest.raises(ValueError, match=r"splits\.train\[\d+\]\.path.*listed twice.*splits\.train\[1\]") as e:
        open_dataset(data, small_config().schema)
    _one_line(e)


ENTITIES = ("source", "target")


def _lie_rows(doc):  # a file's rows, its row groups and the split's counts changed together: they still add up
    fi = doc["splits"]["train"][1]
    fi["row_groups"][-1] -= 1
    fi["rows"] -= 1
    doc["rows"]["train"][ENTITIES[fi["row_group_entity"][-1]]] -= 1


def _lie_row_groups(doc):  # the same rows in one row group fewer
    fi = doc["splits"]["train"][1]
    fi["row_groups"] = [fi["row_groups"][0] + fi["row_groups"][1], *fi["row_groups"][2:]]
    fi["row_group_entity"] = fi["row_group_entity"][1:]


def _lie_entity(doc):  # one row group said to be of the other entity (counts moved too): changes the valid cut
    fi = doc["splits"]["train"][0]
    was = fi["row_group_entity"][0]
    fi["row_group_entity"][0] = 1 - was
    doc["rows"]["train"][ENTITIES[was]] -= fi["row_groups"][0]
    doc["rows"]["train"][ENTITIES[1 - was]] += fi["row_groups"][0]


@pytest.mark.parametrize("edit, index, says", [
    (_lie_rows, 1, r"key 'splits\.train\[1\]\.rows' says 119 but the file holds 120 rows \(its footer\)"),
    (_lie_row_groups, 1, r"splits\.train\[1\]\.row_groups' says \[80, 40\]"),
    (_lie_entity, 0, r"splits\.train\[0\]\.row_group_entity\[0\]' says (\d) .* entity code\(s\) \[(?!\1)\d\] "
                     r"in row group 0 \(its footer's statistics"),
])
def test_manifest_that_disagrees_with_the_footers_is_refused(tiny, tmp_path, edit, index, says):
    """Case 2: a lying manifest was trusted by inspect and stage-1 training (only stage 2 noticed)."""
    data = _edited(tiny, tmp_path, edit)
    with pytest.raises(ValueError, match=says) as e:
        open_dataset(data, small_config().schema)
    text = _one_line(e)
    bad = json.load(open(os.path.join(data, MANIFEST)))["splits"]["train"][index]["path"]
    assert os.path.join(data, bad) in text and "footer" in text


def test_row_counts_per_entity_must_add_up(tiny, tmp_path):
    def edit(doc):
        doc["rows"]["test"]["target"] += 5
    data = _edited(tiny, tmp_path, edit)
    with pytest.raises(ValueError, match=r"key 'rows\.test\.target'") as e:
        open_dataset(data, small_config().schema)
    _one_line(e)


@pytest.mark.parametrize("edit, key, what", [
    (lambda d: d.update(splits=[]), "splits", "expected an object, found a list []"),  # case 12: AttributeError
    (lambda d: d.pop("columns"), "columns", "missing"),
    (lambda d: d["splits"]["train"][0].update(rows=-3), "splits.train[0].rows", "expected an integer >= 0"),
    (lambda d: d["splits"]["train"][0].update(row_groups="40"), "splits.train[0].row_groups", "expected a list"),
    (lambda d: d["splits"]["train"][0].update(row_group_entity=[0, 2, 0]), "splits.train[0].row_group_entity[1]",
     "expected one of [0, 1]"),
    (lambda d: d["splits"]["train"][0].update(size=3), "splits.train[0].size", "not a key"),
    (lambda d: d.update(rows={"train": []}), "rows.train", "expected an object"),
])
def test_malformed_manifest_names_the_key(tiny, tmp_path, edit, key, what):
    data = _edited(tiny, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        open_dataset(data, small_config().schema)
    text = _one_line(e)
    assert text.startswith(os.path.join(data, MANIFEST) + ": key ") and f"'{key}'" in text and what in text, text


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.update(modules=[]), "modules"),
    (lambda d: d.update(modules={"sparse": {"t": {"sharding_type": "table_wise"}}}), "modules.sparse.t.compute_kernel"),
    (lambda d: d.update(world_size="2"), "world_size"),
    (lambda d: d["modules"]["sparse"]["t"].update(ranks=[-1]), "modules.sparse.t.ranks[0]"),
])
def test_malformed_plan_file_names_the_key(tmp_path, edit, key):
    """Case 12: a plan file of the wrong shape printed AttributeError / TypeError."""
    doc = {"format": "mkt-plan-v1", "world_size": 2, "local_world_size": 2, "compute_device": "cpu", "stage": 1,
           "modules": {"sparse": {"t": {"sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [0],
                                        "rows": 10, "dim": 4, "shards": [[0, 0, 10, 4, 0]]}}}, "per_rank": []}
    edit(doc)
    path = str(tmp_path / "plan.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    with pytest.raises(ValueError) as e:
        load_plan(path, nn.Module(), world_size=2, local_world_size=2, compute_device="cpu")
    text = _one_line(e)
    assert path in text and f"key '{key}'" in text, text


def test_row_groups_without_statistics_are_checked_by_their_entity_column(tiny, tmp_path):
    """A writer that leaves no min / max statistics: the row group's entity column is read instead."""
    import pyarrow.parquet as pq

    def edit(doc):
        fi = doc["splits"]["train"][0]
        fi["row_group_entity"][0] = 1 - fi["row_group_entity"][0]
        doc["rows"]["train"][ENTITIES[1 - fi["row_group_entity"][0]]] -= fi["row_groups"][0]
        doc["rows"]["train"][ENTITIES[fi["row_group_entity"][0]]] += fi["row_groups"][0]
    for lie in (False, True):
        data = _edited(tiny, tmp_path / str(lie), edit if lie else lambda doc: None)
        rel = json.load(open(os.path.join(data, MANIFEST)))["splits"]["train"][0]["path"]
        table = pq.read_table(os.path.join(data, rel))
        pq.write_table(table, os.path.join(data, rel), row_group_size=40, write_statistics=False)
        assert pq.ParquetFile(os.path.join(data, rel)).metadata.row_group(0).column(0).statistics is None
        if not lie:
            open_dataset(data, small_config().schema)
            continue
        with pytest.raises(ValueError, match=r"row_group_entity\[0\]' says \d .* in row group 0 \(its entity column"):
            open_dataset(data, small_config().schema)
