"""Sharded state placed as TorchRec places it on a GPU (``rank:R/cuda:L``), emulated on CPU.

On a GPU every local shard of a sharded table and of its fused optimizer state has the placement
``rank:R/cuda:L``; torch's ``Shard`` and ``ShardedTensor`` refuse a local tensor on another device. Here every
placement reads ``cpu``, so the emulation (``MKT_EMULATE_ACCELERATOR=1``, ``training/device_check.py``) rewrites the
live placements to ``cuda`` after ``assemble`` and judges a local tensor by where it would be on the cluster: a
tensor our code copied to the host does not match a ``cuda`` placement.
"""

import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.distributed import _free_port, launch

from tests.conftest import small_config


@pytest.fixture
def world_of_one():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _on_gpu_placement(rows=6, dim=4) -> ShardedTensor:
    """A real ShardedTensor whose placements say ``cuda:0``, as TorchRec's on a GPU (the tensor stays on the CPU:
    this machine has no GPU, and a GPU's tensor would match)."""
    tensor = torch.arange(rows * dim, dtype=torch.float32).view(rows, dim)
    st = ShardedTensor._init_from_local_shards([Shard.from_tensor_and_offsets(tensor, [0, 0], 0)], [rows, dim])
    st.local_shards()[0].metadata.placement._device = torch.device("cuda", 0)
    for m in st.metadata().shards_metadata:
        m.placement._device = torch.device("cuda", 0)
    return st


def test_the_checkpoint_host_copy_of_a_gpu_placed_shard(world_of_one):
    """The stager's copy of a shard placed on ``cuda:0``: torch's own check refused the copy
    (``Local shard tensor device does not match with local Shard's placement!``)."""
    from mkt_torchrec.training.checkpoint import _host_copy

    st = _on_gpu_placement()
    copied = _host_copy(st)
    assert [str(m.placement) for m in copied.metadata().shards_metadata] == ["rank:0/cpu"]
    assert str(copied.local_shards()[0].metadata.placement) == "rank:0/cpu"
    assert torch.equal(copied.local_shards()[0].tensor, st.local_shards()[0].tensor)
    assert copied.local_shards()[0].tensor.data_ptr() != st.local_shards()[0].tensor.data_ptr()  # a copy
    # the live tensor keeps TorchRec's placement (the metadata is shared with its modules)
    assert str(st.local_shards()[0].metadata.placement) == "rank:0/cuda:0"
    assert [str(m.placement) for m in st.metadata().shards_metadata] == ["rank:0/cuda:0"]


def _sharded_state_on_emulated_gpus(out: str) -> dict:
    """Per rank: a MEM assembled under the emulation, its placements, a host copy that keeps the placement (the
    old stager), then an async and a sync checkpoint, and a load back into the live (cuda-placed) state."""
    from mkt_torchrec.training.checkpoint import AsyncCheckpointer
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.assembly import assemble, state_of

    torch.set_num_threads(1)
    info = init_distributed()
    cfg = small_config("train.planner.sharding_type=table_wise")
    asm = assemble(cfg, "mem", info)
    state = state_of(asm, cfg)
    sharded = {k: v for k, v in state.items() if isinstance(v, ShardedTensor)}
    placements = {str(s.metadata.placement) for v in sharded.values() for s in v.local_shards()}
    global_devices = {m.placement.device().type for v in sharded.values() for m in v.metadata().shards_metadata}
    live = next(v for v in sharded.values() if v.local_shards()).local_shards()[0]
    try:  # what the stager did before: copy to the host, keep the placement
        Shard(tensor=live.tensor.detach().to("cpu", copy=True), metadata=live.metadata)
        kept = "accepted"
    except ValueError as e:
        kept = str(e)
    saver = AsyncCheckpointer(out, info.is_main, keep=2)
    saver.save(1, state, {"step": 1, "epoch": 0, "readers": []})
    saver.wait()
    checkpoint.save(out, 2, state, {"step": 2, "epoch": 0, "readers": []}, info.is_main, keep=2)
    before = {k: v.local_shards()[0].tensor.clone() for k, v in sharded.items() if v.local_shards()}
    for v in sharded.values():
        for s in v.local_shards():
            s.tensor.zero_()
    checkpoint.load(checkpoint.latest_checkpoint(out), state_of(asm, cfg))
    restored = all(torch.equal(sharded[k].local_shards()[0].tensor, t) for k, t in before.items())
    return {"placements": sorted(placements), "global": sorted(global_devices), "kept": kept,
            "restored": restored, "sharded": len(sharded),
            "optimizer": sum(k.startswith("optim.") for k in sharded)}


def test_emulated_gpu_placements_in_sharded_state_and_checkpoints(tmp_path, monkeypatch):
    """Model and fused-optimizer ShardedTensors carry ``rank:R/cuda:R`` (local world 2), a host copy that keeps
    its placement is refused as on a GPU, and async / sync DCP checkpoints save and load back."""
    monkeypatch.setenv("MKT_EMULATE_ACCELERATOR", "1")
    out = str(tmp_path / "run")
    os.makedirs(os.path.join(out, "checkpoints"))
    got = launch(2, _sharded_state_on_emulated_gpus, out)
    assert got["sharded"] > 0 and got["optimizer"] > 0  # tables and their rowwise-adagrad state
    assert got["placements"] == ["rank:0/cuda:0"] and got["global"] == ["cuda"]
    assert "does not match with local Shard's placement" in got["kept"] and "test_sharded_placement.py" in got["kept"]
    assert got["restored"]
    assert checkpoint.read_extra(checkpoint.latest_checkpoint(out))["step"] == 2
