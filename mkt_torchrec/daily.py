"""Daily incremental training (``mkt daily``): MKT's two stages refreshed day by day, as production refreshes them.

KEEP (arXiv 2208.10174, 3.2 and 5.3) and the MKT paper (arXiv 2402.19101) deploy on feeds whose models are refreshed
daily from the newest logs, inheriting every parameter of the previous version; the pre-trained model and the
downstream model are refreshed on their own schedules. KEEP's protocol, followed here: each day's data is used once,
in ascending date order, shuffled within the day, and each day's model is tested on the next day.

The days are datasets, one per day, in order (``mkt synth --days N`` writes them with a ``days.json`` listing them;
``mkt build`` makes one per day from day-partitioned logs with ``source.split.train_from / test_from / test_until``):
each trains on its **train split** (that day's impressions) and the day's model is evaluated on its **test split**
(the next day's impressions). For seed ``k`` (seeds as in ``mkt run``) and day ``d``::

    OUT/daily.json                         the days, the cadence and the config (a rerun must match)
    OUT/seedK/day-DDD/mem                  stage 1 of day d (on the days the MEM is refreshed)
    OUT/seedK/day-DDD/tem                  stage 2 of day d, evaluated on the next day (its metrics.json)
    OUT/seedK/frozen/day-DDD               day 1's stage 2, never trained again, scored on day d's test split
    OUT/summary.json, OUT/daily.md         the per-day table (GAUC, AUC, log loss) of every seed and the mean
    OUT/daily.png                          the same as curves

**Continuing a day.** Day 1 trains both stages from scratch. Day ``d > 1``: the MEM, on the days it is refreshed
(``--mem-every K``: days 1, 1 + K, 1 + 2K, ...), starts from the last refreshed MEM's final checkpoint, model and
optimizer state (``StageRecipe``'s ``init_from``); stage 2 starts from day ``d - 1``'s stage 2 in the same way and
plugs in the newest MEM as its frozen MEM. When that is another MEM than the previous day's (a refresh day) the switch
is explicit: logged, recorded in the day's run.json (``mem_run``) and in the table's ``mem_day`` column. Each day is
one pass over its rows (``train.epochs = 1``, no early stopping, no validation split: ``train.patience = 0``,
``data.validation_fraction = 0``; set here whatever the config says), shuffled by the reader with the run's seed.

**Interrupted.** Every stage of every day is an ordinary run directory, so a rerun skips the stages that are done,
resumes an interrupted one from its checkpoint (bit-equal to an uninterrupted sequence: the trainer's resume) and
goes on with the first unfinished day. A rerun may add days after the recorded ones (tomorrow's run), never change
them, the cadence or the config: refused in one line.

**Schema.** Every day's dataset must have the config's schema (its manifest's schema digest): a day with another
schema is refused before anything trains.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from mkt_torchrec import registry, storage
from mkt_torchrec.config import Config
from mkt_torchrec.rundir import RunDir, read_json

log = logging.getLogger("mkt.daily")

RECORD, SUMMARY, TABLE, FIGURE = "daily.json", "summary.json", "daily.md", "daily.png"
DAYS_FILE = "days.json"  # a directory of day datasets lists them here (``mkt synth --days``)
ONE_PASS = {"train.epochs": 1, "train.patience": 0, "data.validation_fraction": 0.0}
METRICS = ("gauc", "auc", "logloss")


def expand_days(days: Sequence[str]) -> List[str]:
    """The day datasets, in order: each argument a dataset, or a directory whose ``days.json`` lists them."""
    out: List[str] = []
    for day in days:
        listing = storage.join(day, DAYS_FILE)
        if storage.is_file(listing):
            names = read_json(listing, "a list of day datasets", ("days",))["days"]
            if not isinstance(names, list) or not all(isinstance(n, str) and n and "/" not in n and n not in (".", "..")
                                                      for n in names):
                raise ValueError(f"{listing}: days must be a list of dataset directory names beside it")
            out += [storage.join(day, n) for n in names]
        else:
            out.append(day)
    if not out:
        raise ValueError("--days: no day datasets given")
    absolute = [storage.absolute(d) for d in out]
    if len(set(absolute)) != len(absolute):
        raise ValueError(f"--days: a dataset is listed twice ({sorted(d for d in absolute if absolute.count(d) > 1)[0]})")
    return absolute


def check_days(cfg: Config, days: Sequence[str]) -> None:
    """Every day is a dataset whose files fit the config's schema, written with the schema of day 1 (its manifest's
    schema digest: a day built with other features, tables or sequences), with train and test rows of the target
    entity: refused before training otherwise, naming the day."""
    from mkt_torchrec.data.dataset import open_dataset

    first: Optional[str] = None
    for i, day in enumerate(days, start=1):
        manifest = open_dataset(day, cfg.schema)  # files without the schema's columns: a one-line error naming it
        first = first or manifest.schema_digest
        if manifest.schema_digest != first:
            raise ValueError(f"{day} (day {i}): was written with another schema (digest {manifest.schema_digest}) "
                             f"than day 1 ({first}); every day of an incremental run must have the same schema")
        for split in ("train", "test"):
            if not manifest.rows.get(split, {}).get("target"):
                raise ValueError(f"{day} (day {i}): its {split} split has no target-entity rows; a day dataset "
                                 "trains on its train split and is tested on its test split (the next day)")


def mem_day(day: int, mem_every: int) -> int:
    """The day whose MEM stage 2 of ``day`` plugs in (days count from 1): the last refresh day up to ``day``."""
    return 1 + ((day - 1) // mem_every) * mem_every


def day_dir(out: str, seed: int, day: int, stage: str) -> str:
    return storage.join(out, f"seed{seed}", f"day-{day:03d}", stage)


def frozen_dir(out: str, seed: int, day: int) -> str:
    return storage.join(out, f"seed{seed}", "frozen", f"day-{day:03d}")


def day_config(cfg: Config, seed: int) -> Config:
    """The config of seed ``seed``'s days: MKT's, seeded as ``mkt run`` seeds it, one pass per day."""
    return registry.get("mkt").config(cfg, seed).with_settings(ONE_PASS)


def stale_dir(out: str, seed: int, day: int, lag: int) -> str:
    return storage.join(out, f"seed{seed}", f"stale-{lag}", f"day-{day:03d}")


def cache_version(day: int) -> str:
    return f"day-{day:03d}"


def _day_cache(cfg: Config, out: str, seed: int, day: int, mem_run: str, data: str) -> Config:
    """A cached stage 2 (``model.tem.knowledge: cache``): day ``day``'s knowledge version (``day-DDD``: the MEM it
    uses, on the day's rows) built and loaded into ``OUT/seedK/knowledge.db``; the day's config reading it."""
    from mkt_torchrec.cache.pipeline import ensure_cache

    day_cfg = cfg.with_settings({"cache.uri": os.path.join(os.path.abspath(out), f"seed{seed}", "knowledge.db"),
                                 "cache.version": cache_version(day)})
    ensure_cache(day_cfg, os.path.dirname(day_dir(out, seed, day, "tem")), mem_run, data)
    return day_cfg


def _train_days(cfg: Config, days: List[str], out: str, seeds: int, mem_every: int,
                lags: Sequence[int] = ()) -> Dict[str, Any]:
    """Per rank: every seed's days in order, each stage skipped when done and resumed when interrupted."""
    from mkt_torchrec.cache.knowledge import reads_cache
    from mkt_torchrec.training.distributed import init_distributed
    from mkt_torchrec.training.recipe import train
    from mkt_torchrec.training.scoring import evaluate

    info = init_distributed()
    seconds: Dict[str, Dict[str, float]] = {}
    for seed in range(seeds):
        seed_cfg = day_config(cfg, seed)
        for d, data in enumerate(days, start=1):
            run_cfg = seed_cfg
            start = time.perf_counter()
            m = mem_day(d, mem_every)
            if m == d:  # a refresh day: the MEM continues from the last refreshed one
                mem = RunDir(day_dir(out, seed, d, "mem"))
                if not mem.done():
                    previous = day_dir(out, seed, d - mem_every, "mem") if d > 1 else None
                    train(run_cfg, "mem", data, mem.location, resume=mem.has_checkpoint(), init_from=previous)
                    if info.is_main:
                        mem.mark_done()
            tem = RunDir(day_dir(out, seed, d, "tem"))
            pending = [lag for lag in lags if d > lag and not RunDir(stale_dir(out, seed, d, lag)).evaluated()]
            if reads_cache(seed_cfg, "tem") and (pending or not tem.done()):  # the day's knowledge version first
                run_cfg = _day_cache(seed_cfg, out, seed, d, day_dir(out, seed, m, "mem"), data)
            if not tem.done():
                if d > 1 and mem_day(d - 1, mem_every) != m and info.is_main:
                    log.info("seed %d day %d: stage 2 moves from the MEM of day %d to the MEM of day %d", seed, d,
                             mem_day(d - 1, mem_every), m)
                train(run_cfg, "tem", data, tem.location, resume=tem.has_checkpoint(),
                      mem_run=day_dir(out, seed, m, "mem"), init_from=day_dir(out, seed, d - 1, "tem") if d > 1 else None)
                evaluate(run_cfg, tem.location, data)
            if d > 1:  # day 1's model, frozen, on this day's test split
                frozen = RunDir(frozen_dir(out, seed, d))
                if not frozen.evaluated():
                    evaluate(run_cfg, day_dir(out, seed, 1, "tem"), data, into=frozen.location)
            for lag in pending:  # the day's stage 2 served with the version of ``lag`` days before (a stale cache)
                evaluate(run_cfg, tem.location, data, into=stale_dir(out, seed, d, lag),
                         cache_version=cache_version(d - lag))
            seconds.setdefault(f"seed{seed}", {})[f"day-{d:03d}"] = round(time.perf_counter() - start, 1)
    return seconds


