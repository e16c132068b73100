"""Process-group set-up and local multi-process launch.

The code path is device-agnostic: CUDA + NCCL when a GPU is visible, CPU + gloo otherwise. Under torchrun /
TorchX the process joins the world its environment describes; ``launch(nproc, fn, *args)`` starts ``nproc``
local processes itself with torch elastic (what ``mkt train --nproc N`` does).
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quiet_libraries() -> None:
    """Silence library chatter that says nothing to a user (TorchRec's per-table sharding notices,
    fbgemm / torch deprecation notices), so progress bars and our own log lines stay readable."""
    import logging
    import warnings

    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.checkpoint").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")


def init_distributed() -> DistInfo:
    """Join the world from the environment (RANK, WORLD_SIZE, ...), or make a world of one."""
    quiet_libraries()
    launched = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        device, backend = torch.device(f"cuda:{local_rank}"), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend)
        else:  # a world of one, without touching the environment
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1)
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in ``nproc`` local processes (torch elastic); returns rank 0's result.

    Raises ``ChildFailedError`` (from torch elastic) if any process fails.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mkt-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    results = elastic_launch(config, fn)(*args)
    return results[0]


def all_agree(flag: bool, device: torch.device) -> bool:
    """True iff ``flag`` is true on every rank (one all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj: Any, world_size: int) -> list[Any]:
    out: list[Optional[Any]] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
