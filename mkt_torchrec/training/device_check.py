"""Catch, on a CPU machine, collectives that would fail on a CUDA / NCCL world (``MKT_EMULATE_ACCELERATOR=1``).

A process group made with ``backend="nccl"`` serves CUDA tensors only: ``dist.all_reduce(torch.tensor([...]))``
on a CPU tensor raises ``No backend type associated with device type cpu`` on the cluster, while on a CPU machine
(gloo) every tensor is a CPU tensor and the same line works. No GPU here runs TorchRec, so the multi-process tests
emulate the accelerator instead:

* the rank's compute device becomes ``torch.device("cpu", 0)`` (:data:`EMULATED_DEVICE`): memory is still host
  memory, but the device *object* differs from ``cpu``, so ``x.to(info.device)`` and ``x.to("cpu")`` can be told
  apart;
* a :class:`~torch.overrides.TorchFunctionMode` tracks which tensors our code makes on the host, i.e. that would
  be on the CPU of a GPU machine: those made by a factory (``torch.tensor``, ``torch.zeros``, ...) without
  ``device=``, by ``torch.from_numpy``, ``.cpu()`` or ``.to("cpu")``, and everything computed from them
  (``.to(info.device)`` clears the mark, as the copy to the GPU would). A factory given any device is trusted:
  ``device=x.device`` reads ``cpu`` on this machine but follows ``x`` on a GPU;
* :data:`SYNCS` records every host sync our code makes on a device tensor (``.item()``, ``.tolist()``, ``bool()``,
  ``.nonzero()``, ``.cpu()``, ...): tests count them per training step;
* every tensor collective of ``torch.distributed`` (``all_reduce``, ``all_gather``, ``broadcast``, ``all_to_all``,
  ...) is wrapped to raise :class:`HostTensorInCollective` on a host tensor, naming the collective and the caller's
  file and line. Calls made by library code (``torch.distributed``'s object collectives and DCP, TorchRec) are not
  checked: they derive the device from the group or their inputs.

It is a test mechanism (like ``TORCH_DISTRIBUTED_DEBUG=DETAIL``), enabled per process by the environment variable,
which :func:`mkt_torchrec.training.distributed.init_distributed` reads. It slows every op by a Python call.

Sharded state is placed as on a GPU too. TorchRec gives every local shard of a sharded table (and of its fused
optimizer's state) the placement ``rank:R/cuda:L``, and torch's ``Shard`` / ``ShardedTensor`` refuse a local
tensor whose device differs from its placement; on a CPU machine every placement reads ``cpu``, so code that
copies a shard to the host and keeps its placement (a checkpoint stager, a resharding helper) works here and dies
on the first GPU checkpoint. :func:`place_on_accelerator` (called by ``assembly.assemble``) rewrites the placements
of every ShardedTensor of the model's and the optimizer's state to ``cuda:(R % local world size)``, and
:func:`install` makes torch's two checks judge a tensor by where it would be on the GPU machine: a tensor our code
made on the host (marked as above) does not match a ``cuda`` placement; any other tensor of the rank stands for a
device tensor and does (it would be one on the cluster).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

ENV = "MKT_EMULATE_ACCELERATOR"
_SITE = os.path.dirname(os.path.dirname(torch.__file__))  # site-packages: torch, torchrec, fbgemm
EMULATED_DEVICE = torch.device("cpu", 0)
_MARK = "_mkt_host_tensor"

_FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
              torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.scalar_tensor}
_ALWAYS_HOST = {torch.from_numpy, torch.frombuffer, torch.Tensor.cpu}
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "scatter", "gather", "send", "recv",
                "isend", "irecv")


# Calls that make the host wait for the device (they read a device tensor's value on the host)
_SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.numpy, torch.Tensor.cpu}
SYNCS: list = []  # origin ("file:line") of every host sync our code made on a device tensor, in order


class HostTensorInCollective(RuntimeError):
    """A collective received a tensor that would be on the CPU on a CUDA / NCCL world."""


def enabled() -> bool:
    return os.environ.get(ENV) == "1"


def is_host(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _MARK, False)


def _origin() -> str:
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == __file__ or
                                 frame.f_code.co_filename.startswith(_SITE)):
        frame = frame.f_back
    return "?" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


def _mark(obj: Any, host: bool, origin: Optional[str] = None) -> None:
    if isinstance(obj, torch.Tensor):
        try:
            if host:
                setattr(obj, _MARK, origin or getattr(obj, _MARK, None) or _origin())
            elif getattr(obj, _MARK, False):
                delattr(obj, _MARK)
        except (AttributeError, RuntimeError):  # some tensor subclasses refuse attributes
            pass
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _mark(o, host)


def _tensors(objs: Iterable[Any]) -> Iterable[torch.Tensor]:
    for o in objs:
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, (list, tuple)):
            yield from _tensors(o)


def _target_device(args: tuple, kwargs: dict) -> Any:
    """The device a ``Tensor.to`` call moves to, or None when it only changes the dtype."""
    if "device" in kwargs and kwargs["device"] is not None:
        return torch.device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, (torch.device, str)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return EMULATED_DEVICE if not is_host(a) else torch.device("cpu")
    return None


def _from_library() -> bool:
    """Whether the torch function being run was called by library code (torch, TorchRec, fbgemm)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame is None or frame.f_code.co_filename.startswith(_SITE)


