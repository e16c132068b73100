"""Sharded checkpoints with torch.distributed.checkpoint (DCP), published atomically.

Layout of a run directory::

    RUN/checkpoints/step-00000100/   DCP files (every rank writes its shards) + extra.json (rank 0: step,
                                     epoch, every rank's reader position, the sharding plan)
    RUN/checkpoints/latest           the name of the newest COMPLETE checkpoint

``latest`` is replaced (write temp + rename) only after ``dcp.save`` returned on every rank and
``extra.json`` (step, reader positions of every rank) is written, so an interrupted save leaves the previous
checkpoint as the latest. :class:`AsyncCheckpointer` saves in the background (``dcp.async_save``: the state is
copied to host memory, then written by a thread while training goes on, over a gloo group of its own); rank 0
publishes ``latest`` when its save has completed, which DCP's coordinator reaches only after every rank's write
returned (it gathers their results before writing ``.metadata``).

Only tensors go into DCP. Loading reads DCP's ``.metadata`` with an unpickler that admits an exact list of
(module, name) pairs (DCP's tensor metadata classes, torch dtypes and sizes) and refuses every entry that is not
a tensor stored in the checkpoint's own files (a bytes entry would make DCP call
``torch.load(weights_only=False)`` on a file of the checkpoint's choosing); ``extra.json`` is JSON.

``run_dir`` may be an object-store URI (``s3://bucket/runs/x``). Pointers, ``extra.json``, listing and pruning go
through :mod:`mkt_torchrec.storage`; DCP writes and reads through fsspec (``FsspecWriter`` / :class:`SafeFsspecReader`,
s3fs for ``s3://``), whose client reads endpoint and credentials from the same ``AWS_*`` variables as pyarrow's
(botocore honours ``AWS_ENDPOINT_URL``). The order is the local one: DCP's ``.metadata`` last of the checkpoint's
files (written as ``.metadata.tmp``, then copied into place), then ``extra.json``, then the pointers, each one object
write (an upload is invisible until it completes).
"""

from __future__ import annotations

import copy
import errno
import io
import json
import os
import pickle
import re
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from mkt_torchrec import storage
from mkt_torchrec.fsutil import make_dirs
from mkt_torchrec.rundir import LATEST, read_json

BEST = "best"  # the checkpoint with the best validation metric (early stopping); kept by pruning
EXTRA = "extra.json"

# Exactly the (module, name) pairs DCP's ``.metadata`` of tensor-only checkpoints refers to. No prefixes and no
# dotted names: protocol-4 ``STACK_GLOBAL`` resolves ``a.b`` inside an allowed module (``os.system`` through a
# module that imports ``os``), so only whole pairs are safe. ``BytesStorageMetadata`` is not here on purpose: DCP
# reads a bytes entry with ``torch.load(weights_only=False)``, i.e. it would unpickle a file the checkpoint names.
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {(_DCP_METADATA, n) for n in ("Metadata", "TensorStorageMetadata", "ChunkStorageMetadata",
                                         "TensorProperties", "MetadataIndex", "StorageMeta",
                                         "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
    ("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath")}
_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose metadata asks for more than tensors at plain file offsets."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP's dataclasses, torch.Size / dtype / layout / memory_format."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and name in _DTYPES):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(f"refers to {module}.{name}, which a tensor checkpoint never needs")


