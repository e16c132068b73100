"""One job at a time in a run directory: ``RUN/.lock``.

Two ``mkt train`` (or a train and an evaluate) writing one run directory used to both succeed and overwrite each
other's checkpoints and logs. Rank 0 takes ``RUN/.lock`` (created exclusively, JSON: job, host, pid, time) before
writing anything and removes it when the job ends; it refreshes the file's time at every log step and save. A
lock left by a job that died is taken over when

* it names the same job (``TORCHELASTIC_RUN_ID``: a restart of this job by torchrun / TorchX), or
* it was taken on this host by a process that no longer exists, or
* it has not been refreshed for ``STALE_SECONDS`` (a job on another host that died).

Otherwise the second job stops with an error naming the holder.

A lock is whole or absent: locally it is written to a temporary file and hard-linked to ``RUN/.lock`` (the link
fails if the name exists: as exclusive as ``O_EXCL``, and no job ever sees a half-written lock), so a job that runs
out of disk space leaves no lock behind and says so in one line. An empty or unparsable ``RUN/.lock`` (left by an
older release on a full disk) therefore names no job: it is taken over at once, with a one-line note.

A run directory on S3 is locked the same way: the lock is an object created with a conditional write
(``If-None-Match: *``), so of two jobs exactly one creates it, and refreshing rewrites it (at most once a minute).
A store without an exclusive create is refused with a one-line message (``storage.create_exclusive``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
import uuid
from typing import Any, Dict, Optional, Tuple

from mkt_torchrec import storage

log = logging.getLogger("mkt.lock")

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
    """The lock's record; None if there is no lock; ``{}`` if it cannot be read now (judged by its age); ``{"": why}``
    if it was read and is not a lock record (empty, not JSON, not an object)."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError:
        return {}  # unreadable now (permissions, the store): judged by its age alone
    try:
        held = json.loads(data.decode("utf-8"))
    except ValueError:
        held = None
    if not isinstance(held, dict) or not held:
        return {"": "empty" if not data.strip() else "not a lock record"}
    return held


def _create(path: str, data: bytes) -> bool:
    """Create the lock holding ``data`` whole, only if there is none; returns whether it was created.

    Locally: a temporary file, then ``os.link`` to the lock's name (fails if the name exists); a filesystem without
    hard links gets ``O_EXCL`` and the file is removed again if its content could not be written. On an object store
    the conditional write of ``storage.create_exclusive`` is already whole.

    Raises:
        OSError: the lock could not be written (one line naming it, saying when the disk is full).
    """
    if not storage.is_local(path):
        return storage.create_exclusive(path, data)
    local = storage.filesystem(path)[1]
    tmp = f"{local}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, local)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            return _create_excl(local, data)  # no hard links here
        return True
    except OSError as e:
        full = " (the disk is full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise OSError(f"{storage.display(path)}: could not write the run directory's lock{full}: "
                      f"{e.strerror or e}; nothing was started") from None
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass


def _create_excl(local: str, data: bytes) -> bool:
    """``O_EXCL`` create and write; a lock whose content could not be written is removed before raising."""
    try:
        fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        os.remove(local)
        raise
    return True


def _stale(path: str, held: Dict[str, Any], job: Optional[str]) -> bool:
    if "" in held:  # read, and no job's record: a lock that was never written whole
        log.warning("%s: %s, so no job holds it (one that ran out of disk space?); taking it over",
                    storage.display(path), held[""])
        return True
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
        OSError: the lock could not be written (a full disk: no lock is left behind).
    """
    path = storage.join(run_dir, LOCK)
    job = os.environ.get(JOB_ENV)
    record = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "what": what,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    data = json.dumps(record).encode("utf-8")
    for _ in range(2):
        if _create(path, data):
            _held[path] = (data, time.time())
            return path
        held = _holder(path)
        if held is not None and not _stale(path, held, job):
            if not held.get("pid"):
                raise ValueError(f"{storage.display(run_dir)}: locked by {storage.display(path)}, which cannot be "
                                 f"read now; it counts as a live job's until {STALE_SECONDS / 60:.0f} minutes after "
                                 "its last change: remove it if no job uses this run directory")
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
