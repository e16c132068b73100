"""A run directory as an object: its paths, atomic reads and writes of its records, and its lock.

::

    RUN/run.json          the run's record: stage, the resolved config, data, MEM run, world size (written once per
                          start or resume by rank 0, read back through :meth:`RunDir.config`)
    RUN/plan.json         the sharding plan used
    RUN/metrics.jsonl     one JSON record per log step, epoch end and validation
    RUN/tensorboard/      the same records as TensorBoard scalars (``train.tensorboard``)
    RUN/checkpoints/      see ``mkt_torchrec.training.checkpoint``
    RUN/validation/       the last validation pass's predictions (early stopping)
    RUN/predictions/      the test split's predictions, and RUN/metrics.json: written by ``evaluate``
    RUN/serving/          a served model's export: model.pt2 + serving.json
    RUN/DONE              a pre-training stage that is finished and not evaluated (``mkt run``)
    RUN/.lock             the job using the directory (``mkt_torchrec.training.runlock``)

Every file is written under a temporary name and renamed into place, so no reader sees half of one; every read
of a record that is missing or broken is one error naming the file. Nothing heavy is imported here (``mkt run``
checks run directories before any process starts).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence

if TYPE_CHECKING:
    from mkt_torchrec.config import Config


LATEST = "latest"  # RUN/checkpoints/latest names the newest complete checkpoint (``training.checkpoint``)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file renamed into place)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path: str, what: str = "a JSON file", keys: Sequence[str] = ()) -> Dict[str, Any]:
    """A JSON object from ``path`` (a local file, or an object at a URI), or one error naming the file.

    Args:
        what: what the file should be, for the error ("a run record", ...).
        keys: keys the object must hold.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, not JSON, not an object, or without one of ``keys``.
    """
    from mkt_torchrec import storage

    try:
        if storage.is_uri(path):  # an object (a checkpoint's record on a store): its text, the same errors
            doc = json.loads(storage.read_bytes(path).decode("utf-8"))
            path = storage.display(path)
        else:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.display(path)}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{storage.display(path)}: unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in doc] if isinstance(doc, dict) else list(keys)
    if not isinstance(doc, dict) or missing:
        needs = f" (needs {', '.join(repr(k) for k in keys)})" if keys else ""
        raise ValueError(f"{path}: not {what}{needs}")
    return doc


class RunDir:
    """One run directory (it need not exist yet).

    Args:
        path: the directory.
    """

    RUN, PLAN, METRICS, HISTORY, DONE = "run.json", "plan.json", "metrics.json", "metrics.jsonl", "DONE"

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    # ---------------------------------------------------------------------------------------------- paths
    @property
    def checkpoints(self) -> str:
        return self.file("checkpoints")

    @property
    def predictions(self) -> str:
        return self.file("predictions")

    @property
    def validation(self) -> str:
        return self.file("validation")

    @property
    def serving(self) -> str:
        return self.file("serving")

    @property
    def tensorboard(self) -> str:
        return self.file("tensorboard")

    # ---------------------------------------------------------------------------------------------- states
    def exists(self) -> bool:
        """A run was started here (run.json exists)."""
        return os.path.isfile(self.file(self.RUN))

    def has_checkpoint(self) -> bool:
        """A checkpoint was published (``mkt run`` resumes the run)."""
        return os.path.exists(os.path.join(self.checkpoints, LATEST))

    def evaluated(self) -> bool:
        return os.path.isfile(self.file(self.METRICS))

    def done(self) -> bool:
        """Evaluated, or a finished pre-training stage (``mkt run`` skips it)."""
        return self.evaluated() or os.path.isfile(self.file(self.DONE))

    def mark_done(self) -> None:
        open(self.file(self.DONE), "w").close()

    def exported(self) -> bool:
        return os.path.isfile(os.path.join(self.serving, "serving.json"))

    # ---------------------------------------------------------------------------------------------- records
    def record(self) -> Dict[str, Any]:
        """RUN/run.json (stage, config, data, ...).

        Raises:
            FileNotFoundError: not a run directory (naming it).
            ValueError: a run.json that is not a run record (naming it).
        """
        if not self.exists():
            raise FileNotFoundError(f"{self.path}: not a run directory (run.json is missing)")
        return read_json(self.file(self.RUN), "a run record", ("stage", "config"))

    def write_record(self, record: Dict[str, Any]) -> None:
        write_json(self.file(self.RUN), record)

    def stage(self) -> str:
        return str(self.record()["stage"])

    def config(self) -> "Config":
        """The resolved config the run was trained with (run.json's, validated again: it may come from elsewhere)."""
        from mkt_torchrec.config import ConfigError, config_from_dict

        try:
            return config_from_dict(self.record()["config"])
        except ConfigError as e:
            raise ValueError(f"{self.file(self.RUN)}: config {e}") from None

    def metrics(self) -> Dict[str, Any]:
        """RUN/metrics.json (written by ``evaluate``)."""
        return read_json(self.file(self.METRICS), "an evaluation record")

    def write_metrics(self, metrics: Dict[str, Any]) -> None:
        write_json(self.file(self.METRICS), metrics)

    # ---------------------------------------------------------------------------------------------- history
    def history(self) -> List[Dict[str, Any]]:
        """RUN/metrics.jsonl's records ([] if none); a line that is not a JSON object is skipped (a run killed
        mid-write leaves at most its last line half-written)."""
        return list(self._history_lines())

    def _history_lines(self) -> Iterator[Dict[str, Any]]:
        path = self.file(self.HISTORY)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    yield record

    def log(self, record: Dict[str, Any], scalars: Optional[Any] = None) -> None:
        """Append one record to RUN/metrics.jsonl, and its numbers to ``scalars`` (TensorBoard) if given."""
        with open(self.file(self.HISTORY), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if scalars is not None:
            scalars.add(record)

    def truncate_history(self, step: int) -> None:
        """On resume, drop the records of steps after the checkpoint (they are trained again)."""
        path = self.file(self.HISTORY)
        if not os.path.isfile(path):
            return
        kept = []
        for record in self._history_lines():
            try:
                if int(record["step"]) <= step:
                    kept.append(json.dumps(record) + "\n")
            except (ValueError, KeyError, TypeError):
                continue
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)

    # ---------------------------------------------------------------------------------------------- lock
    def lock(self, what: str) -> str:
        """Take RUN/.lock for this job (rank 0; see ``mkt_torchrec.training.runlock``); returns its path."""
        from mkt_torchrec.training import runlock

        return runlock.acquire(self.path, what)


class Scalars:
    """The metrics records as TensorBoard scalars in ``RUN/tensorboard/`` (``train.tensorboard``; see them with
    ``tensorboard --logdir OUT``): every number of a record at its ``step``, tagged by the record's kind:
    ``train/loss``, ``train/rows_per_s``, ... per log step, ``validation/gauc``, ``validation/auc``,
    ``validation/hfa/ENTITY/FEATURE`` (HFA's mean score of a specific feature), ... per validated epoch,
    ``epoch/rows_trained`` per epoch. Rank 0 writes; TensorBoard's own writer does the files.

    Args:
        run: the run directory.
        purge_step: a resumed run's checkpoint step: events of later steps, written before the run died, are
            dropped by TensorBoard (as the trainer drops them from metrics.jsonl).
    """

    def __init__(self, run: RunDir, purge_step: Optional[int] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run writes

        self.writer = SummaryWriter(run.tensorboard, purge_step=purge_step)

    def add(self, record: Dict[str, Any]) -> None:
        kind = "validation" if "validation" in record else "epoch" if "epoch_end" in record else "train"
        step = int(record["step"])
        for tag, value in _numbers(record, kind):
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


_NOT_SCALARS = ("step", "time", "validation", "epoch_end", "epoch")


def _numbers(record: Dict[str, Any], prefix: str, top: bool = True) -> Iterator[tuple]:
    """(tag, number) of every number in a record, nested mappings joined by '/' (``hfa_scores`` -> ``hfa``)."""
    for key, value in record.items():
        if top and key in _NOT_SCALARS or isinstance(value, bool):
            continue
        name = "hfa" if top and key == "hfa_scores" else str(key)
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}/{name}", top=False)
        elif isinstance(value, (int, float)):
            yield f"{prefix}/{name}", value
