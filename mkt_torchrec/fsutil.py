"""File-system helpers shared by every writer of a finished directory (datasets, serving exports)."""

from __future__ import annotations

import errno
import os
import shutil
import uuid


_IN_THE_WAY = (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR)


def replace_dir(tmp: str, final: str) -> None:
    """Rename the finished directory ``tmp`` to ``final``, replacing an existing ``final``.

    The old directory is moved aside first and removed only after the rename; if the rename fails it is moved
    back, so ``final`` is always either the old or the new complete directory.

    Raises:
        FileExistsError: something appeared at ``final`` while this process wrote ``tmp`` (another job writing the
            same output): one line naming it; neither is touched.
    """
    old = None
    if os.path.lexists(final):
        old = f"{final}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException as e:
        if old is not None and not os.path.lexists(final):
            os.rename(old, final)
        if isinstance(e, OSError) and e.errno in _IN_THE_WAY:
            kept = f" (the previous one is at {old})" if old is not None and os.path.lexists(old) else ""
            raise FileExistsError(f"{final}: was created by another process while this one wrote its output{kept}; "
                                  "nothing was replaced: make sure one job writes it, remove it, and run again") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def make_dirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` whose failure names what is in the way (``[Errno 17] File exists`` /
    ``[Errno 20] Not a directory`` name neither the file nor what to do).

    Raises:
        FileExistsError: ``path`` or a folder above it is a file (or a link to one).
    """
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = path
        probe = path
        while probe and probe != os.path.dirname(probe):
            if os.path.lexists(probe) and not os.path.isdir(probe):
                blocker = probe
            probe = os.path.dirname(probe)
        raise FileExistsError(f"{blocker}: is a file where a directory is needed (for {path}); move it away or choose "
                              "another path") from None


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


def replace_output(tmp: str, final: str, markers: tuple, what: str) -> None:
    """:func:`replace_dir` for a tool's output: ``final`` is replaced only if :func:`check_replaceable` allows it
    (absent, an empty directory, or a directory holding one of ``markers``: what this tool wrote), checked again
    right before the rename. Every command that replaces an output directory goes through here or
    :func:`claim_output` / ``storage.StagedDirectory``.

    Raises:
        FileExistsError: ``final`` is something else (a file, or a directory of other files); ``tmp`` is left
            for the caller to remove.
    """
    check_replaceable(final, markers, what)
    replace_dir(tmp, final)


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