def _check_record(cfg: Config, days: List[str], out: str, seeds: int, mem_every: int) -> Dict[str, Any]:
    """OUT/daily.json of an earlier run must be this run's, with at most days added at the end."""
    record = {"days": days, "mem_every": mem_every, "config": cfg.to_dict()}
    path = storage.join(out, RECORD)
    if not storage.is_file(path):
        return record
    old = read_json(path, "a mkt daily record", ("days", "mem_every", "config"))
    if old["mem_every"] != mem_every:
        raise ValueError(f"{storage.display(out)}: was trained with --mem-every {old['mem_every']}, not {mem_every}; "
                         "use another --out")
    if list(old["days"]) != days[:len(old["days"])]:
        changed = next((i for i, (a, b) in enumerate(zip(old["days"], days)) if a != b), min(len(days), len(old["days"])))
        raise ValueError(f"{storage.display(out)}: day {changed + 1} was {old['days'][changed] if changed < len(old['days']) else 'absent'}"
                         f", now {days[changed] if changed < len(days) else 'absent'}; a rerun may only add days after "
                         "the recorded ones: use another --out")
    from mkt_torchrec.pipeline import _differing

    differ = [k for k in _differing(old["config"], record["config"]) if not k.startswith("eval.")]
    if differ:
        raise ValueError(f"{storage.display(out)}: was trained with other settings for {differ[:6]}; use another --out")
    return record


