"""File-system helpers shared by every writer of a finished directory (datasets, serving exports)."""

from __future__ import annotations

import os
import shutil
import uuid


def replace_dir(tmp: str, final: str) -> None:
    """Rename the finished directory ``tmp`` to ``final``, replacing an existing ``final``.

    The old directory is moved aside first and removed only after the rename; if the rename fails it is moved
    back, so ``final`` is always either the old or the new complete directory.
    """
    old = None
    if os.path.exists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