class HostTensorTracker(TorchFunctionMode):
    """Marks host tensors (see the module docstring); the rank's device is :data:`EMULATED_DEVICE`.

    Only tensors our code makes on the host are marked (and what is computed from them): libraries derive the
    device from their inputs, which on a CPU machine report ``cpu`` even for the emulated device.
    """

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if args and isinstance(args[0], torch.Tensor) and not is_host(args[0]) and not _from_library():
            if func in _SYNCS or (func is torch.Tensor.to and _target_device(args, kwargs) == torch.device("cpu")):
                SYNCS.append(_origin())
        if (func in _FACTORIES or func in _ALWAYS_HOST or func is torch.Tensor.to) and _from_library():
            _mark(out, func is torch.Tensor.to and is_host(args[0]) and _target_device(args, kwargs) is None)
        elif func in _FACTORIES:  # ``device=x.device`` reads "cpu" here but is right on a GPU: trust any device
            _mark(out, kwargs.get("device") is None)
        elif func in _ALWAYS_HOST:
            _mark(out, True)
        elif func is torch.Tensor.to:
            device = _target_device(args, kwargs)
            if device is None:
                _mark(out, is_host(args[0]))
            else:
                _mark(out, device != EMULATED_DEVICE)
        else:
            hosts = [t for t in _tensors(args) if is_host(t)] + [t for t in _tensors(kwargs.values()) if is_host(t)]
            if hosts:
                _mark(out, True, getattr(hosts[0], _MARK))
        return out


def _caller() -> tuple[str, int, bool]:
    """(file, line, is library code) of the code that called the collective.

    Only our code is checked: libraries derive devices from tensors (``kjt.device()``), which on a CPU machine
    report ``cpu`` even for the emulated device, so their tensors cannot be told apart here; on the cluster
    they follow the input's device by construction.
    """
    frame = sys._getframe(2)
    name = frame.f_code.co_filename
    return name, frame.f_lineno, name.startswith(_SITE)