def run_daily(cfg: Config, days: Sequence[str], out: str, nproc: int = 2, seeds: int = 1, mem_every: int = 1,
              overwrite: bool = False, stale_lags: Sequence[int] = ()) -> Dict[str, Any]:
    """Train MKT day by day over ``days`` (see the module docstring); returns the summary (also OUT/summary.json).

    Args:
        cfg: the job's config (MKT's model; each day's training settings are forced to one pass).
        days: day datasets in date order, or directories listing them (``days.json``).
        out: output directory (local).
        nproc: local ranks.
        seeds: seeds per day sequence (``train.seed + k``, ``data.seed + k``).
        mem_every: refresh the MEM every this many days (1: daily).
        overwrite: delete an earlier ``mkt daily`` output at ``out`` first.
        stale_lags: with ``model.tem.knowledge: cache``, also score each day's stage 2 with the cache version of
            each of these many days before (``OUT/seedK/stale-L/day-DDD``): what a stale cache costs.
    """
    from mkt_torchrec.cache.knowledge import reads_cache

    import shutil

    from mkt_torchrec.training.distributed import launch
    from mkt_torchrec.training.export import export_run

    if seeds < 1 or mem_every < 1:
        raise ValueError(f"--seeds and --mem-every must be at least 1, got {seeds} and {mem_every}")
    lags = sorted(set(int(x) for x in stale_lags))
    if lags and not reads_cache(cfg.with_settings({"model.name": "mkt"}), "tem"):
        raise ValueError("--stale-lags scores stage 2 with older cache versions: it needs "
                         "--set model.tem.knowledge=cache")
    if any(x < 1 for x in lags):
        raise ValueError(f"--stale-lags: expected days >= 1, got {lags}")
    if not storage.is_local(out):
        raise ValueError(f"--out {storage.display(out)}: mkt daily writes a local directory")
    days = expand_days(days)
    check_days(cfg, days)
    if overwrite and os.path.exists(out):
        from mkt_torchrec.fsutil import check_replaceable

        check_replaceable(out, (RECORD,), "the output of mkt daily")
        shutil.rmtree(out)
    record = _check_record(cfg, days, out, seeds, mem_every)
    os.makedirs(out, exist_ok=True)
    storage.write_bytes_atomic(storage.join(out, RECORD), json.dumps(record, indent=2).encode("utf-8"))
    started = time.perf_counter()
    seconds = launch(nproc, _train_days, cfg, days, out, seeds, mem_every, lags)
    for seed in range(seeds):  # the newest day's model is the one to serve
        newest = RunDir(day_dir(out, seed, len(days), "tem"))
        if not newest.exported():
            export_run(newest.location, days[-1])
    table = day_table(out, len(days), seeds, mem_every, lags)
    summary = {"out": out, "days": days, "seeds": seeds, "mem_every": mem_every, "table": table,
               "seconds_per_day": seconds, "seconds": round(time.perf_counter() - started, 1)}
    storage.write_bytes_atomic(storage.join(out, SUMMARY), json.dumps(summary, indent=2).encode("utf-8"))
    storage.write_bytes_atomic(storage.join(out, TABLE), render_table(table).encode("utf-8"))
    draw_curves(table, os.path.join(out, FIGURE))
    return summary


