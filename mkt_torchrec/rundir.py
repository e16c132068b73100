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

**A run directory on object storage** (``s3://bucket/runs/mkt``; :attr:`RunDir.location`) is read from the store:
its states and records. A job works in a local copy (:attr:`RunDir.path`, under ``MKT_RUN_CACHE`` or
``~/.cache/mkt/runs``): checkpoints go to the store directly (``training.checkpoint``, DCP through fsspec); the
records (run.json, plan.json, metrics.json, DONE) are written to both at once; the metrics log and TensorBoard's
files reach the store with every checkpoint and at the job's end (:meth:`RunDir.push`: what a resumed run keeps
of them is the part up to its checkpoint anyway); predictions and serving exports when they are complete, their
marker (metrics.json, serving.json) last. The lock is an object created by a conditional write
(``training.runlock``). The ranks of a job share the local copy, so such a run directory serves one node's ranks;
on several nodes the run directory is a shared filesystem path (the evaluation exchanges files between ranks).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence

from mkt_torchrec.fsutil import make_dirs

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


CACHE_ENV = "MKT_RUN_CACHE"  # where the local copies of run directories on object storage live
_SKIPPED = ("checkpoints", ".lock")  # on the store itself: never copied


def _is_uri(location: str) -> bool:
    from mkt_torchrec import storage

    return storage.is_uri(location) and not storage.is_local(location)


