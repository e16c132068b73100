"""What made a run: the code (package version, a digest of its source, the git commit when there is one), the
library versions and the machine. Every run.json records it; ``mkt run`` does not reuse a finished run made by
other code (its results would be another code's, reported as this one's).

What is bit-identical: the same code, config, data, world size and thread count on the same kind of CPU give the
same parameters and metrics (tests check it on one machine). Across CPU kinds float rounding differs (vector
widths and fbgemm's kernels differ), so results differ in their last digits and, through early stopping's choice
between close epochs, sometimes more: compare models over seeds, not one run.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
import sys
from typing import Any, Dict, Optional

_PACKAGE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A short hash of every ``.py`` file of the package (path and bytes), in path order: the code version,
    with or without git, installed or not."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(_PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, _PACKAGE).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit of the git work tree the package is in (``+dirty`` with uncommitted changes to it), or None."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", _PACKAGE, *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def _version(module: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def _environment() -> Dict[str, Any]:
    return {"python": platform.python_version(), "torch": _version("torch"), "torchrec": _version("torchrec"),
            "fbgemm_gpu": _version("fbgemm_gpu") or _version("fbgemm-gpu-cpu"), "cpu": _cpu(),
            "cpus": os.cpu_count(), "platform": sys.platform}


def provenance() -> Dict[str, Any]:
    """{"code": {"version", "source", "commit"}, "environment": {python, torch, torchrec, fbgemm_gpu, cpu, ...}}."""
    return {"code": {"version": _version("mkt-torchrec"), "source": source_digest(), "commit": git_commit()},
            "environment": dict(_environment())}


def other_code(record: Dict[str, Any]) -> Optional[str]:
    """Why a run record was made by other code than this (one phrase), or None if by this code."""
    code = record.get("code")
    if not isinstance(code, dict) or not code.get("source"):
        return "by a release that recorded no code version"
    if code["source"] != source_digest():
        made = code.get("commit") or code.get("version") or "?"
        return f"by other code (source {code['source']}, commit {made}; this is {source_digest()})"
    return None
