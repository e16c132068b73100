"""One training stage as a recipe: setup, train, validate, save_checkpoint, cleanup.

:class:`StageRecipe` holds what a stage is (config, stage, data, run directory, the MEM run) once, and a typed
:class:`TrainingProgress` (step, epoch, early-stopping state, reader positions) that every checkpoint records
and a resume restores. The parts live beside it: ``assembly`` (the stage module on ``meta`` -> the fused
embedding optimizer -> a plan -> ``DistributedModelParallel`` -> a ``CombinedOptimizer``), ``feed`` (batches and
TorchRec's train pipeline), ``mem_transfer`` (stage 2's frozen MEM, ``init_from_mem``, a baseline's transfer),
``resume`` (a checkpoint into a live stage across plans), ``scoring`` (validation and ``evaluate``) and
:mod:`mkt_torchrec.rundir` (the run directory's files and lock).

Stage ``mem`` trains on mixed source + target rows. Stage ``tem`` trains on target rows only; its MEM is loaded
from the stage-1 run's final checkpoint by DCP (which reshards, so stage 2 may run at another world size or
plan) and frozen; the serving model is exported afterwards by ``mkt_torchrec.training.export.export_run`` (a
single process, once the process group is released: ``mkt train`` and ``mkt run`` call it).

Every rank steps until every rank has run out of rows: a rank that finished its share first steps on a filler
batch with zero loss weight (its collectives must still match the others'), so no row is dropped; the loss of
each step is the mean over the step's real rows of all ranks. Nothing in a step depends on time but the
checkpoint cadence by minutes, which rank 0 decides and every rank follows (a save is a collective).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from mkt_torchrec import faults
from mkt_torchrec import storage
from mkt_torchrec.collective import Collective
from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import open_dataset_shared
from mkt_torchrec.fsutil import make_dirs
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.models.base_rate import init_at_click_rate
from mkt_torchrec.planning.plan_file import write_plan
from mkt_torchrec.provenance import provenance
from mkt_torchrec.rundir import RunDir, Scalars
from mkt_torchrec.training import checkpoint, runlock
from mkt_torchrec.training.assembly import Assembled, assemble, configure_dense_math, state_of
from mkt_torchrec.cache.knowledge import attach, check_cache_version, reads_cache
from mkt_torchrec.models.build import dense_lr, stage2_holds_mem, stage2_uses_mem, stage_entity, stage_transfer
from mkt_torchrec.training.distributed import all_gather_objects, all_sum, init_distributed
from mkt_torchrec.training.feed import Feed, make_pipeline
from mkt_torchrec.training.mem_transfer import (MEM_RECORD, check_mem_run, check_pretraining_run, init_tem_from_mem,
                                                load_mem_into_stage2, mem_record, transfer_from_pretraining)
from mkt_torchrec.training.resume import load_train_state
from mkt_torchrec.training.scoring import Validation, progress_bar

log = logging.getLogger("mkt.train")


def train(cfg: Config, stage: str, data_dir: str, run_dir: str, resume: bool = False,
          mem_run: Optional[str] = None, init_from: Optional[str] = None) -> Dict[str, Any]:
    """Train one stage in the current process group (every rank calls it). Returns a summary (rank 0's is
    complete). The serving export of stage 2 is a separate step (:func:`mkt_torchrec.training.export.export_run`),
    run after the process group is released. ``init_from``: see :class:`StageRecipe`."""
    recipe = StageRecipe(cfg, stage, data_dir, run_dir, resume=resume, mem_run=mem_run, init_from=init_from)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()


@dataclass
class TrainingProgress:
    """Where a stage's training stands: what every checkpoint records (with the plan, the world size and the
    MEM used) and a resume restores."""

    step: int = 0
    epoch: int = 0  # of the last trained batch
    epoch_rows: int = 0  # all ranks' rows of the epoch so far
    best: Optional[Dict[str, Any]] = None  # early stopping: the best validation so far ({step, epoch, gauc, auc})
    since_best: int = 0  # epochs validated since the best
    lowest_logloss: Optional[float] = None  # the lowest validation log loss so far (``train.logloss_slack``)
    reader_state: Any = None  # this rank's reader position after the last trained step

    def record(self, readers: List[Any]) -> Dict[str, Any]:
        """The checkpoint's record of it (``readers``: every rank's reader position)."""
        return {"step": self.step, "epoch": self.epoch, "epoch_rows": self.epoch_rows, "readers": readers,
                "best": self.best, "since_best": self.since_best, "lowest_logloss": self.lowest_logloss}

    @classmethod
    def restored(cls, extra: Dict[str, Any]) -> "TrainingProgress":
        return cls(step=int(extra["step"]), epoch=int(extra["epoch"]), epoch_rows=int(extra.get("epoch_rows", 0)),
                   best=extra.get("best"), since_best=int(extra.get("since_best", 0)),
                   lowest_logloss=extra.get("lowest_logloss"))


class _Cadence:
    """When to checkpoint: every ``checkpoint_every`` steps and every ``checkpoint_every_minutes`` of wall time.

    Rank 0's clock decides, and the decision travels in the log step's all-reduce (so time is checked every
    ``train.log_every`` steps), so every rank saves at the same step (a save is a collective).
    """

    def __init__(self, tc: Any, is_main: bool) -> None:
        self.steps, self.seconds = tc.checkpoint_every, tc.checkpoint_every_minutes * 60.0
        self.is_main = is_main
        self.last = time.monotonic()

    def due_by_time(self) -> bool:
        return self.is_main and self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def due(self, step: int, time_flag: bool) -> bool:
        return bool(self.steps and step % self.steps == 0) or time_flag

    def saved(self) -> None:
        self.last = time.monotonic()


class _Window:
    """The losses (device tensors: loss, bce, pdl) and rows since the last log step; no host sync until read."""

    def __init__(self, device: torch.device) -> None:
        self.stats = torch.zeros(3, dtype=torch.float64, device=device)
        self.steps, self.rows, self.start = 0, 0, time.perf_counter()

    def add(self, out: Any, share: float, rows: int) -> None:
        self.stats += torch.stack([out.loss, out.bce, out.pdl * share]).double()
        self.steps += 1
        self.rows += rows

    def reset(self) -> None:
        self.stats.zero_()
        self.steps, self.rows, self.start = 0, 0, time.perf_counter()


class StageRecipe:
    """One stage of one run, on every rank: :meth:`setup`, then :meth:`train` (which calls :meth:`validate`
    after each epoch and :meth:`save_checkpoint` on the cadence), then :meth:`cleanup` (always).

    Args:
        cfg: the run's resolved config.
        stage: ``mem`` or ``tem``.
        data_dir: the dataset.
        run_dir: the run directory (created; locked while the recipe runs).
        resume: continue from the run directory's latest checkpoint.
        mem_run: stage ``tem``: the stage-1 run whose MEM is plugged in (or a baseline's pre-training run).
        init_from: a finished run of the same stage, model and schema (the previous day's, ``mkt daily``): a new
            run starts from its final checkpoint's model *and optimizer* state (incremental training: every
            parameter inherited) instead of its initialisation; a resumed run continues from its own checkpoint.
            Stage 2's frozen MEM is still ``mem_run``'s (it may be a newer MEM than the one ``init_from`` used).
    """

    def __init__(self, cfg: Config, stage: str, data_dir: str, run_dir: str, resume: bool = False,
                 mem_run: Optional[str] = None, init_from: Optional[str] = None) -> None:
        self.cfg, self.stage, self.data_dir = cfg, stage, data_dir
        self.run, self.resume, self.mem_run = RunDir(run_dir), resume, mem_run
        self.init_from = init_from
        self.inherited: Optional[Dict[str, Any]] = None  # ``init_from``'s checkpoint: path, step, digest
        self.cache_used: Optional[Dict[str, Any]] = None  # the cached stage 2's version: store, version, digests
        self.lock: Optional[str] = None
        self.scalars: Optional[Scalars] = None
        self.progress = TrainingProgress()
        self.mem_used: Optional[Dict[str, Any]] = None  # stage 2's frozen MEM: recorded by its checkpoints
        self.plan_record: Dict[str, Any] = {}  # every checkpoint records the plan it was saved under
        self.started_at: Dict[str, float] = {}  # entity -> the click rate its logit bias started at

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Check the inputs, assemble the stage, lock and record the run directory, load what the stage starts
        from (the MEM, a pre-trained model, or the run's own checkpoint) and open the readers."""
        cfg, stage = self.cfg, self.stage
        self.info = info = init_distributed()
        torch.set_num_threads(cfg.train.threads)
        configure_dense_math(cfg)
        if stage == "tem" and stage2_uses_mem(cfg) and not self.mem_run:
            raise ValueError("stage tem needs --mem-run MEM_RUN_DIR (or model.ablation=no_mem_pretrain)")
        if stage == "tem" and stage2_uses_mem(cfg):
            check_mem_run(cfg, self.mem_run)  # type: ignore[arg-type]
        if reads_cache(cfg, stage):  # the cache version must hold this MEM's knowledge, of this schema
            self.cache_used = check_cache_version(cfg, self.mem_run)  # type: ignore[arg-type]
        if stage_transfer(cfg, stage):
            check_pretraining_run(cfg, self.mem_run)
        if self.init_from is not None:
            self.inherited = _check_init_from(cfg, stage, self.init_from)
        self.run.check_one_node()
        self.manifest = open_dataset_shared(self.data_dir, cfg.schema)  # a bad --data fails before the run dir
        self.asm: Assembled = assemble(cfg, stage, info, manifest=self.manifest)  # so does a plan that cannot apply
        self._prepare_run_dir()
        if info.is_main:
            model = self.asm.model
            self.plan_record = write_plan(self.asm.plan, model.module if hasattr(model, "module") else model,
                                          self.run.file(RunDir.PLAN),
                                          {"stage": stage, "world_size": info.world_size, **self.asm.plan_meta})
            self.run.push(RunDir.PLAN)
        latest = checkpoint.latest_checkpoint(self.run.location) if self.resume else None
        self._load_starting_point(latest)
        self.entity = entity = stage_entity(cfg, stage)
        if entity and not self.manifest.split_rows("train", entity, validation_fraction=cfg.data.validation_fraction):
            raise ValueError(f"{self.data_dir}: the train split has no {entity}-entity rows: stage {stage} has "
                             "nothing to learn from")
        self.reader = attach(ParquetReader(self.data_dir, "train", cfg.schema, cfg.data, rank=info.rank,
                                           world_size=info.world_size, entity=entity, manifest=self.manifest),
                             cfg, stage)
        if latest is not None:
            self._restore(latest)
        self.progress.reader_state = self.reader.state_dict()
        if info.is_main and cfg.train.tensorboard:
            self.scalars = Scalars(self.run, purge_step=self.progress.step + 1 if latest is not None else None)
        self.saver = checkpoint.AsyncCheckpointer(self.run.location, info.is_main, cfg.train.keep_checkpoints)
        self.cadence = _Cadence(cfg.train, info.is_main)
        self.valid_entity = "source" if entity == "source" else "target"  # the target entity's GAUC is what counts
        self.validation = Validation(cfg, self.data_dir, self.run, info, self.manifest, self.valid_entity,
                                     stage) if cfg.train.patience > 0 else None

    def _prepare_run_dir(self) -> None:
        """Rank 0 locks, checks and records the run directory; every rank gets its verdict (a collective)."""
        run, cfg, stage = self.run, self.cfg, self.stage

        def prepare() -> str:
            if os.path.exists(run.path) and not os.path.isdir(run.path):
                raise ValueError(f"{run.path}: exists and is not a directory")
            if not run.remote:
                make_dirs(run.path)
            lock = run.lock(f"mkt train --stage {stage}")
            try:
                run.pull(RunDir.HISTORY, "tensorboard")  # a remote run's log, which a resume continues
                record()
            except BaseException:
                runlock.release(lock)
                raise
            return lock

        def record() -> None:
            has_ckpt = run.has_checkpoint()
            if has_ckpt and not self.resume:
                raise ValueError(f"{run.name}: holds checkpoints already; pass --resume to continue it, or use a "
                                 "new --run-dir")
            previous = run.record() if has_ckpt else None  # a start without a checkpoint records itself anew
            if previous is not None:
                if previous.get("stage") != stage:
                    raise ValueError(f"{run.name}: is a {previous.get('stage')!r} run, not {stage!r}")
                mine, theirs = cfg.to_dict(), previous.get("config", {})
                differ = sorted(k for k in ("schema", "model") if mine.get(k) != theirs.get(k))
                if differ:
                    raise ValueError(f"{run.name}: its checkpoints were trained with other {' and '.join(differ)} "
                                     "settings than this config; resume with the run's own config or use a new "
                                     "--run-dir")
            if not run.remote:
                make_dirs(run.checkpoints)
            made = provenance()
            if previous is not None and isinstance(previous.get("code"), dict):  # the code that made the run;
                made = {**made, "code": previous["code"], "resumed_with": made["code"]}  # a resume's, beside it
            run.write_record({**made,
                "stage": stage, "config": cfg.to_dict(), "data": storage.absolute(self.data_dir),
                "mem_run": storage.absolute(self.mem_run) if self.mem_run else None,
                **({"init_from": self.inherited} if self.inherited else {}),
                **({"cache": self.cache_used} if self.cache_used else {}),
                "world_size": self.info.world_size,
                "created": (previous or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            })

        lock = Collective(self.info.device).on_root(prepare)
        self.lock = lock if self.info.is_main else None

    def _load_starting_point(self, latest: Optional[str]) -> None:
        """Stage 2's frozen MEM (always; the one a resumed checkpoint records), and what a new stage starts from:
        ``model.tem.init_from_mem``, a baseline's pre-trained model (else they are in the checkpoint)."""
        cfg, stage, model = self.cfg, self.stage, self.asm.model
        if stage == "tem" and stage2_holds_mem(cfg):
            self.mem_used = load_mem_into_stage2(model, self.mem_run, latest)  # type: ignore[arg-type]
        if latest is None and self.inherited is not None:  # incremental: everything from the previous run
            ckpt = self.inherited["path"]
            load_train_state(self.asm, cfg, ckpt, checkpoint.read_extra(ckpt).get("plan") or {})
            if self.info.is_main:
                log.info("init_from: %s starts from %s (step %d)", self.run.name, ckpt, self.inherited["step"])
            return
        if latest is None and cfg.train.init_at_click_rate:  # (before what a transfer loads over it)
            self._init_at_click_rate()
        if stage == "tem" and stage2_uses_mem(cfg):
            if cfg.model.tem.init_from_mem and latest is None and cfg.model.name == "mkt":  # (a baseline: no TEM)
                mem_ckpt = self.mem_used["path"] if self.mem_used else self.cache_used["mem_checkpoint"]  # type: ignore
                loaded = init_tem_from_mem(model, mem_ckpt)
                if self.info.is_main:
                    log.info("model.tem.init_from_mem: the TEM starts from %d tensors of %s", len(loaded), mem_ckpt)
        if stage_transfer(cfg, stage) and latest is None:
            transfer_from_pretraining(model, self.mem_run, stage_transfer(cfg, stage))  # type: ignore[arg-type]

    def _init_at_click_rate(self) -> None:
        """``train.init_at_click_rate``: each entity's logit bias starts at the click rate of the train split's
        rows of the entities this stage trains on (every rank sets the same values)."""
        entity = stage_entity(self.cfg, self.stage)
        entities = [entity] if entity else ["source", "target"]
        clicks = self.manifest.clicks.get("train")
        if not clicks:
            if self.info.is_main:
                log.warning("%s records no click counts (written by an older release; mkt rewrite adds them): the "
                            "output layers keep their random initialisation", self.data_dir)
            return
        rows = {e: self.manifest.rows.get("train", {}).get(e, 0) for e in entities}
        applied = init_at_click_rate(self.asm.model, clicks, rows)
        self.started_at = {e: 1 / (1 + math.exp(-b)) for e, b in applied.items()}

    def _restore(self, latest: str) -> None:
        """The run's own checkpoint: model and optimizer state (across plans), progress, reader positions
        (re-split over this world if it has another size); the metrics log drops the steps trained again."""
        extra = checkpoint.read_extra(latest)
        load_train_state(self.asm, self.cfg, latest, extra.get("plan") or {})
        self.progress = TrainingProgress.restored(extra)
        self.reader.load_state_dict(extra["readers"])
        if self.info.is_main:
            self.run.truncate_history(self.progress.step)
            log.info("resumed %s from %s (step %d, epoch %d, saved by %d ranks, now %d)", self.run.name, latest,
                     self.progress.step, self.progress.epoch, int(extra.get("world_size", 0)), self.info.world_size)

    # ------------------------------------------------------------------------------------------------ train
    def train(self) -> Dict[str, Any]:
        """The training loop: epochs of steps through TorchRec's train pipeline until the epochs, ``max_steps``
        or early stopping end it; then the final checkpoint. Returns the stage's summary."""
        tc, info, p = self.cfg.train, self.info, self.progress
        epochs = tc.max_epochs if self.validation is not None else tc.epochs
        steps_left = max(0, tc.max_steps - p.step) if tc.max_steps else None
        fail_check = faults.die_after_step(self.stage)  # MKT_FAIL_AT_STEP (mkt_torchrec.faults)
        split_rows = self.reader.num_rows()  # of the stage's entity
        rows_per_step = self.reader.plan.batch_size * info.world_size
        est_steps = epochs * max(1, -(-split_rows // rows_per_step))
        bar = progress_bar(min(est_steps, tc.max_steps) if tc.max_steps else est_steps, f"train {self.stage}",
                           p.step, info.is_main)
        self.asm.model.train()
        self.pipeline = make_pipeline(self.asm.model, self.asm.optimizer, info.device)
        self.window = window = _Window(info.device)
        last_loss = float("nan")
        stopped = self.validation is not None and p.best is not None and p.since_best >= tc.patience  # resumed
        if info.is_main and self.started_at:  # (logged once setup has succeeded: its errors stay one line)
            log.info("output biases start at the click rate: %s",
                     ", ".join(f"{e} {p:.4f}" for e, p in sorted(self.started_at.items())))
        faults.fault_point("train", info.rank)
        while self.reader.epoch < epochs and not stopped and (steps_left is None or steps_left > 0):
            feed = Feed(self.reader, info, self.reader.epoch + 1, steps_left)  # one epoch: validation between
            trained = False
            while True:
                try:
                    out = self.pipeline.progress(feed)  # forward, backward and update of one step; no host sync
                except StopIteration:
                    break
                fed = feed.handed.popleft()  # the batch this step trained (the pipeline has pulled later ones)
                trained = True
                p.step += 1
                steps_left = None if steps_left is None else steps_left - 1
                p.epoch, p.reader_state = fed.epoch, fed.reader_state
                p.epoch_rows += fed.global_rows
                share = fed.rows * info.world_size / fed.global_rows  # this rank's share of the step's rows (x world)
                window.add(out, share, fed.global_rows)
                bar.update(1)
                time_due = False
                if p.step % tc.log_every == 0:
                    last_loss, time_due = self._log_step(bar)
                if fed.epoch_end:
                    self._end_epoch(split_rows)
                self.saver.poll()
                if self.cadence.due(p.step, time_due) and not (self.validation is not None and fed.epoch_end):
                    self.save_checkpoint()  # (an epoch's last step saves after its validation)
                fail_check(p.step, info.rank, info.world_size, self.saver.wait)
            if self.validation is None or not trained or self.reader.epoch == p.epoch:  # or stopped by max_steps
                continue
            stopped = self.validate()
            self.save_checkpoint()  # every validated epoch: a resumed run continues the early stopping from here
        bar.close()
        if window.steps:
            last_loss, _ = self._log_step(bar)
        self.save_checkpoint(final=True)
        dist.barrier()
        return {"run_dir": self.run.location, "stage": self.stage, "steps": p.step, "epochs": self.reader.epoch,
                "loss": last_loss, "world_size": info.world_size, "best": p.best}

    def _end_epoch(self, split_rows: int) -> None:
        p = self.progress
        if self.info.is_main:
            self.run.log({"epoch_end": p.epoch, "step": p.step, "rows_trained": p.epoch_rows,
                          "rows_in_split": split_rows}, self.scalars)
            log.info("epoch %d done: %d rows trained (of %d in the split%s)", p.epoch, p.epoch_rows, split_rows,
                     f", {self.entity} rows" if self.entity else "")
        p.epoch_rows = 0

    def _log_step(self, bar: Any) -> Tuple[float, bool]:
        """All-reduce the window's losses (device tensors) and rank 0's "checkpoint by time" flag; write one
        metrics record (rank 0). The only collective and host sync of a training step, every ``train.log_every``
        steps. Returns (loss, whether a time-based checkpoint is due)."""
        info, window, p = self.info, self.window, self.progress
        due = torch.full((1,), float(self.cadence.due_by_time()), dtype=torch.float64, device=info.device)
        totals = torch.cat([window.stats, due])
        dist.all_reduce(totals)
        values = totals.tolist()
        loss, bce, pdl = (float(v) / window.steps / info.world_size for v in values[:3])  # weights carry world_size
        _check_finite(loss, p.step - window.steps, p.step)
        seconds = max(time.perf_counter() - window.start, 1e-9)
        record = {"step": p.step, "epoch": p.epoch, "loss": loss, "bce": bce, "pdl": pdl,
                  "rows_per_s": window.rows / seconds, "dense_lr": dense_lr(self.cfg, self.stage),
                  "embedding_lr": self.cfg.train.embedding_lr, "time": time.time()}
        if info.is_main:
            self.run.log(record, self.scalars)
            bar.set_postfix(loss=f"{loss:.4f}", rows_s=f"{record['rows_per_s']:.0f}")
            log.info("step %d epoch %d loss %.4f rows/s %.0f", p.step, p.epoch, loss, record["rows_per_s"])
        runlock.refresh(self.lock)
        window.reset()
        return loss, values[3] > 0

    # ------------------------------------------------------------------------------------------------ validate
    def validate(self) -> bool:
        """Score the validation split after an epoch (collective) and update early stopping; returns whether
        training stops (``train.patience`` validated epochs in a row that were not the best by
        ``train.stop_on``)."""
        assert self.validation is not None
        p, model = self.progress, self.asm.model
        model.eval()
        metrics = self.validation.run(self.pipeline, p.epoch)
        model.train()
        _check_criterion(metrics, self.cfg.train.stop_on, self.valid_entity, self.validation.what, p.epoch)
        if math.isfinite(metrics["logloss"]):
            p.lowest_logloss = min(metrics["logloss"], p.lowest_logloss or math.inf)
        eligible = is_eligible(metrics, self.cfg.train.stop_on, p.lowest_logloss, self.cfg.train.logloss_slack)
        improved = eligible and is_better(metrics, p.best, self.cfg.train.stop_on)
        if improved:
            p.best = {"step": p.step, "epoch": p.epoch,
                      **{k: metrics[k] for k in ("gauc", "auc", "logloss", "base_logloss")}}
        p.since_best = 0 if improved else p.since_best + 1
        stopped = p.since_best >= self.cfg.train.patience
        best_epoch = p.best["epoch"] if p.best else None
        if self.info.is_main:
            self.run.log({"validation": p.epoch, "step": p.step, **metrics, "eligible": eligible,
                          "best_epoch": best_epoch, "early_stop": stopped}, self.scalars)
            log.info("epoch %d validation (%s rows): GAUC %.4f AUC %.4f log loss %.4f (base rate %.4f); best "
                     "epoch %s by %s%s%s", p.epoch, self.valid_entity, metrics["gauc"], metrics["auc"],
                     metrics["logloss"], metrics["base_logloss"], best_epoch, self.cfg.train.stop_on,
                     "" if eligible else " (this epoch ranks below chance or loses to the base rate: not eligible)",
                     " - stopping early" if stopped else "")
        return stopped

    # ------------------------------------------------------------------------------------------------ save
    def save_checkpoint(self, final: bool = False) -> None:
        """Save the stage's state and progress (collective: every rank calls it at the same step). ``final``:
        wait for pending saves and save only if the newest checkpoint is not of this step."""
        p, info = self.progress, self.info
        if final:
            self.saver.wait()
            latest = checkpoint.latest_checkpoint(self.run.location) if info.is_main else None
            latest = all_gather_objects(latest, info.world_size)[0]
            if latest is not None and latest.endswith(f"step-{p.step:08d}"):
                return
        if self.window.steps:  # never publish a checkpoint of a run that diverged since its last log step
            _check_finite(all_sum([float(self.window.stats.sum())], info.device)[0], p.step - self.window.steps,
                          p.step)
        runlock.refresh(self.lock)
        readers = all_gather_objects(p.reader_state, info.world_size)
        self.saver.save(p.step, state_of(self.asm, self.cfg),
                        {**p.record(readers), "world_size": info.world_size, "stage": self.stage,
                         "plan": self.plan_record, **({MEM_RECORD: self.mem_used} if self.mem_used else {})})
        self.cadence.saved()
        if final:
            self.saver.wait()
        self._push_logs()

    def _push_logs(self) -> None:
        """A remote run directory: rank 0 copies the metrics log, TensorBoard's files and the last validation's
        predictions to the store (with each checkpoint: a resume keeps the log up to its checkpoint)."""
        if self.info.is_main and self.run.remote:
            if self.scalars is not None:
                self.scalars.flush()
            self.run.push(*(n for n in (RunDir.HISTORY, "tensorboard", "validation")
                            if os.path.exists(self.run.file(n))))

    # ------------------------------------------------------------------------------------------------ cleanup
    def cleanup(self) -> None:
        """Close the TensorBoard writer and release the run directory (also after a failure)."""
        try:
            if self.scalars is not None:
                self.scalars.close()
            if self.lock is not None and self.run.remote:
                self._push_logs()
        finally:
            runlock.release(self.lock)


def _check_init_from(cfg: Config, stage: str, init_from: str) -> Dict[str, Any]:
    """``init_from``: a finished run of this stage, model and schema; returns its final checkpoint's record (path,
    step, digest). One-line errors naming the run."""
    prev = RunDir(init_from)
    record = prev.record()
    if record.get("stage") != stage:
        raise ValueError(f"{prev.name}: is a {record.get('stage')!r} run; init_from needs a {stage!r} run")
    theirs = prev.config()
    differ = [k for k in ("schema", "model") if getattr(theirs, k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"{prev.name}: was trained with other {' and '.join(differ)} settings; a run continues only "
                         "a run of the same model and schema")
    ckpt = checkpoint.final_checkpoint(init_from)
    if ckpt is None:
        raise FileNotFoundError(f"{prev.name}: no complete checkpoint to continue from")
    return {**mem_record(ckpt), "run": storage.absolute(init_from)}


def is_eligible(metrics: Dict[str, Any], stop_on: str, lowest_logloss: Optional[float] = None,
                slack: float = 0.01) -> bool:
    """Whether a validated epoch may be the best: any epoch by log loss; by GAUC, one that ranks better than
    chance (AUC >= 0.5), predicts better than the constant base rate (log loss <= the click rate's entropy) and
    whose log loss is at most ``1 + slack`` times the lowest of the epochs so far (``lowest_logloss``, this one
    included): GAUC may not be bought with calibration. A NaN criterion is never eligible."""
    if not math.isfinite(metrics[stop_on]):  # (recipe.validate stops a run before this: never a result)
        return False
    if stop_on == "logloss":
        return True
    guarded = lowest_logloss is None or metrics["logloss"] <= (1 + slack) * lowest_logloss
    return metrics["auc"] >= 0.5 and metrics["logloss"] <= metrics["base_logloss"] and guarded


def is_better(metrics: Dict[str, Any], best: Optional[Dict[str, Any]], stop_on: str) -> bool:
    """Whether an epoch beats the best so far (strictly: a tie keeps the earlier epoch)."""
    if best is None or best.get(stop_on) is None:  # (a checkpoint of an older release records only gauc / auc)
        return True
    return metrics[stop_on] < best[stop_on] if stop_on == "logloss" else metrics[stop_on] > best[stop_on]


def _check_criterion(metrics: Dict[str, Any], stop_on: str, entity: str, what: str, epoch: int) -> None:
    """A validation whose criterion is NaN measured nothing (GAUC: no validation user has both a click and a
    non-click; AUC: one class only): it must not pick or stop anything, so the run stops here, every rank alike
    (the metrics are all-reduced)."""
    if math.isfinite(metrics[stop_on]):
        return
    why = ("no user there has both a click and a non-click" if stop_on == "gauc" else "no row was scored")
    fix = "raise data.validation_fraction" if what.startswith("data.") else "give its valid files more users"
    raise ValueError(f"validation after epoch {epoch}: {stop_on} is NaN on the {entity} validation rows of {what} "
                     f"({metrics.get('rows', 0)} rows, {metrics.get('users', 0)} users, click rate "
                     f"{metrics.get('click_rate', float('nan')):.3g}): {why}; {fix}, or set train.patience=0 to "
                     "train train.epochs epochs without early stopping")


def _check_finite(loss: float, after: int, upto: int) -> None:
    """Stop a run whose loss became NaN / inf (every rank sees the same all-reduced value, so all stop)."""
    if not math.isfinite(loss):
        raise ValueError(f"the loss became {loss} between steps {after + 1} and {upto}; stopping before anything "
                         "is saved (lower train.embedding_lr / train.dense_lr, or check the data)")
