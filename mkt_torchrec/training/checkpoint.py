"""Sharded checkpoints with torch.distributed.checkpoint (DCP), published atomically.

Layout of a run directory::

    RUN/checkpoints/step-00000100/   DCP files (every rank writes its shards) + extra.json (rank 0: step,
                                     epoch, every rank's reader position, the sharding plan)
    RUN/checkpoints/latest           the name of the newest COMPLETE checkpoint

``latest`` is replaced (write temp + rename) only after ``dcp.save`` returned on every rank and
``extra.json`` (step, reader positions of every rank) is written, so an interrupted save leaves the previous
checkpoint as the latest. Only tensors go into DCP; loading reads DCP's ``.metadata`` with a restricted
unpickler that admits DCP's own metadata classes and nothing else, and ``extra.json`` is JSON.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

LATEST = "latest"
EXTRA = "extra.json"

_ALLOWED_PREFIXES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "torch.distributed.tensor.")
_ALLOWED = {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset"),
            ("torch", "device"), ("torch.serialization", "_get_layout"),
            ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata only: DCP dataclasses, torch.Size / dtype / layout / memory_format."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_ALLOWED_PREFIXES) or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and (name in {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8",
                                           "uint8", "bool", "strided", "contiguous_format", "preserve_format"}):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with a restricted unpickler for the ``.metadata`` file."""

    def read_metadata(self) -> Metadata:
        path = os.path.join(str(self.path), ".metadata")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path}: not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step-{step:08d}")


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint of a run, or None."""
    path = os.path.join(run_dir, "checkpoints", LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        name = f.read().strip()
    ckpt = os.path.join(run_dir, "checkpoints", name)
    if not os.path.isfile(os.path.join(ckpt, EXTRA)):
        raise ValueError(f"{path} names {name!r}, which is incomplete or missing")
    return ckpt


def read_extra(ckpt: str) -> Dict[str, Any]:
    with open(os.path.join(ckpt, EXTRA), encoding="utf-8") as f:
        return json.load(f)


def save(run_dir: str, step: int, state: Dict[str, Any], extra: Dict[str, Any], is_main: bool,
         keep: int) -> str:
    """Collective: every rank calls it. Writes the checkpoint, then (rank 0) publishes it as latest."""
    ckpt = checkpoint_dir(run_dir, step)
    if is_main and os.path.exists(ckpt):
        shutil.rmtree(ckpt)  # a leftover of an interrupted save of the same step
    dist.barrier()
    dcp.save(state, checkpoint_id=ckpt)
    if is_main:
        tmp = os.path.join(ckpt, EXTRA + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(extra, f, indent=2)
        os.replace(tmp, os.path.join(ckpt, EXTRA))
        latest = os.path.join(run_dir, "checkpoints", LATEST)
        with open(latest + ".tmp", "w", encoding="utf-8") as f:
            f.write(os.path.basename(ckpt))
        os.replace(latest + ".tmp", latest)
        _prune(run_dir, keep)
    dist.barrier()
    return ckpt


def _prune(run_dir: str, keep: int) -> None:
    root = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and os.path.isdir(os.path.join(root, n)))
    complete = [n for n in names if os.path.isfile(os.path.join(root, n, EXTRA))]
    for n in complete[:-keep]:
        shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    for n in names:
        if n not in complete and n < (complete[-1] if complete else ""):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)  # an abandoned partial save


def load(ckpt: str, state: Dict[str, Any], no_dist: bool = False) -> None:
    """Load ``ckpt`` into the tensors of ``state`` in place (DCP reshards to this world size / plan)."""
    dcp.load(state, storage_reader=SafeFileSystemReader(ckpt), no_dist=no_dist)