def _check_storage(metadata: Metadata) -> None:
    """Every entry is a tensor stored at a non-negative offset of a file directly in the checkpoint."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for key, entry in (metadata.state_dict_metadata or {}).items():
        if not isinstance(entry, TensorStorageMetadata):
            raise UnsafeCheckpoint(f"entry {key!r} is a {type(entry).__name__}, not a tensor")
    for index, info in (metadata.storage_data or {}).items():
        if not isinstance(info, _StorageInfo):
            raise UnsafeCheckpoint(f"storage of {getattr(index, 'fqn', index)!r} is a {type(info).__name__}")
        rel = str(info.relative_path)
        if rel != os.path.basename(rel) or rel in ("", ".", "..") or int(info.offset) < 0 or int(info.length) < 0:
            raise UnsafeCheckpoint(f"storage of {getattr(index, 'fqn', index)!r} points at {rel!r} "
                                   f"(offset {info.offset}), outside the checkpoint's own files")


class _SafeMetadata:
    """The ``read_metadata`` of :class:`SafeFileSystemReader` and :class:`SafeFsspecReader`: ``.metadata`` read
    with an exact allow-list, tensors only. A reader class says where the file is and how to read its bytes.

    Raises (from :meth:`read_metadata`):
        UnsafeCheckpoint (a ValueError): the metadata names anything but DCP's tensor metadata classes, holds a
            non-tensor entry, or points outside the checkpoint directory.
        ValueError: the metadata is missing, truncated or not DCP metadata.
    """

    path: Any
    load_id: str

    def _metadata_path(self) -> str:
        raise NotImplementedError

    def _metadata_bytes(self, path: str) -> bytes:
        raise NotImplementedError

    def read_metadata(self) -> Metadata:
        where = self._metadata_path()
        path = storage.display(where)  # what errors name (a URI's secrets masked; a local path as it is)
        try:
            metadata = _MetadataUnpickler(io.BytesIO(self._metadata_bytes(where))).load()
        except UnsafeCheckpoint as e:
            raise UnsafeCheckpoint(f"{path}: refused: {e}") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing (not a complete checkpoint)") from None
        except Exception as e:  # noqa: BLE001 - truncated or random bytes: any unpickling error
            raise ValueError(f"{path}: unreadable checkpoint metadata ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP metadata")
        try:
            _check_storage(metadata)
        except UnsafeCheckpoint as e:
            raise UnsafeCheckpoint(f"{path}: refused: {e}") from None
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeFileSystemReader(_SafeMetadata, FileSystemReader):
    """DCP's FileSystemReader (a local checkpoint directory) that reads ``.metadata`` with an exact allow-list and
    accepts tensors only; raises as :class:`_SafeMetadata` says."""

    def _metadata_path(self) -> str:
        return os.path.join(str(self.path), ".metadata")

    def _metadata_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()


class SafeFsspecReader(_SafeMetadata, FsspecReader):
    """DCP's FsspecReader (a checkpoint on an object store, ``s3://...``) with the same vetting of ``.metadata`` as
    :class:`SafeFileSystemReader`; raises as :class:`_SafeMetadata` says."""

    def _metadata_path(self) -> str:
        return str(self.fs.concat_path(self.path, ".metadata"))

    def _metadata_bytes(self, path: str) -> bytes:
        with self.fs.create_stream(path, "rb") as f:
            return f.read()


def _reader(ckpt: str) -> _SafeMetadata:
    """The vetting DCP reader of a checkpoint: local directory or object-store URI."""
    return SafeFsspecReader(ckpt) if storage.is_uri(ckpt) else SafeFileSystemReader(ckpt)


def _write_target(ckpt: str) -> Dict[str, Any]:
    """The arguments that tell DCP where to write ``ckpt``: a local directory by its path (DCP's FileSystemWriter,
    as always); a URI through an explicit ``FsspecWriter`` after checking the bucket exists (s3fs would otherwise
    create a missing bucket). No fsync there: an upload is durable once it completes, and DCP's fallback for a
    stream without a file descriptor is a machine-wide ``os.sync()``."""
    if not storage.is_uri(ckpt):
        return {"checkpoint_id": ckpt}
    storage.check_reachable(ckpt)
    return {"storage_writer": FsspecWriter(ckpt, sync_files=False)}


def checkpoint_dir(run_dir: str, step: int) -> str:
    return storage.join(run_dir, "checkpoints", f"step-{step:08d}")


_STEP_NAME = re.compile(r"step-\d{8,}")  # what :func:`checkpoint_dir` names: a pointer may name nothing else


def latest_checkpoint(run_dir: str, pointer: str = LATEST) -> Optional[str]:
    """Path (or URI) of the newest complete checkpoint of a run (``pointer=BEST``: the best-validated one), or
    None.

    A pointer resolves inside the run's own ``checkpoints/`` only: it must hold one ``step-NNNNNNNN`` name, never a
    path (``../other``, ``/abs``, ``s3://...``), so a run directory never has another run's weights scored or
    exported under its name.

    Raises:
        ValueError: the pointer names anything but a step directory of this run, or an incomplete one.
    """
    path = storage.join(run_dir, "checkpoints", pointer)
    if not storage.is_file(path):
        return None
    try:
        name = _read_text(path).strip()
    except UnicodeDecodeError:
        name = "<not text>"
    if not _STEP_NAME.fullmatch(name):
        raise ValueError(f"{storage.display(path)} names {name[:80]!r}, not a checkpoint of this run "
                         "(a pointer holds one step-NNNNNNNN name inside its checkpoints/ directory); rewrite it "
                         "with a step directory of this run, or remove it")
    ckpt = storage.join(run_dir, "checkpoints", name)
    if storage.is_local(ckpt) and os.path.dirname(os.path.realpath(ckpt)) != os.path.realpath(os.path.dirname(ckpt)):
        raise ValueError(f"{storage.display(ckpt)}: a link to {os.path.realpath(ckpt)}, outside this run's "
                         "checkpoints/; a run is scored and exported from its own checkpoints only")
    if not storage.is_file(storage.join(ckpt, EXTRA)):
        raise ValueError(f"{storage.display(path)} names {name!r}, which is incomplete or missing")
    return ckpt


def _read_text(location: str) -> str:
    return storage.read_bytes(location).decode("utf-8")


def final_checkpoint(run_dir: str) -> Optional[str]:
    """The checkpoint a finished run is evaluated and exported from: the best-validated one when the run trained
    with early stopping (``train.patience``), else the newest."""
    return latest_checkpoint(run_dir, BEST) or latest_checkpoint(run_dir)


def read_extra(ckpt: str) -> Dict[str, Any]:
    """A checkpoint's extra.json (step, epoch, reader positions, plan); a ValueError names a broken one."""
    return read_json(storage.join(ckpt, EXTRA), "a checkpoint record", ("step", "epoch", "readers"))


def save(run_dir: str, step: int, state: Dict[str, Any], extra: Dict[str, Any], is_main: bool,
         keep: int) -> str:
    """Collective: every rank calls it. Writes the checkpoint, then (rank 0) publishes it as latest."""
    ckpt = checkpoint_dir(run_dir, step)
    if is_main:
        _clear(ckpt)
    dist.barrier()
    try:
        dcp.save(state, **_write_target(ckpt))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - one line, naming the checkpoint
        raise _write_failed(run_dir, ckpt, e, is_main) from None
    if is_main:
        _publish(run_dir, ckpt, extra, keep)
    dist.barrier()
    return ckpt


def _clear(ckpt: str) -> None:
    """Rank 0 before a save: remove a leftover of an interrupted save of the same step, and (locally) make the
    directory, so a file in the way is named in one line (DCP would raise ``[Errno 17] File exists`` inside pages of
    per-rank traces)."""
    if storage.exists(ckpt):
        storage.remove_tree(ckpt)
    if not storage.is_uri(ckpt):
        make_dirs(ckpt)


class _HostStager:
    """DCP's ``AsyncStager``: copies the state to host memory before ``async_save`` returns, so training may
    change the live tensors while the copy is written. Unlike DCP's default stager it handles TorchRec's
    ``ShardedTensor`` (each local shard is copied; the global metadata is kept)."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        return {k: _host_copy(v) for k, v in state_dict.items()}

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _host_copy(value: Any) -> Any:
    """A host copy of a state value; a ShardedTensor's copy is placed on the host, as ``ShardedTensor.cpu`` does.

    On a GPU TorchRec places each local shard at ``rank:R/cuda:L``, and torch's ``Shard`` refuses a tensor whose
    device differs from its placement, so the copy's placements (its local shards' and every shard's in the global
    metadata) are rewritten to ``cpu`` on deep copies: the live tensor's metadata is shared with TorchRec and must
    keep its own. Unlike ``ShardedTensor.cpu`` this always copies (a CPU tensor's shards are the live ones, which
    training changes while the background write runs).
    """
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    if isinstance(value, ShardedTensor):
        shards = []
        for s in value.local_shards():
            metadata = copy.deepcopy(s.metadata)
            metadata.placement._device = torch.device("cpu")
            shards.append(Shard(tensor=s.tensor.detach().to("cpu", copy=True), metadata=metadata))
        global_metadata = copy.deepcopy(value.metadata())
        for m in global_metadata.shards_metadata:
            m.placement._device = torch.device("cpu")
        return ShardedTensor._init_from_local_shards_and_global_metadata(shards, global_metadata,
                                                                          process_group=value._process_group)
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    return value


class AsyncCheckpointer:
    """Saves checkpoints with ``dcp.async_save`` and publishes each as ``latest`` once complete on every rank.

    Every rank calls :meth:`save` at the same steps (a collective) and :meth:`wait` before exiting. At most one
    save is in flight: a new one first waits for the previous one.

    Args:
        run_dir: the run directory.
        is_main: rank 0 (writes ``extra.json`` and ``latest``, prunes old checkpoints).
        keep: how many complete checkpoints to keep.
    """

    def __init__(self, run_dir: str, is_main: bool, keep: int) -> None:
        self.run_dir, self.is_main, self.keep = run_dir, is_main, keep
        self.group = dist.new_group(backend="gloo")  # a CPU group: async_save needs one, apart from training's
        self._pending: Optional[tuple[Any, str, Dict[str, Any]]] = None

    def save(self, step: int, state: Dict[str, Any], extra: Dict[str, Any]) -> str:
        self.wait()
        ckpt = checkpoint_dir(self.run_dir, step)
        if self.is_main:
            _clear(ckpt)
        dist.barrier(group=self.group)
        future = dcp.async_save(state, **_write_target(ckpt), process_group=self.group, async_stager=_HostStager())
        self._pending = (future, ckpt, extra)
        return ckpt

    def poll(self) -> None:
        """Publish the pending save if it has completed (no waiting)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> Optional[str]:
        """Wait for the pending save and publish it; returns its directory (None if nothing was pending)."""
        if self._pending is None:
            return None
        future, ckpt, extra = self._pending
        self._pending = None
        try:
            future.result()  # the writer's error (e.g. no space left), every rank's (DCP gathers them)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - one line, naming the checkpoint
            raise _write_failed(self.run_dir, ckpt, e, self.is_main) from None
        if self.is_main:
            _publish(self.run_dir, ckpt, extra, self.keep)
        return ckpt


