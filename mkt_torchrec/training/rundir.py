"""A run directory's files: ``run.json`` (stage, config, data), ``metrics.jsonl`` (one record per log step), written
whole or appended, and the same records as TensorBoard event files (``RUN/tensorboard/``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Optional

from mkt_torchrec.config import Config, config_from_dict

log = logging.getLogger("mkt.train")


def write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def read_run(run_dir: str) -> Dict[str, Any]:
    """RUN/run.json (stage, config, data, ...).

    Raises:
        FileNotFoundError / ValueError: not a run directory, or a run.json that is not a JSON object (naming it).
    """
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: not a run directory (run.json is missing)")
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(run, dict) or "stage" not in run or "config" not in run:
        raise ValueError(f"{path}: not a run record (needs 'stage' and 'config')")
    return run


def run_config(run_dir: str) -> Config:
    """The config a run was trained with (from RUN/run.json)."""
    return config_from_dict(read_run(run_dir)["config"])


def log_record(run_dir: str, record: Dict[str, Any], scalars: Optional["Scalars"] = None) -> None:
    """Append one record to RUN/metrics.jsonl, and its numbers to ``scalars`` (TensorBoard) if given."""
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if scalars is not None:
        scalars.add(record)


class Scalars:
    """The metrics records as TensorBoard scalars in ``RUN/tensorboard/`` (``train.tensorboard``; see them with
    ``tensorboard --logdir OUT``): every number of a record at its ``step``, tagged by the record's kind:
    ``train/loss``, ``train/rows_per_s``, ... per log step, ``validation/gauc``, ``validation/auc``, ... per
    validated epoch, ``epoch/rows_trained`` per epoch. Rank 0 writes; TensorBoard's own writer does the files.

    Args:
        run_dir: the run directory.
        purge_step: a resumed run's checkpoint step: events of later steps, written before the run died, are
            dropped by TensorBoard (as the trainer drops them from metrics.jsonl).
    """

    def __init__(self, run_dir: str, purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run writes

        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge_step)

    def add(self, record: Dict[str, Any]) -> None:
        kind = "validation" if "validation" in record else "epoch" if "epoch_end" in record else "train"
        for key, value in record.items():
            if key in ("step", "time", "validation", "epoch_end", "epoch") or isinstance(value, bool):
                continue
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{kind}/{key}", value, int(record["step"]))

    def close(self) -> None:
        self.writer.close()


def truncate_log(run_dir: str, step: int, is_main: bool) -> None:
    """On resume, drop the metrics records of steps after the checkpoint (they are trained again)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not is_main or not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
