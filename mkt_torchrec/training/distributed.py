"""Process-group set-up, local multi-process launch, and failing fast.

The code path is device-agnostic: CUDA + NCCL when a GPU is visible, CPU + gloo otherwise. ``MKT_DEVICE=cuda``
(what the TorchX components pass for ``--device cuda``) makes a job that finds no GPU stop at start saying why,
instead of training on the CPU; ``MKT_DEVICE=cpu`` forces the CPU. Under torchrun /
TorchX the process joins the world its environment describes; ``launch(nproc, fn, *args)`` starts ``nproc``
local processes itself with torch elastic (what ``mkt train --nproc N`` does).

Collectives. A NCCL group serves CUDA tensors only, so every tensor this package hands to a collective is made on
``DistInfo.device`` (:func:`all_agree`, :func:`all_sum`). Multi-process tests run with ``MKT_EMULATE_ACCELERATOR=1``
(:mod:`mkt_torchrec.training.device_check`), which fails any collective on a tensor that would be on the CPU of a
GPU machine.

Failing fast. A rank that raises must not leave the others blocked in their next collective until the
process-group timeout (or in a barrier that never completes). :func:`run_rank` runs a rank's work; on an exception
in a world of several ranks it reports the error once, with the rank that raised it, and ends the process at
once (``os._exit``): the launcher (torch elastic under ``--nproc``, torchrun or TorchX) then stops every other
rank within its monitor interval. :func:`launch` turns that into one :class:`RankFailed` in the launching
process, carrying the first failing rank's message instead of torch elastic's pages of tracebacks.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

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
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # is_fx_tracing's deprecation notice
    from mkt_torchrec import logs

    logs.configure()  # our own progress lines (rank 0 logs them), whatever the root logger has
    logging.getLogger("torch.distributed.checkpoint").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")


DEVICE_ENV = "MKT_DEVICE"  # what the job expects: cuda (no GPU is an error), cpu (forced), auto / unset
_DEVICE_CHOICES = ("auto", "cpu", "cuda")
_HIDDEN = ("", "-1", "none", "void", "NoDevFiles")  # CUDA_ / NVIDIA_VISIBLE_DEVICES values that name no GPU


def _expected_device() -> str:
    """``MKT_DEVICE`` (set by the TorchX components): ``auto`` when unset or empty, else ``cpu`` or ``cuda``."""
    value = os.environ.get(DEVICE_ENV, "") or "auto"
    if value not in _DEVICE_CHOICES:
        raise ValueError(f"{DEVICE_ENV}={value!r} is not one of {', '.join(_DEVICE_CHOICES)} (unset means auto)")
    return value


def _visible_devices() -> str:
    """``CUDA_VISIBLE_DEVICES=...`` (and ``NVIDIA_VISIBLE_DEVICES=...`` when set), for messages."""
    shown = [f"{name}={os.environ[name]!r}" for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
             if name in os.environ]
    return ", ".join(shown) or "CUDA_VISIBLE_DEVICES unset"


def cuda_unavailable_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False on this machine, as one clause for an error message."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return f"this torch build has no CUDA (torch {torch.__version__}, torch.version.cuda is None)"
    if "CUDA_VISIBLE_DEVICES" in os.environ and os.environ["CUDA_VISIBLE_DEVICES"].strip() in _HIDDEN:
        return f"no GPU visible ({_visible_devices()} hides every GPU)"
    return (f"no GPU visible ({_visible_devices()}; torch {torch.__version__} with CUDA {torch.version.cuda}): "
            "the job was given no GPU, or the NVIDIA driver is missing or too old")


def _gpus_named_by_environment() -> Optional[str]:
    """``NAME=VALUE`` of a variable that says this process was given GPUs, or None. Only a hint: CUDA images set
    ``NVIDIA_VISIBLE_DEVICES=all`` in pods that got no GPU, and shells export ``CUDA_VISIBLE_DEVICES`` out of habit,
    so neither is reliable enough to fail a job on (``MKT_DEVICE=cuda`` is)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible not in _HIDDEN:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    slurm = os.environ.get("SLURM_GPUS_ON_NODE", "").strip()
    return f"SLURM_GPUS_ON_NODE={slurm}" if slurm not in ("", "0") else None


