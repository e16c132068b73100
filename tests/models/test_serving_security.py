"""A serving archive from someone else must not run code when loaded (``load_serving``)."""

import io
import json
import os
import zipfile

import pytest
import torch

from mkt_torchrec.models.mkt import MEM, TEM, MKTTarget, knowledge_dims
from mkt_torchrec.models.serving import UnsafeServingFile, export_serving, load_serving, padded_ids, serving_keys
from mkt_torchrec.data.reader import ParquetReader

from tests.conftest import CommandOnUnpickle, small_config


@pytest.fixture(scope="module")
def exported(small_dataset, tmp_path_factory) -> str:
    cfg = small_config()
    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model)
    model = MKTTarget(TEM(cfg.schema, cfg.model, knowledge_dims(mem)), mem).eval()
    b = next(iter(ParquetReader(small_dataset, "test", cfg.schema, cfg.data, training=False, entity="target",
                                batch_size=8)))
    ids = padded_ids(b.sparse_features, cfg.schema, serving_keys(cfg.schema))
    return export_serving(cfg.schema, model, str(tmp_path_factory.mktemp("serving") / "s"), ids, b.dense_features)


def _poisoned(path: str, out: str, command: str) -> str:
    """The archive with its first weight turned into a pickle whose loading runs ``command``."""
    buf = io.BytesIO()
    torch.save(CommandOnUnpickle(command), buf)
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                victim = first["path_name"]
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
    target = next(n for n in names if n.endswith(f"/weights/{victim}"))
    with zipfile.ZipFile(out) as z:
        items = [(i, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(out, "w") as z:
        for item, data in items:
            z.writestr(item, buf.getvalue() if item.filename == target else data)
    return out


def test_a_poisoned_archive_would_run_code_and_load_serving_refuses_it(exported, tmp_path):
    marker = str(tmp_path / "ran")
    bad = _poisoned(exported, str(tmp_path / "bad.pt2"), f"touch {marker}")
    with pytest.raises(Exception):  # torch's own loader runs the payload (then fails on what it returned)
        torch.export.load(bad)
    assert os.path.exists(marker)  # the attack is real
    os.remove(marker)
    with pytest.raises(UnsafeServingFile) as e:
        load_serving(bad)
    assert "\n" not in str(e.value) and bad in str(e.value)
    assert not os.path.exists(marker)


def test_our_own_export_loads_under_the_restriction(exported):
    assert isinstance(load_serving(exported), torch.nn.Module)