def _checked(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        file, line, internal = _caller()
        if not internal:
            for t in _tensors(list(args) + list(kwargs.values())):
                if is_host(t):
                    raise HostTensorInCollective(
                        f"dist.{name} at {file}:{line} got a host (CPU) tensor of shape {tuple(t.shape)} (made "
                        f"on the host at {getattr(t, _MARK)}): a NCCL group serves CUDA tensors only; create it "
                        "on the rank's device")
        return fn(*args, **kwargs)

    wrapper._mkt_checked = True  # type: ignore[attr-defined]
    return wrapper


# --------------------------------------------------------------------------------------------------------
# Placements of sharded state
# --------------------------------------------------------------------------------------------------------


def _sharded_tensors(obj: Any) -> Iterable[Any]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, ShardedTensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _sharded_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _sharded_tensors(v)


def place_on_accelerator(states: Iterable[Any], local_world_size: int) -> int:
    """Give every ShardedTensor in ``states`` (state dicts, nested) the placements TorchRec gives it on a GPU:
    ``rank:R/cuda:(R % local_world_size)``, on its local shards and in its global metadata. The objects are the
    live ones TorchRec hands out on every ``state_dict()`` call, so the placements stay. Returns how many."""
    seen: dict = {}
    for st in (st for state in states for st in _sharded_tensors(state)):
        seen[id(st)] = st
    for st in seen.values():
        metas = [m for m in st.metadata().shards_metadata] + [s.metadata for s in st.local_shards()]
        for m in metas:
            if m.placement is not None and m.placement.device().type == "cpu":
                m.placement._device = torch.device("cuda", m.placement.rank() % local_world_size)
    return len(seen)


class _Validating:
    """Set while torch validates local shards against global metadata (see :func:`_checked_init`): our check has
    run, so torch's compares the emulated ``cuda`` placement as the host device it is here."""

    depth = 0


def _emulated_device(original: Callable) -> Callable:
    @functools.wraps(original)
    def device(self: Any) -> torch.device:
        d = original(self)
        return torch.device("cpu") if _Validating.depth and d.type == "cuda" else d

    device._mkt_checked = True  # type: ignore[attr-defined]
    return device


def _check_shard(tensor: torch.Tensor, placement: Any) -> None:
    """A local shard's tensor against its placement, as on the GPU machine (see the module docstring)."""
    if placement is None or tensor.device.type != "cpu":
        return
    where = placement.device()
    if where.type == "cuda" and is_host(tensor):
        raise ValueError("Local shard tensor device does not match with local Shard's placement! Found local shard "
                         f"tensor device: cpu (a host tensor made at {getattr(tensor, _MARK)}), local shard metadata "
                         f"placement device: {where} (emulated accelerator: MKT_EMULATE_ACCELERATOR=1)")


def _checked_shard_init(original: Callable) -> Callable:
    @functools.wraps(original)
    def __post_init__(self: Any) -> None:
        _check_shard(self.tensor, self.metadata.placement)
        _Validating.depth += 1
        try:
            original(self)
        finally:
            _Validating.depth -= 1

    __post_init__._mkt_checked = True  # type: ignore[attr-defined]
    return __post_init__


def _checked_init(original: Callable) -> Callable:
    """``ShardedTensor._init_from_local_shards_and_global_metadata`` (a classmethod, passed unbound)."""
    @functools.wraps(original)
    def init(cls: Any, local_shards: Any, *args: Any, **kwargs: Any) -> Any:
        for shard in local_shards:
            _check_shard(shard.tensor, shard.metadata.placement)
        _Validating.depth += 1
        try:
            return original(local_shards, *args, **kwargs)
        finally:
            _Validating.depth -= 1

    init._mkt_checked = True  # type: ignore[attr-defined]
    return classmethod(init)


def _install_placement_checks() -> None:
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed.remote_device import _remote_device

    if not getattr(_remote_device.device, "_mkt_checked", False):
        _remote_device.device = _emulated_device(_remote_device.device)
    if not getattr(Shard.__post_init__, "_mkt_checked", False):
        Shard.__post_init__ = _checked_shard_init(Shard.__post_init__)
    init = ShardedTensor.__dict__["_init_from_local_shards_and_global_metadata"]
    if not getattr(init.__func__, "_mkt_checked", False):
        ShardedTensor._init_from_local_shards_and_global_metadata = _checked_init(
            ShardedTensor._init_from_local_shards_and_global_metadata)


def install() -> None:
    """Wrap the tensor collectives of ``torch.distributed``, start tracking host tensors and check local shards
    against ``cuda`` placements (idempotent)."""
    _install_placement_checks()
    for name in _COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None and not getattr(fn, "_mkt_checked", False):
            setattr(dist, name, _checked(name, fn))
    if not getattr(install, "_mode", None):
        mode = HostTensorTracker()
        mode.__enter__()
        install._mode = mode  # type: ignore[attr-defined]
