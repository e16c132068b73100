"""One job at a time in a run directory: ``RUN/.lock``.

Two ``mkt train`` (or a train and an evaluate) writing one run directory used to both succeed and overwrite each
other's checkpoints and logs. Rank 0 takes ``RUN/.lock`` (created exclusively, JSON: job, host, pid, time) before
writing anything and removes it when the job ends; it refreshes the file's time at every log step and save. A
lock left by a job that died is taken over when

* it names the same job (``TORCHELASTIC_RUN_ID``: a restart of this job by torchrun / TorchX), or
* it was taken on this host by a process that no longer exists, or
* it has not been refreshed for ``STALE_SECONDS`` (a job on another host that died).

Otherwise the second job stops with an error naming the holder.

A run directory on S3 is locked the same way: the lock is an object created with a conditional write
(``If-None-Match: *``), so of two jobs exactly one creates it, and refreshing rewrites it (at most once a minute).
A store without an exclusive create is refused with a one-line message (``storage.create_exclusive``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, Optional, Tuple

from mkt_torchrec import storage

LOCK = ".lock"
STALE_SECONDS = 15 * 60.0
JOB_ENV = "TORCHELASTIC_RUN_ID"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


REFRESH_OBJECT_SECONDS = 60.0  # a lock on an object store is rewritten (a PUT) at most this often
_held: Dict[str, Tuple[bytes, float]] = {}  # lock location -> (its record, when it was last written): this process's


def _holder(path: str) -> Optional[Dict[str, Any]]:
    try:
        held = json.loads(storage.read_bytes(path).decode("utf-8"))
        return held if isinstance(held, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: judged by its age alone


def _stale(path: str, held: Dict[str, Any], job: Optional[str]) -> bool:
    if job and held.get("job") == job:
        return True
    if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int) and not _alive(held["pid"]):
        return True
    try:
        written = storage.modified(path)
    except OSError:
        return True
    return written is None or time.time() - written > STALE_SECONDS


def _remove(path: str) -> None:
    if storage.is_local(path):
        try:
            os.remove(storage.filesystem(path)[1])
        except FileNotFoundError:
            pass
    else:
        storage.remove_tree(path)


def acquire(run_dir: str, what: str) -> str:
    """Take ``RUN/.lock`` for this process (rank 0); returns its location.

    Raises:
        ValueError: another live job holds the run directory (naming it), or the run directory is on a store
            without an exclusive create.
    """
    path = storage.join(run_dir, LOCK)
    job = os.environ.get(JOB_ENV)
    record = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "what": what,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    data = json.dumps(record).encode("utf-8")
    for _ in range(2):
        if storage.create_exclusive(path, data):
            _held[path] = (data, time.time())
            return path
        held = _holder(path)
        if held is not None and not _stale(path, held, job):
            raise ValueError(f"{storage.display(run_dir)}: in use by {held.get('what', 'a job')} (pid "
                             f"{held.get('pid')} on {held.get('host')} since {held.get('since')}); wait for it, or "
                             f"remove {storage.display(path)} if that job is gone")
        _remove(path)  # a dead job's lock
    raise ValueError(f"{storage.display(run_dir)}: another job took {storage.display(path)} at the same moment; retry")


def refresh(path: Optional[str]) -> None:
    """Mark the lock as alive (cheap: updates a local file's time; rewrites an object at most once a minute)."""
    if not path:
        return
    try:
        if storage.is_local(path):
            os.utime(storage.filesystem(path)[1])
            return
        data, written = _held.get(path, (b"{}", 0.0))
        if time.time() - written >= REFRESH_OBJECT_SECONDS:
            storage.write_bytes_atomic(path, data)
            _held[path] = (data, time.time())
    except OSError:
        pass


def release(path: Optional[str]) -> None:
    if path:
        _held.pop(path, None)
        try:
            _remove(path)
        except OSError:
            pass
