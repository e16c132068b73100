"""Object collectives that carry errors to every rank, so that no rank is left waiting in a collective.

The pattern every multi-rank step of the package needs: either rank 0 computes something and every rank gets
it (:meth:`Collective.on_root`), or every rank computes its share and every rank gets all shares
(:meth:`Collective.phase`). If the work raised on any rank, every rank raises: the rank it happened on re-raises
its own exception (with its traceback), the others an exception of the same kind. A user error
(``ValueError``, ``FileNotFoundError``, ``OSError``) keeps its message, which names the file at fault; anything
else arrives as ``RuntimeError("rank R: Type: message")``. With several failing ranks the lowest rank's error
wins, so a caller that gives ranks contiguous shares of ordered work reports the first failure in that order.

Only object collectives are used; under NCCL they run with the rank's CUDA device current.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_KINDS = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError, "OSError": OSError}


def _kind(e: BaseException) -> str:
    for name, cls in _KINDS.items():  # FileNotFoundError before its base OSError
        if isinstance(e, cls):
            return name
    return "RuntimeError"


class Collective:
    """Object collectives on ``group`` (default: the world), with errors carried to every rank.

    Args:
        device: the device the group's collectives use (``cuda:N`` under NCCL, else ``cpu``).
        group: the process group (None: the default group).
    """

    def __init__(self, device: Any = "cpu", group: Any = None) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.device = torch.device(device)

    def _on_device(self) -> Any:
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def all_gather(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.world
        with self._on_device():
            dist.all_gather_object(out, obj, group=self.group)
        return out

    @staticmethod
    def _report(e: BaseException, rank: int) -> Tuple[str, str]:
        kind = _kind(e)
        return kind, str(e) if kind != "RuntimeError" else f"rank {rank}: {type(e).__name__}: {e}"

    def _raise_first(self, reports: Sequence[Tuple[int, Optional[Tuple[str, str]]]],
                     own: Optional[BaseException]) -> None:
        """Raise the error of the lowest failing rank: its own exception on that rank."""
        failed = [(rank, rep) for rank, rep in reports if rep is not None]
        if not failed:
            return
        rank, (kind, message) = failed[0]
        if own is not None and rank == self.rank:
            raise own
        raise _KINDS.get(kind, RuntimeError)(message) from own

    def phase(self, fn: Callable[[], T]) -> List[T]:
        """Run ``fn`` on every rank and all-gather its results (in rank order); if it raised on any rank, every
        rank raises the lowest failing rank's error."""
        own: Optional[BaseException] = None
        value: Any = None
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - carried to the other ranks, then raised again here
            own = e
        report = None if own is None else self._report(own, self.rank)
        gathered = self.all_gather((report, None if own is not None else value))
        self._raise_first(list(enumerate(g[0] for g in gathered)), own)
        return [g[1] for g in gathered]

    def on_root(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and broadcast its result (or its error) to every rank."""
        own: Optional[BaseException] = None
        box: List[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = (None, fn())
            except Exception as e:  # noqa: BLE001 - carried to the other ranks
                own = e
                box[0] = (self._report(e, 0), None)
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        with self._on_device():
            dist.broadcast_object_list(box, src=src, group=self.group)
        report, value = box[0]
        self._raise_first([(0, report)], own)
        return value