def _select_device(local_rank: int, rank: int) -> tuple[torch.device, str]:
    """The rank's device and process-group backend, from ``MKT_DEVICE`` and what this machine has.

    Raises:
        ValueError: ``MKT_DEVICE`` is unknown; it is ``cuda`` and no GPU is usable (saying why); or this local rank
            has no GPU of its own.
    """
    from mkt_torchrec.training import device_check

    expected = _expected_device()
    if expected == "cpu":  # forced, even where a GPU is visible (and no emulated accelerator)
        return torch.device("cpu"), "gloo"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"local rank {local_rank} needs GPU {local_rank} but only {count} are visible "
                             f"({_visible_devices()}): start at most {count} processes per node")
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        return device, "nccl"
    if expected == "cuda":
        raise ValueError(f"{DEVICE_ENV}=cuda but torch.cuda.is_available() is False: {cuda_unavailable_reason()} "
                         f"(set {DEVICE_ENV}=cpu to train on CPU)")
    if device_check.enabled():  # tests: a CPU "accelerator" whose collectives refuse host tensors
        device_check.install()
        return device_check.EMULATED_DEVICE, "gloo"
    hint = _gpus_named_by_environment()
    if hint and rank == 0:
        logging.getLogger("mkt.distributed").warning(
            "training on CPU: %s but torch.cuda.is_available() is False: %s (set %s=cuda to make this an error, "
            "or %s=cpu to silence it)", hint, cuda_unavailable_reason(), DEVICE_ENV, DEVICE_ENV)
    return torch.device("cpu"), "gloo"


def init_distributed() -> DistInfo:
    """Join the world from the environment (RANK, WORLD_SIZE, ...), or make a world of one.

    The device follows ``MKT_DEVICE`` (see :func:`_select_device`): ``cuda`` fails at once, in one line saying why,
    where no GPU is usable; ``cpu`` trains on CPU; unset or ``auto`` takes a GPU when one is visible.
    """
    quiet_libraries()
    launched = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device, backend = _select_device(local_rank, rank)
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend)
        else:  # a world of one, without touching the environment
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                    world_size=1)
    return DistInfo(rank, world, local_rank, local_world, device, backend)


