"""Checkpoints of a run on object storage (``s3://``): DCP through fsspec, pointers and pruning through
:mod:`mkt_torchrec.storage`, against a real S3 server on localhost (``tests/s3.py``).

The same guarantees as on a local disk: ``latest`` names only a complete checkpoint, pruning keeps the newest
and the best, a crafted ``.metadata`` never runs code, and errors are the local ones naming the URI.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mkt_torchrec import storage
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.checkpoint import UnsafeCheckpoint
from mkt_torchrec.training.distributed import _free_port, launch

from tests.training.test_checkpoint_security import _attacks

pytest_plugins = ["tests.s3"]


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _state(step: int) -> dict:
    return {"model.w": torch.arange(6.0).view(2, 3) + step,
            "model.b": torch.full((4,), float(step), dtype=torch.float64)}


def _zeros() -> dict:
    return {"model.w": torch.zeros(2, 3), "model.b": torch.zeros(4, dtype=torch.float64)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _upload(local_dir: str, uri: str) -> None:
    for name in os.listdir(local_dir):
        with open(os.path.join(local_dir, name), "rb") as f:
            storage.write_bytes_atomic(storage.join(uri, name), f.read())


def test_save_publish_prune_and_load_on_s3(s3_bucket, world_of_one):
    run = f"{s3_bucket}/runs/x"
    root = f"{run}/checkpoints"
    storage.write_bytes_atomic(f"{root}/step-00000000/__0_0.distcp", b"an abandoned partial save")
    for step in (1, 2, 3, 4):  # step 1 validated best, and stays the best
        extra = {"step": step, "epoch": 0, "readers": [{"rank": 0, "rows": step}], "best": {"step": 1}}
        ckpt = checkpoint.save(run, step, _state(step), extra, is_main=True, keep=2)
        assert ckpt == f"{root}/step-{step:08d}" and checkpoint.latest_checkpoint(run) == ckpt
    # keep=2: the two newest, the best, and no partial save older than the newest complete one
    assert storage.listdir(root) == ["best", "latest", "step-00000001", "step-00000003", "step-00000004"]
    assert storage.read_bytes(f"{root}/latest") == b"step-00000004"
    assert checkpoint.final_checkpoint(run) == f"{root}/step-00000001"
    assert checkpoint.read_extra(f"{root}/step-00000004")["readers"] == [{"rank": 0, "rows": 4}]
    assert checkpoint.global_sizes(f"{root}/step-00000004") == {"model.w": (2, 3), "model.b": (4,)}
    for step in (4, 1):
        state = _zeros()
        assert checkpoint.load(f"{root}/step-{step:08d}", state) == set()
        assert _equal(state, _state(step))

    saver = checkpoint.AsyncCheckpointer(run, is_main=True, keep=2)
    assert saver.save(5, _state(5), {"step": 5, "epoch": 1, "readers": []}) == f"{root}/step-00000005"
    assert saver.wait() == f"{root}/step-00000005"
    assert checkpoint.latest_checkpoint(run) == f"{root}/step-00000005"
    assert storage.listdir(root) == ["best", "latest", "step-00000001", "step-00000004", "step-00000005"]
    state = _zeros()
    checkpoint.load(checkpoint.latest_checkpoint(run), state)
    assert _equal(state, _state(5))
    assert checkpoint.latest_checkpoint(f"{s3_bucket}/runs/never-trained") is None


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "good")
    dcp.save({"model.w": torch.arange(6.0).view(2, 3)}, checkpoint_id=path, no_dist=True)
    return path


def test_a_good_checkpoint_uploaded_to_s3_loads(good_ckpt, s3_bucket):
    ckpt = f"{s3_bucket}/good"
    _upload(good_ckpt, ckpt)
    state = {"model.w": torch.zeros(2, 3)}
    checkpoint.load(ckpt, state, no_dist=True)
    assert torch.equal(state["model.w"], torch.arange(6.0).view(2, 3))


@pytest.mark.parametrize("attack", ["dotted name through an allowed module", "plain __reduce__",
                                    "bytes entry -> torch.load"])
def test_crafted_metadata_on_s3_is_refused(good_ckpt, s3_bucket, tmp_path, attack):
    """The attacks of test_checkpoint_security.py, uploaded: refused as locally, the payload never runs."""
    marker = str(tmp_path / "ran")
    ckpt = f"{s3_bucket}/attack"
    _upload(_attacks(good_ckpt, tmp_path, marker)[attack], ckpt)
    for read in (lambda: checkpoint.load(ckpt, {"model.w": torch.zeros(2, 3)}, no_dist=True),
                 lambda: checkpoint.global_sizes(ckpt)):
        with pytest.raises(UnsafeCheckpoint) as e:
            read()
        message = str(e.value)
        assert "\n" not in message and f"{ckpt}/.metadata: refused: " in message
    assert not os.path.exists(marker)


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95", b"\x00not a pickle"])
def test_truncated_metadata_on_s3_is_a_one_line_error(good_ckpt, s3_bucket, content):
    ckpt = f"{s3_bucket}/broken"
    _upload(good_ckpt, ckpt)
    storage.write_bytes_atomic(f"{ckpt}/.metadata", content)
    with pytest.raises(ValueError) as e:
        checkpoint.load(ckpt, {"model.w": torch.zeros(2, 3)}, no_dist=True)
    assert "\n" not in str(e.value) and f"{ckpt}/.metadata: unreadable checkpoint metadata" in str(e.value)


def test_a_pointer_to_an_incomplete_checkpoint_is_the_local_error(good_ckpt, s3_bucket, tmp_path):
    """``latest`` names a checkpoint without extra.json (its DCP files are all there): one line, as locally."""
    messages = []
    for run in (str(tmp_path / "run"), f"{s3_bucket}/run"):
        root = storage.join(run, "checkpoints")
        storage.write_bytes_atomic(storage.join(root, "latest"), b"step-00000007\n")
        with open(os.path.join(good_ckpt, ".metadata"), "rb") as f:
            storage.write_bytes_atomic(storage.join(root, "step-00000007", ".metadata"), f.read())
        with pytest.raises(ValueError) as e:
            checkpoint.latest_checkpoint(run)
        messages.append(str(e.value).replace(run, "RUN"))
    assert messages[0] == messages[1] == "RUN/checkpoints/latest names 'step-00000007', which is incomplete or missing"


def _save_sharded(run: str) -> str:
    """One rank of two: rows 2r..2r+1 of a (4, 3) ShardedTensor, and a replicated tensor."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    from mkt_torchrec.training.distributed import init_distributed

    torch.set_num_threads(1)
    info = init_distributed()
    rows = torch.arange(12.0).view(4, 3)[2 * info.rank:2 * info.rank + 2].clone()
    sharded = ShardedTensor._init_from_local_shards(
        [Shard.from_tensor_and_offsets(rows, [2 * info.rank, 0], info.rank)], [4, 3])
    state = {"model.table": sharded, "model.b": torch.full((4,), 7.0)}
    return checkpoint.save(run, 3, state, {"step": 3, "epoch": 0, "readers": [0, 0]}, info.is_main, keep=1)


def test_sharded_at_2_ranks_on_s3_loads_at_1(s3_bucket, monkeypatch):
    monkeypatch.setenv("MKT_DEVICE", "cpu")
    run = f"{s3_bucket}/run"
    ckpt = launch(2, _save_sharded, run)  # the ranks read the S3 settings from the environment they inherit
    assert checkpoint.latest_checkpoint(run) == ckpt == f"{run}/checkpoints/step-00000003"
    assert checkpoint.read_extra(ckpt)["readers"] == [0, 0]
    state = {"model.table": torch.zeros(4, 3), "model.b": torch.zeros(4)}
    checkpoint.load(ckpt, state, no_dist=True)
    assert torch.equal(state["model.table"], torch.arange(12.0).view(4, 3))
    assert torch.equal(state["model.b"], torch.full((4,), 7.0))
