"""One job at a time in a run directory: ``RUN/.lock``.

Two ``mkt train`` (or a train and an evaluate) writing one run directory used to both succeed and overwrite each
other's checkpoints and logs. Rank 0 takes ``RUN/.lock`` (created exclusively, JSON: job, host, pid, time) before
writing anything and removes it when the job ends; it refreshes the file's time at every log step and save. A
lock left by a job that died is taken over when

* it names the same job (``TORCHELASTIC_RUN_ID``: a restart of this job by torchrun / TorchX), or
* it was taken on this host by a process that no longer exists, or
* it has not been refreshed for ``STALE_SECONDS`` (a job on another host that died).

Otherwise the second job stops with an error naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, Optional

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


def _holder(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            held = json.load(f)
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
        return time.time() - os.path.getmtime(path) > STALE_SECONDS
    except OSError:
        return True


def acquire(run_dir: str, what: str) -> str:
    """Take ``RUN/.lock`` for this process (rank 0); returns its path.

    Raises:
        ValueError: another live job holds the run directory (naming it).
    """
    path = os.path.join(run_dir, LOCK)
    job = os.environ.get(JOB_ENV)
    record = {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "what": what,
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _holder(path)
            if held is not None and not _stale(path, held, job):
                raise ValueError(f"{run_dir}: in use by {held.get('what', 'a job')} (pid {held.get('pid')} on "
                                 f"{held.get('host')} since {held.get('since')}); wait for it, or remove "
                                 f"{path} if that job is gone") from None
            try:
                os.remove(path)  # a dead job's lock
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        return path
    raise ValueError(f"{run_dir}: another job took {path} at the same moment; retry")


def refresh(path: Optional[str]) -> None:
    """Mark the lock as alive (cheap: updates its time)."""
    if path:
        try:
            os.utime(path)
        except OSError:
            pass


def release(path: Optional[str]) -> None:
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
