"""The trainer's feed: reader batches with their loss weights, filler batches for a rank that runs out, pinning on a
thread (CUDA), and TorchRec's train pipeline over them.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Deque, Dict, Iterator, NamedTuple, Optional

import torch
from torch import nn

from mkt_torchrec.data.batch import Batch
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.training.distributed import DistInfo

log = logging.getLogger("mkt.train")


def _weighted(batch: Batch, global_rows: float, world_size: int, real: bool) -> Batch:
    """The batch with its loss weights: ``world_size / rows of the global step`` for real rows, 0 for filler.

    DDP and TorchRec's sharded tables both average gradients over ranks; weighting each rank's rows by
    ``world_size / global rows`` makes that average the gradient of the mean over the global step's rows, so
    training does not depend on how rows are split over ranks (or on a rank having only filler).
    """
    value = world_size / global_rows if real else 0.0
    return replace(batch, weights=torch.full((len(batch),), value, dtype=torch.float32))


class _Fed(NamedTuple):
    """One batch the feed handed to the pipeline, and what the trainer needs to know of it once trained."""

    batch: Batch  # host memory (pinned on CUDA), loss weights set
    epoch: int  # the reader's epoch it belongs to
    rows: int  # this rank's real rows (0: filler)
    global_rows: int  # real rows of the step, all ranks together
    reader_state: Dict[str, Any]  # this rank's reader position after it
    epoch_end: bool  # the last step of its epoch


class Feed:
    """Loss-weighted batches for a train pipeline, without any collective or host sync.

    The reader's step schedule (:meth:`ParquetReader.step_rows`) gives every rank, from the manifest alone, the
    number of steps left in the epoch and the rows all ranks train at each. So a rank that has run out of rows
    steps on a zero-weight filler batch until the epoch's last step (sharded lookups are collectives every rank
    joins), and each row's loss weight, ``world_size / rows of the step`` (see :func:`_weighted`), needs no
    all-reduce. The pipeline pulls batches ahead of the step it trains, so the feed keeps what it handed out in
    ``handed``, in order: the trainer pops one per trained step and so knows the reader position to checkpoint.

    On a GPU the batches are pinned (page-locked, so the pipeline's host-to-device copy is non-blocking) by a
    thread of the feed's own, :data:`PIN_AHEAD` batches ahead of the pipeline, so the main thread never waits for
    the copy into pinned memory. The thread runs the reader and hands its batches over in order: the batches,
    their order and the reader positions are the same as without it.

    Args:
        reader: this rank's reader, at the position to continue from (only the feed touches it until the feed
            is exhausted).
        info: the process group.
        epochs: stop at the end of this epoch count.
        steps: stop after this many batches (None: no limit).
        pin: what makes a batch's pinned copy (default: ``Batch.pin_memory`` on a CUDA device, none elsewhere).
    """

    def __init__(self, reader: ParquetReader, info: DistInfo, epochs: int, steps: Optional[int],
                 pin: Optional[Callable[[Batch], Batch]] = None) -> None:
        self.reader, self.world_size = reader, info.world_size
        self.epochs, self.steps = epochs, steps
        self.pin = pin if pin is not None else (Batch.pin_memory if info.device.type == "cuda" else None)
        self.handed: Deque[_Fed] = deque()
        self._filler: Optional[Batch] = None
        self._batches: Iterator[_Fed] = self._generate()
        if self.pin is not None:
            self._batches = _Ahead(self._pinned(self._batches), PIN_AHEAD)

    def __iter__(self) -> "Feed":
        return self

    def __next__(self) -> Batch:
        fed = next(self._batches)
        self.handed.append(fed)
        return fed.batch

    def _pinned(self, fed: Iterator[_Fed]) -> Iterator[_Fed]:
        for f in fed:
            yield f._replace(batch=self.pin(f.batch))  # type: ignore[misc]

    def _generate(self) -> Iterator[_Fed]:
        left = self.steps
        while self.reader.epoch < self.epochs:
            epoch = self.reader.epoch
            schedule = self.reader.step_rows()
            mine = self.reader.batches_left()
            batches = iter(self.reader)
            for i, global_rows in enumerate(schedule):
                if left is not None and left <= 0:
                    return
                batch = next(batches) if i < mine else None
                if batch is not None:
                    self._filler = batch
                else:
                    batch = self._filler if self._filler is not None else self.reader.first_batch()
                rows = len(batch) if i < mine else 0
                batch = _weighted(batch, global_rows, self.world_size, real=rows > 0)
                yield _Fed(batch, epoch, rows, global_rows, self.reader.state_dict(), i == len(schedule) - 1)
                if left is not None:
                    left -= 1
            if next(batches, None) is not None:  # ending the iteration moves the reader to the next epoch
                raise RuntimeError(f"the reader yielded more than the {mine} batches its schedule counts")


PIN_AHEAD = 2  # batches the feed's pinning thread prepares ahead of the pipeline (which holds two more)


class _Ahead:
    """Runs an iterator in a daemon thread, ``depth`` items ahead of the consumer, handing items (and the
    iterator's exception, if it raises) over in order through a bounded queue."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        import queue
        import threading

        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(source,), name="mkt-feed-pin", daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                self._queue.put((item, None))
            self._queue.put((self._END, None))
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer's thread
            self._queue.put((self._END, e))

    def __iter__(self) -> "_Ahead":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if item is self._END:
            self._done = True
            self._thread.join()
            if error is not None:
                raise error
            raise StopIteration
        return item


def make_pipeline(model: nn.Module, optimizer: Any, device: torch.device) -> Any:
    """TorchRec's ``TrainPipelineSparseDist`` over the sharded model.

    Why this pipeline: it overlaps the next batch's host-to-device copy and the sharded modules' input
    distribution (the id all-to-alls) with the current step's forward and backward, keeps the plain
    forward / backward / step order (so training equals the serial loop), and needs nothing of the model beyond
    FX-traceability around its sharded modules. The semi-sync and prefetch variants change the update order or
    need UVM caching, which our plans do not use. On CPU there are no side streams, so it overlaps nothing but
    runs the same code.
    """
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
