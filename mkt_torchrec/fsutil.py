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


def check_replaceable(path: str, markers: tuple, what: str) -> None:
    """Refuse to replace ``path`` unless it is absent, an empty directory, or what this tool wrote there (a
    directory holding one of ``markers``): ``--overwrite`` must never delete someone's other files.

    Raises:
        FileExistsError: naming the path and what it would have had to hold.
    """
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        entries = os.listdir(path)
        if not entries or any(m in entries for m in markers):
            return
    raise FileExistsError(f"{path}: exists and is not {what} (it has no {' or '.join(markers)}); refusing to "
                          "replace it: choose another path or remove it yourself")


def claim_output(out_dir: str, overwrite: bool, markers: tuple, what: str) -> str:
    """The absolute ``out_dir`` a tool may write (its parent created): absent, or with ``overwrite`` what the tool
    wrote there before (:func:`check_replaceable`).

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false, or it is not ``what``.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    check_replaceable(out_dir, markers, what)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    return out_dir