def _target(run_dir: str) -> Optional[Dict[str, Any]]:
    run = RunDir(run_dir)
    if not run.evaluated():
        return None
    m = run.metrics().get("target") or {}
    return {k: m.get(k) for k in METRICS}


def day_table(out: str, n_days: int, seeds: int, mem_every: int, lags: Sequence[int] = ()) -> List[Dict[str, Any]]:
    """One row per day: the incremental model's and the frozen day-1 model's target metrics on the next day, per
    seed and their mean, the day whose MEM stage 2 used, and (a cached stage 2) the incremental model's metrics
    with each stale version (``stale-L``)."""
    rows = []
    for d in range(1, n_days + 1):
        row: Dict[str, Any] = {"day": d, "mem_day": mem_day(d, mem_every),
                               "mem_switch": d > 1 and mem_day(d, mem_every) != mem_day(d - 1, mem_every)}
        places = [("incremental", lambda s: day_dir(out, s, d, "tem")),
                  ("frozen", lambda s: day_dir(out, s, 1, "tem") if d == 1 else frozen_dir(out, s, d))]
        places += [(f"stale-{lag}", lambda s, lag=lag: stale_dir(out, s, d, lag)) for lag in lags]
        for name, where in places:
            per_seed = [_target(where(s)) for s in range(seeds)]
            row[name] = {"by_seed": per_seed}
            if all(p is not None for p in per_seed):
                for k in METRICS:
                    values = [p[k] for p in per_seed if p[k] is not None]  # type: ignore[index]
                    row[name][k] = sum(values) / len(values) if len(values) == seeds else None
        rows.append(row)
    return rows


def render_table(table: List[Dict[str, Any]]) -> str:
    """The per-day table as markdown (means over seeds)."""
    def cell(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    stale = sorted(k for k in (table[0] if table else {}) if k.startswith("stale-"))
    lines = ["# mkt daily: each day's model on the next day (target entity, mean over seeds)", "",
             "| day | MEM of day | incremental GAUC | AUC | log loss | frozen after day 1 GAUC | AUC | log loss |"
             + "".join(f" GAUC with the version of {k[6:]} day(s) before |" for k in stale),
             "|---|---|---|---|---|---|---|---|" + "---|" * len(stale)]
    for row in table:
        inc, fro = row["incremental"], row["frozen"]
        lines.append(f"| {row['day']} | {row['mem_day']}{' (new)' if row['mem_switch'] else ''} | "
                     + " | ".join(cell(inc.get(k)) for k in METRICS) + " | "
                     + " | ".join(cell(fro.get(k)) for k in METRICS) + " |"
                     + "".join(f" {cell(row[k].get('gauc'))} |" for k in stale))
    return "\n".join(lines) + "\n"


def draw_curves(table: List[Dict[str, Any]], path: str) -> None:
    """GAUC, AUC and log loss by day, incremental and frozen (matplotlib's Agg canvas; written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    days = [r["day"] for r in table]
    for ax, metric in zip(axes, METRICS):
        for name, style in (("incremental", "o-"), ("frozen", "s--")):
            ax.plot(days, [r[name].get(metric) if r[name].get(metric) is not None else float("nan") for r in table],
                    style, label=name if name == "incremental" else "frozen after day 1")
        ax.set_xlabel("day (tested on the next day)")
        ax.set_title(metric)
    axes[0].legend()
    figure.tight_layout()
    partial = path + ".partial.png"
    figure.savefig(partial, dpi=100)
    os.replace(partial, path)
