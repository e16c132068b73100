"""Shared fixtures: a small synthetic dataset written once per session."""

from __future__ import annotations

import os

import pytest
import torch

from mkt_torchrec.config import Config, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.yaml")

# Two cores: one intra-op thread per process avoids OpenMP oversubscription (20x slower steps when busy).
torch.set_num_threads(1)

SMALL = [
    "synth.users=400", "synth.source_rows=6000", "synth.source_items=2000", "synth.target_items=600",
    "synth.row_group_rows=500", "synth.rows_per_file=2000", "data.batch_size=128",
    "train.patience=0",  # train train.epochs epochs; the early-stopping tests set it themselves
    "data.validation_fraction=0.1",
    # the sequence lengths the tests were written for (the quickstart demo keeps 30 / 20 steps)
    "schema.sequences.hist_source_items.max_len=50", "schema.sequences.hist_target_items.max_len=50",
]


class CommandOnUnpickle:
    """An attack payload: unpickling it runs ``command`` in a shell (``os.system``)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def set_flags(*sets: str) -> list:
    """Command-line ``--set KEY=VALUE`` flags for each override."""
    return [word for s in sets for word in ("--set", s)]


def small_config(*extra: str) -> Config:
    return load_config(QUICKSTART, [*SMALL, *extra])


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> str:
    from mkt_torchrec.data.synth import generate

    out = str(tmp_path_factory.mktemp("data") / "small")
    generate(small_config(), out)
    return out
