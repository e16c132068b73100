"""Our log lines (``mkt.*`` loggers) go to stderr at INFO, whatever handlers libraries put on the root logger.

Some import (torch's) installs a WARNING-level root handler first, which made ``logging.basicConfig`` a no-op
and dropped every ``mkt.train`` line; this gives the ``mkt`` logger its own handler instead.
"""

from __future__ import annotations

import logging
import sys


def configure() -> None:
    """Give the ``mkt`` logger its own stderr handler at INFO (idempotent). A handler made by an earlier call writes
    to today's ``sys.stderr`` (``main`` called again in one process, after something replaced stderr: a closed
    stream would turn every log line into a logging error)."""
    mkt = logging.getLogger("mkt")
    for handler in mkt.handlers:
        if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr:
            with handler.lock:  # (not setStream: it flushes the old stream, which may be closed)
                handler.stream = sys.stderr
    if not mkt.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S"))
        mkt.addHandler(handler)
        mkt.setLevel(logging.INFO)
        mkt.propagate = False


def progress_enabled() -> bool:
    """Progress bars: ``MKT_PROGRESS=1`` on, ``MKT_PROGRESS=0`` off, otherwise only on a terminal (every command
    decides the same way; a log file gets our log lines, not bar redraws)."""
    import os

    choice = os.environ.get("MKT_PROGRESS")
    if choice in ("0", "1"):
        return choice == "1"
    return sys.stderr.isatty()