def _publish(run_dir: str, ckpt: str, extra: Dict[str, Any], keep: int) -> None:
    """extra.json, then the pointers: each one atomic write (a temporary file renamed locally, one object write on
    a store), so a pointer never names a checkpoint without its record."""
    storage.write_bytes_atomic(storage.join(ckpt, EXTRA), json.dumps(extra, indent=2).encode("utf-8"))
    pointers = [LATEST] + ([BEST] if (extra.get("best") or {}).get("step") == extra.get("step") else [])
    for name in pointers:
        storage.write_bytes_atomic(storage.join(run_dir, "checkpoints", name), ckpt.rsplit("/", 1)[-1].encode("utf-8"))
    _prune(run_dir, keep)


def _prune(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest complete checkpoints (``best`` is kept) and abandoned partial saves older
    than the newest complete one; best effort, as a failed delete loses nothing."""
    root = storage.join(run_dir, "checkpoints")
    names = sorted(n for n in storage.listdir(root)
                   if n.startswith("step-") and not storage.is_file(storage.join(root, n)))  # directories (prefixes)
    complete = [n for n in names if storage.is_file(storage.join(root, n, EXTRA))]
    best = storage.join(root, BEST)
    kept_best = _read_text(best).strip() if storage.is_file(best) else None
    doomed = [n for n in complete[:-keep] if n != kept_best]
    doomed += [n for n in names if n not in complete and n < (complete[-1] if complete else "")]  # partial saves
    for n in doomed:
        try:
            storage.remove_tree(storage.join(root, n))
        except OSError:
            pass


def global_sizes(ckpt: str) -> Dict[str, tuple]:
    """Key -> global shape of every tensor in a checkpoint (from its metadata)."""
    md = _reader(ckpt).read_metadata().state_dict_metadata
    return {k: tuple(m.size) for k, m in md.items() if hasattr(m, "size")}


def load(ckpt: str, state: Dict[str, Any], no_dist: bool = False, optional_prefix: Optional[str] = None) -> set:
    """Load ``ckpt`` into the tensors of ``state`` in place (DCP reshards to this world size / plan).

    Keys starting with ``optional_prefix`` that the checkpoint does not hold are skipped (optimizer state is
    lazy: a parameter that never had a gradient has none); every other missing key is an error. Returns the
    skipped keys.
    """
    reader = _reader(ckpt)
    # read (and vet) the metadata here first: inside dcp.load its errors come back wrapped in pages of trace
    present = set(reader.read_metadata().state_dict_metadata)
    absent: set = set()
    if optional_prefix is not None:
        absent = {k for k in state if k.startswith(optional_prefix) and k not in present}
        state = {k: v for k, v in state.items() if k not in absent}
    try:
        dcp.load(state, storage_reader=reader, no_dist=no_dist)
    except CheckpointException as e:
        raise ValueError(f"{storage.display(ckpt)}: unreadable checkpoint data ({_last_line(e)})") from None
    return absent


def _last_line(e: BaseException) -> str:
    """The actual error inside a CheckpointException (whose text is a traceback per rank)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _causes(e: BaseException) -> list:
    """The exceptions behind ``e``: a ``CheckpointException``'s per-rank failures (DCP wraps each rank's error with
    its traceback text), each one's ``__cause__`` / ``__context__`` chain, and ``e`` itself."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        if isinstance(x, CheckpointException):
            todo += [f[0] if isinstance(f, tuple) else f for f in x.failures.values()]
        todo += [x.__cause__, x.__context__]
    return out


def _no_space(e: BaseException) -> bool:
    """Whether a failed write ran out of space for certain: an ``OSError`` ENOSPC / EDQUOT anywhere behind it. (Torch's
    zip writer says only ``unexpected pos ... vs ...`` when a file kept fewer bytes than were written: probably.)"""
    return any(isinstance(x, OSError) and x.errno in _DISK_FULL for x in _causes(e))


def _write_failed(run_dir: str, ckpt: str, e: BaseException, is_main: bool) -> OSError:
    """The one-line error of a failed checkpoint write, after rank 0 removed the partial step directory (DCP reports
    a failure to every rank only after each rank's write returned, so nothing writes there any more).

    Why this is not left to DCP's exception: ``CheckpointException`` derives from ``BaseException``, so an
    ``except Exception`` lets it through as pages of per-rank tracebacks, and its last line for a full disk is
    often torch's ``unexpected pos 704 vs 598``. The message says when the disk is full (an ENOSPC / EDQUOT behind
    it; probably full: a short write, or under 1 GiB left; an object store has no disk to ask about), names the
    checkpoint and the underlying error, and says which checkpoint is still the latest.
    """
    if is_main:
        try:
            storage.remove_tree(ckpt)
            removed = "the partial checkpoint was removed"
        except OSError:
            removed = "the partial checkpoint could not be removed (delete it)"
    else:
        removed = "rank 0 removes the partial checkpoint"
    try:
        latest = latest_checkpoint(run_dir)
    except (OSError, ValueError):
        latest = None
    kept = (f"{latest.rsplit('/', 1)[-1]} is still the latest checkpoint" if latest is not None
            else "no earlier checkpoint")
    free = None
    if not storage.is_uri(ckpt):
        try:
            free = shutil.disk_usage(os.path.dirname(ckpt) or ".").free
        except OSError:
            free = None
    low = free is not None and free < 1 << 30
    room = f"; {free / 2**20:.0f} MiB free there" if low else ""
    full = ("the disk is full" if _no_space(e) else
            "the disk is probably full" if low or "unexpected pos" in str(e) else None)
    if full is None:
        return OSError(f"{storage.display(ckpt)}: writing the checkpoint failed ({_last_line(e)}); {removed}; {kept}")
    return OSError(f"{storage.display(ckpt)}: writing the checkpoint failed: {full} ({_last_line(e)}{room}); "
                   f"{removed}; {kept}: free space, then resume with mkt train --resume")
