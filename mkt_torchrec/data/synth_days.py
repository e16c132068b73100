"""Day-by-day synthetic datasets whose users' tastes drift, for daily incremental training (``mkt synth --days``).

KEEP (Zhang et al., 2022, section 5.3) trains incrementally: each day's data is used once, in date order, and each
day's model is tested on the next day. :func:`write_days` writes the data for that protocol from the synthetic
generator (:mod:`mkt_torchrec.data.synth`): ``days + 1`` days of impressions, and one dataset per day whose test
split is the next day.

**Layout**::

    out_dir/days.json      {"days": ["day-001", ...], "upto": [...], "drift": X, "synth": {...},
                            "rows_per_day": [...], "written_by": "mkt_torchrec.data.synth_days"}
    out_dir/day-001/       a dataset (manifest.json, train/, test/): train = day 1, test = day 2
    ...
    out_dir/day-NNN/       train = day N, test = day N+1
    out_dir/upto-001/      with cumulative=True: train = days 1..1, test = day 2
    ...
    out_dir/upto-NNN/      train = days 1..N (in day order), test = day N+1

``days.json`` lists the day datasets in date order (what the incremental trainer reads) and is the marker by which
``overwrite`` recognises an output of this function. Each ``day-k`` / ``upto-k`` is an ordinary dataset
(:func:`~mkt_torchrec.data.dataset.open_dataset`, :class:`~mkt_torchrec.data.reader.ParquetReader`, ``mkt
inspect``); its manifest's ``source`` says ``kind: synth_days``, the train days and the test day. Day k+1's rows
are written identically wherever they appear: the test split of ``day-k`` and of ``upto-k`` holds exactly the
train rows of ``day-(k+1)``, same values, same order (per entity, which is what readers keep). ``upto-k``'s
train split is day 1's rows, then day 2's, ..., then day k's, so its validation split (``data
.validation_fraction``, the last rows of each entity's train rows) holds the newest day's rows. The
``upto-k`` datasets repeat every earlier day, so they take about N/2 times the disk of the ``day-k`` ones.

**Drift model.** Users are the same people every day: the same ids and the same draw of age, gender, price and
style preferences, bias and activity as :func:`~mkt_torchrec.data.synth.generate` gives them (the same user
chunks and chunk seeds), over the same catalogue (:class:`~mkt_torchrec.data.synth._World`). Only the latent
interest vector moves: on day d (d = 0 for day 1) user u's vector is rotated by ``drift * d`` radians in the plane
of z_u and a per-user random unit direction e_u orthogonal to it,

    z_u(d) = cos(drift * d) z_u + sin(drift * d) |z_u| e_u,

so |z_u(d)| = |z_u| (a user's taste does not get stronger or weaker), day 1 is the generator's z_u, and the angle
between a user's tastes on days a and b is ``drift * |a - b|`` (until it reaches pi): a steady, known drift,
rather than a random walk whose distance grows only as sqrt(days). On day d everything that depends on z_u uses
z_u(d): the click probabilities (so ``true_prob`` is each row's true probability on its day and its GAUC is still
the ceiling), the items shown by affinity, and the behaviour sequences. ``drift = 0`` gives every day the same
distribution (days still differ by their random draws). ``synth.latent_dim`` must be >= 2 for a drift > 0.

**Choices the brief and the paper leave open.**

* Size: ``synth.source_rows`` (and ``target_ratio``) are the totals over all ``days + 1`` days; each user's
  expected impressions per day are ``1 / (days + 1)`` of the generator's, so the quickstart config keeps its size.
* A day's behaviour sequences are drawn afresh from z_u(d) (the user's behaviour before that day, reflecting the
  current taste; lengths from the user's activity as in the generator). They do not accumulate the logged
  clicks of earlier days, so, as in the generator, they never leak a label.
* Time order within a day is the generator's, with no test fraction (``synth.test_fraction`` is unused: the test
  split is the next day): each chunk's rows in random order, then every user's most recent quarter of the day's
  rows (``RECENT_TRAIN_FRACTION``) after all earlier ones, so a day's validation split holds the same users' latest
  rows of that day.
* Seeds: the drift directions come from ``default_rng([synth.seed, 9, chunk])`` and day d's rows from
  ``default_rng([synth.seed, 10, d, chunk])``, streams apart from the generator's ``[seed, 1]`` and
  ``[seed, 2, chunk]`` (user draws, shared on purpose), tenrec's 7 and logs' 8. The same config, days and drift
  give the same bytes.

**Atomic output.** Everything is written into a staging directory beside ``out_dir`` (``.synth-days-*``, which
also holds the intermediate day files) and renamed to ``out_dir`` when complete
(:func:`~mkt_torchrec.fsutil.replace_dir`); an interrupted run leaves nothing at ``out_dir`` and no staging
directory. Memory is bounded as in ``generate``: one chunk of users of one day at a time, and the datasets are
assembled by streaming the day files one row group at a time.

Example:
    >>> summary = write_days(load_config("configs/quickstart.yaml"), "data/days", days=7, drift=0.05)  # doctest: +SKIP
    >>> json.load(open("data/days/days.json"))["days"][:2]                                             # doctest: +SKIP
    ['day-001', 'day-002']
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mkt_torchrec import storage
from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import DatasetWriter, Manifest
from mkt_torchrec.data.schema import arrow_schema
from mkt_torchrec.data.synth import EARLY, RECENT, _check_schema, _user_chunks, _user_rows, _Users, _World
from mkt_torchrec.fsutil import claim_output, replace_dir

DAYS_FILE = "days.json"  # the day list the incremental trainer reads, and the marker of this function's output
OPTIONAL = ("true_prob", "activity")  # the generator's optional columns
_DIRECTION_STREAM, _DAY_STREAM = 9, 10  # default_rng([seed, 9, chunk]) and default_rng([seed, 10, day, chunk])


def day_name(k: int) -> str:
    """The dataset of day ``k`` (1-based): ``day-001``."""
    return f"day-{k:03d}"


def upto_name(k: int) -> str:
    """The cumulative dataset of days 1..``k``: ``upto-001``."""
    return f"upto-{k:03d}"


def write_days(cfg: Config, out_dir: str, days: int, drift: float, cumulative: bool = False, overwrite: bool = False,
               progress: Optional[Callable[[int], None]] = None) -> dict:
    """Write ``days`` day datasets of the synthetic data of ``cfg`` with drifting user tastes (see the module
    docstring) under ``out_dir``, atomically.

    Args:
        cfg: the config; its ``synth`` section sizes all ``days + 1`` days together, ``cfg.schema`` must be the
            generator's (``configs/quickstart.yaml``'s).
        out_dir: a local directory to create.
        days: day datasets to write (``days + 1`` days are generated: the last is only day ``days``' test split).
        drift: radians per day by which every user's interest vector turns.
        cumulative: also write ``upto-k`` (train = days 1..k, test = day k+1) for every k.
        overwrite: replace ``out_dir`` if it is an output of this function (never another directory).
        progress: called with the number of rows generated after each chunk of users of each day.

    Returns:
        A summary: ``out_dir``, ``days`` and ``upto`` (dataset names in day order), ``drift`` and
        ``rows_per_day`` (rows of each of the ``days + 1`` generated days).

    Raises:
        ValueError: ``days`` < 1, a drift that is not a finite number >= 0, a drift > 0 with ``synth.latent_dim``
            1, fewer ``synth.source_rows`` than days, a URI, or a schema the generator cannot fill.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false, or it is not an output of this function.
    """
    _check_args(cfg, out_dir, days, drift)
    _check_schema(cfg)
    out_dir = claim_output(out_dir, overwrite, (DAYS_FILE,), "an output of mkt synth --days")
    _check_ours(out_dir)
    with tempfile.TemporaryDirectory(prefix=".synth-days-", dir=os.path.dirname(out_dir)) as tmp:
        day_dir, staging = os.path.join(tmp, "days"), os.path.join(tmp, "out")
        os.makedirs(day_dir)
        os.makedirs(staging)
        rows_per_day = _generate_days(cfg, day_dir, days + 1, drift, progress)
        names, upto = [], []
        for k in range(1, days + 1):
            names.append(day_name(k))
            _write_dataset(cfg, day_dir, os.path.join(staging, names[-1]), [k], k + 1, drift)
            if cumulative:
                upto.append(upto_name(k))
                _write_dataset(cfg, day_dir, os.path.join(staging, upto[-1]), list(range(1, k + 1)), k + 1, drift)
        with open(os.path.join(staging, DAYS_FILE), "w", encoding="utf-8") as f:
            json.dump({"days": names, "upto": upto, "drift": drift, "rows_per_day": rows_per_day,
                       "synth": asdict(cfg.synth), "written_by": __name__}, f, indent=1, sort_keys=True)
        replace_dir(staging, out_dir)
    return {"out_dir": out_dir, "days": names, "upto": upto, "drift": drift, "rows_per_day": rows_per_day}


def _check_args(cfg: Config, out_dir: str, days: int, drift: float) -> None:
    if storage.is_uri(out_dir):
        raise ValueError(f"{out_dir}: mkt synth --days writes a local directory (write it locally, then copy it)")
    if not isinstance(days, int) or days < 1:
        raise ValueError(f"days: expected an int >= 1, got {days!r}")
    if not isinstance(drift, (int, float)) or not math.isfinite(drift) or drift < 0:
        raise ValueError(f"drift: expected a finite number of radians per day >= 0, got {drift!r}")
    if drift > 0 and cfg.synth.latent_dim < 2:
        raise ValueError(f"synth.latent_dim: a drift > 0 turns interest vectors in a plane, which needs "
                         f"latent_dim >= 2, got {cfg.synth.latent_dim}")
    if cfg.synth.source_rows < days + 1:
        raise ValueError(f"synth.source_rows: {cfg.synth.source_rows} rows cannot be spread over {days + 1} days "
                         "(it is the total over all days)")


def _check_ours(out_dir: str) -> None:
    """A ``days.json`` at ``out_dir`` (about to be replaced) must be this function's."""
    path = os.path.join(out_dir, DAYS_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            ours = json.load(f).get("written_by") == __name__
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise FileExistsError(f"{path}: not written by mkt synth --days (no written_by {__name__!r}); refusing to "
                              f"replace {out_dir}: choose another path or remove it yourself")


def drifted(z: np.ndarray, direction: np.ndarray, angle: float) -> np.ndarray:
    """Interest vectors ``z`` (U, k) turned by ``angle`` radians towards the unit vectors ``direction`` (U, k),
    each orthogonal to its row of ``z``: ``cos(angle) z + sin(angle) |z| direction`` (norms unchanged)."""
    if angle == 0:
        return z
    norm = np.linalg.norm(z, axis=1, keepdims=True)  # (U, 1)
    return math.cos(angle) * z + math.sin(angle) * norm * direction  # (U, k)


def drift_directions(rng: np.random.Generator, z: np.ndarray) -> np.ndarray:
    """A random unit vector orthogonal to each row of ``z`` (U, k), k >= 2: a Gaussian draw minus its projection
    on z_u, normalised (uniform on the unit sphere of z_u's orthogonal complement)."""
    g = rng.normal(size=z.shape)  # (U, k)
    z_hat = z / np.linalg.norm(z, axis=1, keepdims=True)  # (U, k)
    e = g - np.einsum("uk,uk->u", g, z_hat)[:, None] * z_hat  # (U, k)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _day_files(day_dir: str, day: int) -> tuple[str, str]:
    """The day's early rows and its users' most recent rows (read in this order)."""
    return (os.path.join(day_dir, f"{day:03d}-early.parquet"), os.path.join(day_dir, f"{day:03d}-recent.parquet"))


def _generate_days(cfg: Config, day_dir: str, n_days: int, drift: float,
                   progress: Optional[Callable[[int], None]]) -> list[int]:
    """Generate days 1..``n_days`` into ``day_dir`` (two Parquet files a day); returns the rows of each day."""
    sc = cfg.synth
    world = _World(cfg)
    schema = arrow_schema(cfg.schema, OPTIONAL)
    chunks = _user_chunks(cfg)
    rows = []
    for day in range(1, n_days + 1):
        writers: dict[int, pq.ParquetWriter] = {}
        n = 0
        try:
            for chunk, lo, hi in chunks:
                people = _Users.draw(np.random.default_rng([sc.seed, 2, chunk]), hi - lo, world.k)
                if drift > 0:
                    direction = drift_directions(np.random.default_rng([sc.seed, _DIRECTION_STREAM, chunk]), people.z)
                    people.z = drifted(people.z, direction, drift * (day - 1))
                rng = np.random.default_rng([sc.seed, _DAY_STREAM, day, chunk])
                table, phase = _user_rows(world, cfg, rng, people, lo, share=1.0 / n_days, test_fraction=0.0)
                if table.num_rows == 0:
                    continue
                table = table.select(schema.names).cast(schema)
                for i, which in enumerate((EARLY, RECENT)):
                    part = table.filter(pa.array(phase == which))
                    if part.num_rows:
                        if which not in writers:
                            writers[which] = pq.ParquetWriter(_day_files(day_dir, day)[i], schema)
                        writers[which].write_table(part, row_group_size=sc.row_group_rows)
                n += table.num_rows
                if progress is not None:
                    progress(table.num_rows)
        finally:
            for w in writers.values():
                w.close()
        rows.append(n)
    return rows


def _day_parts(day_dir: str, day: int) -> Iterator[pa.Table]:
    """Day ``day``'s rows, one row group at a time, in the order every dataset holds them."""
    for path in _day_files(day_dir, day):
        if os.path.exists(path):
            f = pq.ParquetFile(path)
            for i in range(f.num_row_groups):
                yield f.read_row_group(i)


def _write_dataset(cfg: Config, day_dir: str, path: str, train_days: list[int], test_day: int,
                   drift: float) -> Manifest:
    """The dataset at ``path``: the rows of ``train_days`` (in order) as its train split, ``test_day``'s as test."""
    sc = cfg.synth
    with DatasetWriter(path, cfg.schema, optional=OPTIONAL, rows_per_file=sc.rows_per_file,
                       row_group_rows=sc.row_group_rows, schema_digest=cfg.schema_digest()) as writer:
        for day in train_days:
            for part in _day_parts(day_dir, day):
                writer.write("train", part)
        for part in _day_parts(day_dir, test_day):
            writer.write("test", part)
        writer.set_source({"kind": "synth_days", "synth": asdict(sc), "drift": drift, "train_days": train_days,
                           "test_day": test_day})
        return writer.close()