def working_copy(location: str) -> str:
    """The local directory a job on this machine uses for the run directory at URI ``location``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mkt", "runs")
    digest = hashlib.sha256(location.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return os.path.join(root, f"{location.rstrip('/').rsplit('/', 1)[-1]}-{digest}")


def _records(lines: Iterable[str]) -> Iterator[Dict[str, Any]]:
    """The JSON objects among ``lines`` (a line that is not one is skipped)."""
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


class RunDir:
    """One run directory (it need not exist yet): a local path, or a URI on object storage.

    Args:
        path: the directory (a path or a URI).

    Attributes:
        location: where the run directory is (a URI as given; a local path as given).
        path: the local directory the job reads and writes: ``location`` itself, or its working copy for a URI.
        remote: ``location`` is on object storage.
    """

    RUN, PLAN, METRICS, HISTORY, DONE = "run.json", "plan.json", "metrics.json", "metrics.jsonl", "DONE"

    def __init__(self, path: str) -> None:
        self.location = os.fspath(path)
        self.remote = _is_uri(self.location)
        self.path = working_copy(self.location) if self.remote else self.location
        self._pushed: Dict[str, tuple] = {}  # local file -> (size, mtime_ns) when this object last uploaded it

    def __repr__(self) -> str:
        return f"RunDir({self.location!r})"

    @property
    def name(self) -> str:
        """How errors and logs name the run directory (a URI's secrets masked)."""
        from mkt_torchrec import storage

        return storage.display(self.location)

    def file(self, *parts: str) -> str:
        """A file of the local directory the job works in."""
        return os.path.join(self.path, *parts)

    def stored(self, *parts: str) -> str:
        """A file at the run directory's location (the store's object for a remote run directory)."""
        from mkt_torchrec import storage

        return storage.join(self.location, *parts)

    def _is_file(self, *parts: str) -> bool:
        from mkt_torchrec import storage

        return storage.is_file(self.stored(*parts)) if self.remote else os.path.isfile(self.file(*parts))

    # ---------------------------------------------------------------------------------------------- paths
    @property
    def checkpoints(self) -> str:
        """Checkpoints are always at the location (on the store for a remote run directory)."""
        return self.stored("checkpoints")

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
        return self._is_file(self.RUN)

    def has_checkpoint(self) -> bool:
        """A checkpoint was published (``mkt run`` resumes the run)."""
        from mkt_torchrec import storage

        return storage.exists(storage.join(self.checkpoints, LATEST)) if self.remote else \
            os.path.exists(os.path.join(self.checkpoints, LATEST))

    def evaluated(self) -> bool:
        return self._is_file(self.METRICS)

    def done(self) -> bool:
        """Evaluated, or a finished pre-training stage (``mkt run`` skips it)."""
        return self.evaluated() or self._is_file(self.DONE)

    def mark_done(self) -> None:
        self._write(self.DONE, b"")

    def exported(self) -> bool:
        return self._is_file("serving", "serving.json")

    # ---------------------------------------------------------------------------------------------- copies
    def _write(self, name: str, data: bytes) -> None:
        """A record: written locally and, for a remote run directory, to the store at once (readers see it)."""
        from mkt_torchrec import storage

        storage.write_bytes_atomic(self.file(name), data)
        if self.remote:
            storage.write_bytes_atomic(self.stored(name), data)

    def pull(self, *names: str) -> None:
        """Make the local copy's ``names`` (files or directories) equal to the store's (a remote run directory;
        a no-op for a local one): what a resumed job or a report reads. Checkpoints stay on the store."""
        from mkt_torchrec import storage

        if not self.remote:
            return
        make_dirs(self.path)
        for name in names:
            local, stored = self.file(name), self.stored(name)
            if storage.is_file(stored):
                storage.download(stored, local)
                continue
            if os.path.isdir(local):
                shutil.rmtree(local)
            elif os.path.isfile(local):
                os.remove(local)
            for rel in storage.listdir(stored, recursive=True):
                storage.download(storage.join(stored, rel), os.path.join(local, rel))

    def push(self, *names: str, last: Sequence[str] = ()) -> None:
        """Make the store's ``names`` (files or directories) equal to the local copy's, then write ``last`` (the
        markers readers go by: metrics.json, serving/serving.json), whose old versions are removed first. A no-op
        for a local run directory. Rank 0 calls it while holding the lock."""
        from mkt_torchrec import storage

        if not self.remote:
            return
        for name in last:
            storage.remove_files(self.location, [name])
        for name in names:
            assert name.split("/")[0] not in _SKIPPED, name
            local, stored = self.file(name), self.stored(name)
            if os.path.isfile(local):
                self._upload_changed(local, stored)
                continue
            mine = set()
            for root, _, files in os.walk(local):
                for f in files:
                    if ".tmp" in f:
                        continue  # a file being written (TensorBoard's, a record's temporary name)
                    rel = os.path.relpath(os.path.join(root, f), local).replace(os.sep, "/")
                    mine.add(rel)
                    if name + "/" + rel not in last:
                        self._upload_changed(os.path.join(root, f), storage.join(stored, rel))
            stale = [r for r in storage.listdir(stored, recursive=True) if r not in mine]
            storage.remove_files(stored, stale)  # e.g. the predictions of an earlier pass at another world size
        for name in last:
            storage.upload(self.file(name), self.stored(name))

    def _upload_changed(self, local: str, stored: str) -> None:
        """Upload ``local`` unless this object uploaded it unchanged before (a checkpoint's push sends only what
        changed since the last one: TensorBoard's finished event files, a validation pass not rerun)."""
        from mkt_torchrec import storage

        st = os.stat(local)
        if self._pushed.get(local) == (st.st_size, st.st_mtime_ns):
            return
        storage.upload(local, stored)
        self._pushed[local] = (st.st_size, st.st_mtime_ns)

    # ---------------------------------------------------------------------------------------------- records
    def record(self) -> Dict[str, Any]:
        """RUN/run.json (stage, config, data, ...).

        Raises:
            FileNotFoundError: not a run directory (naming it).
            ValueError: a run.json that is not a run record (naming it).
        """
        if not self.exists():
            raise FileNotFoundError(f"{self.name}: not a run directory (run.json is missing)")
        return read_json(self.stored(self.RUN), "a run record", ("stage", "config"))

    def write_record(self, record: Dict[str, Any]) -> None:
        self._write(self.RUN, json.dumps(record, indent=2).encode("utf-8"))

    def stage(self) -> str:
        return str(self.record()["stage"])

    def config(self) -> "Config":
        """The resolved config the run was trained with (run.json's, validated again: it may come from elsewhere)."""
        from mkt_torchrec.config import ConfigError, config_from_dict

        try:
            return config_from_dict(self.record()["config"])
        except ConfigError as e:
            raise ValueError(f"{self.stored(self.RUN)}: config {e}") from None

    def metrics(self) -> Dict[str, Any]:
        """RUN/metrics.json (written by ``evaluate``)."""
        return read_json(self.stored(self.METRICS), "an evaluation record")

    def write_metrics(self, metrics: Dict[str, Any]) -> None:
        """RUN/metrics.json; for a remote run directory the predictions go to the store first (it marks them
        complete)."""
        if self.remote:
            from mkt_torchrec import storage

            storage.write_bytes_atomic(self.file(self.METRICS), json.dumps(metrics, indent=2).encode("utf-8"))
            self.push("predictions", last=(self.METRICS,))
            return
        write_json(self.file(self.METRICS), metrics)

    # ---------------------------------------------------------------------------------------------- history
    def history(self) -> List[Dict[str, Any]]:
        """RUN/metrics.jsonl's records ([] if none; a remote run directory's as last pushed); a line that is not a
        JSON object is skipped (a run killed mid-write leaves at most its last line half-written)."""
        if self.remote:
            from mkt_torchrec import storage

            try:
                text = storage.read_bytes(self.stored(self.HISTORY)).decode("utf-8", errors="replace")
            except FileNotFoundError:
                return []
            return list(_records(text.splitlines()))
        return list(self._history_lines())

    def _history_lines(self) -> Iterator[Dict[str, Any]]:
        path = self.file(self.HISTORY)
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as f:
            yield from _records(f)

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
        """Take RUN/.lock for this job (rank 0; see ``mkt_torchrec.training.runlock``; on the store for a remote
        run directory, whose local copy is then made); returns its location."""
        from mkt_torchrec.training import runlock

        lock = runlock.acquire(self.location, what)
        if self.remote:
            make_dirs(self.path)
        return lock

    def check_one_node(self) -> None:
        """A remote run directory's ranks share its local copy: refuse a job spread over several nodes.

        Raises:
            ValueError: ``WORLD_SIZE`` exceeds ``LOCAL_WORLD_SIZE`` (torchrun's variables).
        """
        world, local = (int(os.environ.get(v, "1") or 1) for v in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
        if self.remote and world > local:
            raise ValueError(f"{self.name}: a run directory on object storage serves the ranks of one node ({world} "
                             f"ranks on {-(-world // local)} nodes here: they exchange evaluation files through a "
                             "local copy); on several nodes use a shared filesystem path for the run directory")


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

    def flush(self) -> None:
        self.writer.flush()

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