def shutdown() -> None:
    """Leave the process group after a rank's work succeeded on every rank (a collective)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------
# Failing fast
# --------------------------------------------------------------------------------------------------------

ERROR_DIR_ENV = "MKT_ERROR_DIR"  # set by launch(): where a failing rank leaves its error record


class RankFailed(RuntimeError):
    """A rank of a launched world failed; the message is that rank's error, once."""


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def describe_error(e: BaseException) -> str:
    """One line: the message of a user error, ``Type: message`` of anything else."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if isinstance(e, (ValueError, FileNotFoundError, FileExistsError, RankFailed)):
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_rank(fn: Callable[..., Any], *args: Any) -> Any:
    """Run one rank's work ``fn(*args)`` and leave the process group; on failure, end this rank at once.

    In a world of several ranks an exception is reported once (``error on rank R: ...`` on stderr, or an error
    record for :func:`launch`) and the process exits with status 1 without touching the process group, so no
    collective can block it; the launcher stops the other ranks. In a world of one the exception propagates.
    """
    try:
        result = fn(*args)
    except BaseException as e:  # noqa: BLE001 - every failure must end the rank
        rank, world = _rank_and_world()
        if world <= 1 and not os.environ.get(ERROR_DIR_ENV):
            if dist.is_initialized():
                dist.destroy_process_group()
            raise
        _report(rank, e)
        logging.shutdown()
        os._exit(1)
    shutdown()
    return result


def _report(rank: int, e: BaseException) -> None:
    record = {"rank": rank, "type": type(e).__name__, "message": describe_error(e), "time": time.time()}
    where = os.environ.get(ERROR_DIR_ENV)
    if where and os.path.isdir(where):
        path = os.path.join(where, f"rank-{rank:05d}.json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(path + ".tmp", path)
        if os.environ.get("MKT_DEBUG") == "1":
            import traceback

            traceback.print_exception(e)
    else:  # torchrun / TorchX: each failing rank says so once, in one line
        print(f"error on rank {rank}: {record['message']}", file=sys.stderr, flush=True)


# what a rank sees when a peer died: a consequence, never the cause
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "DistBackendError", "Broken pipe")


def _first_error(error_dir: str) -> Optional[dict]:
    """The earliest error record that is not a rank's reaction to a lost peer (None: no such record)."""
    records = []
    for path in glob.glob(os.path.join(error_dir, "rank-*.json")):
        try:
            with open(path, encoding="utf-8") as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            continue
    causes = [r for r in records if not any(p in f"{r['type']}: {r['message']}" for p in _PEER_LOST)]
    return min(causes, key=lambda r: (r["time"], r["rank"])) if causes else None


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in ``nproc`` local processes (torch elastic), each through :func:`run_rank`; returns
    rank 0's result.

    Raises:
        RankFailed: a rank failed; the message is the first failing rank's error (the others are stopped).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mkt-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0, monitor_interval=0.5,
        start_method="spawn",
    )
    error_dir = tempfile.mkdtemp(prefix="mkt-errors-")
    previous = os.environ.get(ERROR_DIR_ENV)
    os.environ[ERROR_DIR_ENV] = error_dir
    # C++ notices each worker would print (e.g. DDP's find_unused_parameters advice, once per rank) say nothing
    # to a user; TORCH_CPP_LOG_LEVEL=WARNING (or MKT_DEBUG=1) shows them again. Read when a worker starts.
    if "TORCH_CPP_LOG_LEVEL" not in os.environ and os.environ.get("MKT_DEBUG") != "1":
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    elastic_log = logging.getLogger("torch.distributed.elastic")
    level = elastic_log.level
    elastic_log.setLevel(logging.CRITICAL)  # its failure report is pages of tracebacks; ours is one line
    try:
        results = elastic_launch(config, run_rank)(fn, *args)
    except ChildFailedError as e:
        first = _first_error(error_dir)
        if first is None:  # a rank died without raising (killed, out of memory, os._exit): name the dead one
            dead = [(r, f) for r, f in e.failures.items()
                    if not os.path.isfile(os.path.join(error_dir, f"rank-{r:05d}.json"))]
            if not dead:
                raise RankFailed("a rank died without a message (killed, out of memory, or os._exit); rank "
                                 f"{min(e.failures)} then lost its connection to it") from None
            rank, failure = min(dead, key=lambda rf: rf[0])
            raise RankFailed(f"rank {rank} exited with status {failure.exitcode} without a message "
                             "(killed, out of memory, or os._exit)") from None
        raise RankFailed(f"rank {first['rank']}: {first['message']}") from None
    finally:
        elastic_log.setLevel(level)
        if previous is None:
            os.environ.pop(ERROR_DIR_ENV, None)
        else:
            os.environ[ERROR_DIR_ENV] = previous
        shutil.rmtree(error_dir, ignore_errors=True)
    return results[0]


# --------------------------------------------------------------------------------------------------------
# Collectives on the group's device
# --------------------------------------------------------------------------------------------------------


def all_agree(flag: bool, device: torch.device) -> bool:
    """True iff ``flag`` is true on every rank (one all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def any_true(flag: bool, device: torch.device) -> bool:
    """True iff ``flag`` is true on some rank (one all-reduce)."""
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Element-wise sums of ``values`` over every rank (one all-reduce in float64 on the group's device)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def all_gather_objects(obj: Any, world_size: int) -> list[Any]:
    out: list[Optional[Any]] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
