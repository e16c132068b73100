"""Fault injection: the one hook the tests and ``tools/gpu_smoke.py`` use to make a rank fail, read from the
environment so that it reaches every rank of a launched job (``mkt --nproc``, torchrun, TorchX).

Two kinds of failure, each at a named point the code passes:

* ``MKT_FAULT=POINT:RANK``: rank ``RANK`` raises ``ValueError("injected fault at POINT")`` when it reaches
  ``fault_point(POINT)``: an error the job must report once, in one line (points: ``train``, at the start of
  the training loop; ``evaluate``, at the start of scoring).
* ``MKT_FAIL_AT_STEP=N`` or ``STAGE:N``: after training step ``N`` (of stage ``STAGE``, ``mem`` or ``tem``, or of
  any stage), once that step's checkpoint is published, the last rank exits at once with status 3 and no
  message: a rank that dies (killed, out of memory). The job must end, and a resume must continue bit-equal.

Unset, both cost one environment lookup. Nothing else in the package reads them.
"""

from __future__ import annotations

import os
from typing import Callable

FAULT_ENV = "MKT_FAULT"
FAIL_AT_STEP_ENV = "MKT_FAIL_AT_STEP"


def fault_point(name: str, rank: int) -> None:
    """Raise here on the rank ``MKT_FAULT=name:RANK`` names.

    Raises:
        ValueError: this is the named point and rank.
    """
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec.rsplit(":", 1)[0] == name and int(spec.rsplit(":", 1)[1]) == rank:
        raise ValueError(f"injected fault at {name}")


def die_after_step(stage: str) -> Callable[[int, int, int, Callable[[], None]], None]:
    """The check a training loop of ``stage`` calls after each step: ``check(step, rank, world_size, publish)``
    ends the last rank after the step ``MKT_FAIL_AT_STEP`` names, once ``publish()`` (waiting for the step's
    checkpoint) has returned; a no-op when the variable names no step of this stage."""
    fail_stage, _, fail_step = os.environ.get(FAIL_AT_STEP_ENV, "").rpartition(":")  # "N" or "STAGE:N"
    fail_at = int(fail_step or 0) if fail_stage in ("", stage) else 0

    def check(step: int, rank: int, world_size: int, publish: Callable[[], None]) -> None:
        if fail_at and step == fail_at:
            publish()
            if rank == world_size - 1:
                os._exit(3)

    return check
