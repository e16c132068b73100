"""The distributed two-stage trainer: a run directory, the training loop, checkpoints and early stopping.

The parts live beside it: ``assembly`` (the stage module on ``meta`` -> the fused embedding optimizer -> a plan
-> ``DistributedModelParallel`` -> a ``CombinedOptimizer``), ``feed`` (batches and TorchRec's train pipeline),
``mem_transfer`` (stage 2's frozen MEM, ``init_from_mem``, a baseline's transfer), ``resume`` (a checkpoint into
a live stage across plans), ``rundir`` (run.json, metrics.jsonl) and ``scoring`` (validation and ``evaluate``).

Stage ``mem`` trains on mixed source + target rows. Stage ``tem`` trains on target rows only; its MEM is loaded
from the stage-1 run's latest checkpoint by DCP (which reshards, so stage 2 may run at another world size or
plan) and frozen; the serving model is exported afterwards by ``mkt_torchrec.training.export.export_run`` (a
single process, once the process group is released: ``mkt train`` and ``mkt run`` call it).

Run directory::

    RUN/run.json          stage, config, data, world size
    RUN/plan.json         the sharding plan used
    RUN/metrics.jsonl     one JSON record per log step (loss, bce, pdl, rows/s, learning rates)
    RUN/checkpoints/      see ``mkt_torchrec.training.checkpoint``
    RUN/serving/          stage tem: model.pt2 + serving.json
    RUN/predictions/, RUN/metrics.json   written by ``scoring.evaluate``
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from mkt_torchrec import faults
from mkt_torchrec.collective import Collective
from mkt_torchrec.config import Config
from mkt_torchrec.data.dataset import open_dataset_shared
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.planning.plan_file import write_plan
from mkt_torchrec.training import checkpoint, runlock
from mkt_torchrec.training.assembly import Assembled, assemble, configure_dense_math, state_of, train_state
from mkt_torchrec.training.build import build_train_module, dense_lr, stage2_uses_mem, stage_entity, stage_transfer
from mkt_torchrec.training.distributed import DistInfo, all_gather_objects, all_sum, init_distributed
from mkt_torchrec.training.feed import Feed, make_pipeline
from mkt_torchrec.training.mem_transfer import (MEM_RECORD, check_mem_run, check_pretraining_run, init_tem_from_mem,
                                                load_mem_into_stage2, load_run_checkpoint, transfer_from_pretraining)
from mkt_torchrec.training.resume import load_train_state
from mkt_torchrec.training.rundir import Scalars, log_record, read_run, truncate_log, write_json
from mkt_torchrec.training.scoring import Validation, progress_bar

log = logging.getLogger("mkt.train")


def _prepare_run_dir(cfg: Config, stage: str, data_dir: str, run_dir: str, resume: bool, mem_run: Optional[str],
                     info: DistInfo) -> Optional[str]:
    """Rank 0 locks, checks and creates the run directory; every rank gets its verdict (a collective). Returns
    the lock's path on rank 0 (None elsewhere)."""

    def prepare() -> str:
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise ValueError(f"{run_dir}: exists and is not a directory")
        os.makedirs(run_dir, exist_ok=True)
        lock = runlock.acquire(run_dir, f"mkt train --stage {stage}")
        try:
            _check_and_record()
        except BaseException:
            runlock.release(lock)
            raise
        return lock

    def _check_and_record() -> None:
        has_ckpt = os.path.exists(os.path.join(run_dir, "checkpoints", checkpoint.LATEST))
        if has_ckpt and not resume:
            raise ValueError(f"{run_dir}: holds checkpoints already; pass --resume to continue it, or use a new "
                             "--run-dir")
        previous = read_run(run_dir) if has_ckpt else None  # a start without a checkpoint records itself anew
        if previous is not None:
            if previous.get("stage") != stage:
                raise ValueError(f"{run_dir}: is a {previous.get('stage')!r} run, not {stage!r}")
            mine, theirs = cfg.to_dict(), previous.get("config", {})
            differ = sorted(k for k in ("schema", "model") if mine.get(k) != theirs.get(k))
            if differ:
                raise ValueError(f"{run_dir}: its checkpoints were trained with other {' and '.join(differ)} "
                                 "settings than this config; resume with the run's own config or use a new --run-dir")
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        write_json(os.path.join(run_dir, "run.json"), {
            "stage": stage, "config": cfg.to_dict(), "data": os.path.abspath(data_dir),
            "mem_run": os.path.abspath(mem_run) if mem_run else None, "world_size": info.world_size,
            "created": (previous or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    lock = Collective(info.device).on_root(prepare)
    return lock if info.is_main else None


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


def train(cfg: Config, stage: str, data_dir: str, run_dir: str, resume: bool = False,
          mem_run: Optional[str] = None) -> Dict[str, Any]:
    """Train one stage in the current process group (every rank calls it). Returns a summary (rank 0).

    Every rank steps until every rank has run out of rows: a rank that finished its share first steps on a
    filler batch with zero loss weight (its collectives must still match the others'), so no row is dropped;
    the loss of each step is the mean over the step's real rows of all ranks. The serving export of stage 2 is a
    separate step (:func:`mkt_torchrec.training.export.export_run`), run after the process group is released.
    """
    info = init_distributed()
    torch.set_num_threads(cfg.train.threads)
    configure_dense_math(cfg)
    if stage == "tem" and stage2_uses_mem(cfg) and not mem_run:
        raise ValueError("stage tem needs --mem-run MEM_RUN_DIR (or model.ablation=no_mem_pretrain)")
    if stage == "tem" and stage2_uses_mem(cfg):
        check_mem_run(cfg, mem_run)  # type: ignore[arg-type]
    if stage_transfer(cfg, stage):
        check_pretraining_run(cfg, mem_run)
    manifest = open_dataset_shared(data_dir, cfg.schema)  # a bad --data fails before the run directory exists
    asm = assemble(cfg, stage, info, manifest=manifest)  # a plan that cannot apply fails before the run dir exists
    lock = _prepare_run_dir(cfg, stage, data_dir, run_dir, resume, mem_run, info)
    try:
        return _train_locked(cfg, stage, data_dir, run_dir, resume, mem_run, info, manifest, lock, asm)
    finally:
        runlock.release(lock)


def _train_locked(cfg: Config, stage: str, data_dir: str, run_dir: str, resume: bool, mem_run: Optional[str],
                  info: DistInfo, manifest: Any, lock: Optional[str], asm: Assembled) -> Dict[str, Any]:
    """:func:`train` once the stage is assembled and the run directory locked and prepared."""
    model, optimizer, plan = asm.model, asm.optimizer, asm.plan
    plan_record: Dict[str, Any] = {}
    if info.is_main:
        plan_path = os.path.join(run_dir, "plan.json")
        write_plan(plan, model.module if hasattr(model, "module") else model, plan_path,
                   {"stage": stage, "world_size": info.world_size, **asm.plan_meta})
        with open(plan_path, encoding="utf-8") as f:
            plan_record = json.load(f)  # every checkpoint records the plan it was saved under
    latest = checkpoint.latest_checkpoint(run_dir) if resume else None
    mem_used: Optional[Dict[str, Any]] = None  # stage 2's frozen MEM: recorded by its checkpoints, not saved again
    if stage == "tem" and stage2_uses_mem(cfg):
        mem_used = load_mem_into_stage2(model, mem_run, latest)  # type: ignore[arg-type]
        if cfg.model.tem.init_from_mem and latest is None:
            loaded = init_tem_from_mem(model, mem_used["path"])
            if info.is_main:
                log.info("model.tem.init_from_mem: the TEM starts from %d tensors of %s", len(loaded),
                         mem_used["path"])
    if stage_transfer(cfg, stage) and latest is None:  # else in the checkpoint
        transfer_from_pretraining(model, mem_run, stage_transfer(cfg, stage))  # type: ignore[arg-type]
    entity = stage_entity(cfg, stage)
    if entity and not manifest.split_rows("train", entity, validation_fraction=cfg.data.validation_fraction):
        raise ValueError(f"{data_dir}: the train split has no {entity}-entity rows: stage {stage} has nothing to "
                         "learn from")
    reader = ParquetReader(data_dir, "train", cfg.schema, cfg.data, rank=info.rank, world_size=info.world_size,
                           entity=entity, manifest=manifest)
    step, epoch, epoch_rows = 0, 0, 0
    best: Optional[Dict[str, Any]] = None  # early stopping: the best validation so far ({step, epoch, gauc, auc})
    since_best = 0  # epochs validated since the best
    if latest is not None:
        extra = checkpoint.read_extra(latest)
        load_train_state(asm, cfg, latest, extra.get("plan") or {})
        step, epoch = int(extra["step"]), int(extra["epoch"])
        epoch_rows = int(extra.get("epoch_rows", 0))  # all ranks' rows of the epoch so far
        best, since_best = extra.get("best"), int(extra.get("since_best", 0))
        reader.load_state_dict(extra["readers"])  # re-split over this world if it has another size
        truncate_log(run_dir, step, info.is_main)
        if info.is_main:
            log.info("resumed %s from %s (step %d, epoch %d, saved by %d ranks, now %d)", run_dir, latest, step,
                     epoch, int(extra.get("world_size", 0)), info.world_size)

    scalars = Scalars(run_dir, purge_step=step + 1 if latest is not None else None) \
        if info.is_main and cfg.train.tensorboard else None
    try:
        saver = checkpoint.AsyncCheckpointer(run_dir, info.is_main, cfg.train.keep_checkpoints)
        cadence = _Cadence(cfg.train, info.is_main)
        tc = cfg.train
        validating = tc.patience > 0
        epochs = tc.max_epochs if validating else tc.epochs
        valid_entity = "source" if entity == "source" else "target"  # the target entity's GAUC is what counts
        validation = Validation(cfg, data_dir, run_dir, info, manifest, valid_entity) if validating else None
        steps_left = max(0, tc.max_steps - step) if tc.max_steps else None
        reader_state = reader.state_dict()  # this rank's position after the last trained step

        def save() -> None:
            if window_steps:  # never publish a checkpoint of a run that diverged since its last log step
                _check_finite(all_sum([float(stats.sum())], info.device)[0], step - window_steps, step)
            runlock.refresh(lock)
            readers = all_gather_objects(reader_state, info.world_size)
            saver.save(step, state_of(asm, cfg),
                       {"step": step, "epoch": epoch, "epoch_rows": epoch_rows, "readers": readers,
                        "world_size": info.world_size, "stage": stage, "plan": plan_record, "best": best,
                        "since_best": since_best, **({MEM_RECORD: mem_used} if mem_used else {})})
            cadence.saved()

        fail_check = faults.die_after_step(stage)  # MKT_FAIL_AT_STEP (mkt_torchrec.faults)
        rows_per_step = reader.plan.batch_size * info.world_size
        split_rows = reader.num_rows()  # of the stage's entity
        est_steps = epochs * max(1, -(-split_rows // rows_per_step))
        if tc.max_steps:
            est_steps = min(est_steps, tc.max_steps)
        bar = progress_bar(est_steps, f"train {stage}", step, info.is_main)
        model.train()
        pipeline = make_pipeline(model, optimizer, info.device)
        window_rows, window_start = 0, time.perf_counter()
        stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss, bce, pdl summed since the last log
        window_steps, last_loss = 0, float("nan")
        stopped = validating and best is not None and since_best >= tc.patience  # resumed after the early stop
        faults.fault_point("train", info.rank)
        while reader.epoch < epochs and not stopped and (steps_left is None or steps_left > 0):
            feed = Feed(reader, info, reader.epoch + 1, steps_left)  # one epoch: validation runs between epochs
            trained = False
            while True:
                try:
                    out = pipeline.progress(feed)  # forward, backward and update of one step; no host sync
                except StopIteration:
                    break
                fed = feed.handed.popleft()  # the batch this step trained (the pipeline has pulled later ones already)
                step += 1
                trained = True
                steps_left = None if steps_left is None else steps_left - 1
                epoch, reader_state = fed.epoch, fed.reader_state
                epoch_rows += fed.global_rows
                window_rows += fed.global_rows
                share = fed.rows * info.world_size / fed.global_rows  # this rank's share of the step's rows (x world)
                stats += torch.stack([out.loss, out.bce, out.pdl * share]).double()
                window_steps += 1
                bar.update(1)
                time_due = False
                if step % tc.log_every == 0:
                    last_loss, time_due = _log_step(run_dir, cfg, stage, info, stats, window_steps, window_rows,
                                                    window_start, step, epoch, bar, cadence, scalars)
                    runlock.refresh(lock)
                    stats.zero_()
                    window_rows, window_steps, window_start = 0, 0, time.perf_counter()
                if fed.epoch_end:
                    if info.is_main:
                        log_record(run_dir, {"epoch_end": epoch, "step": step, "rows_trained": epoch_rows,
                                             "rows_in_split": split_rows}, scalars)
                        log.info("epoch %d done: %d rows trained (of %d in the split%s)", epoch, epoch_rows,
                                 split_rows, f", {entity} rows" if entity else "")
                    epoch_rows = 0
                saver.poll()
                if cadence.due(step, time_due) and not (validation is not None and fed.epoch_end):
                    save()  # (an epoch's last step saves after its validation)
                fail_check(step, info.rank, info.world_size, saver.wait)
            if validation is None or not trained or reader.epoch == epoch:  # or stopped by max_steps mid-epoch
                continue
            model.eval()
            metrics = validation.run(pipeline, epoch)
            model.train()
            improved = best is None or metrics["gauc"] > best["gauc"]
            best = {"step": step, "epoch": epoch, "gauc": metrics["gauc"], "auc": metrics["auc"]} if improved else best
            since_best = 0 if improved else since_best + 1
            stopped = since_best >= tc.patience
            if info.is_main:
                log_record(run_dir, {"validation": epoch, "step": step, **metrics, "best_epoch": best["epoch"],
                                     "early_stop": stopped}, scalars)
                log.info("epoch %d validation (%s rows): GAUC %.4f AUC %.4f; best epoch %d%s", epoch, valid_entity,
                         metrics["gauc"], metrics["auc"], best["epoch"], " - stopping early" if stopped else "")
            save()  # every validated epoch: a resumed run continues the early stopping from here; `best` points at
            # the best one
        bar.close()
        if window_steps:
            last_loss, _ = _log_step(run_dir, cfg, stage, info, stats, window_steps, window_rows, window_start, step,
                                     epoch, bar, cadence, scalars)
        saver.wait()
        final = checkpoint.latest_checkpoint(run_dir) if info.is_main else None
        final = all_gather_objects(final, info.world_size)[0]
        if final is None or not final.endswith(f"step-{step:08d}"):
            save()
            saver.wait()
        dist.barrier()
        return {"run_dir": run_dir, "stage": stage, "steps": step, "epochs": reader.epoch, "loss": last_loss,
                "world_size": info.world_size, "best": best}
    finally:
        if scalars is not None:
            scalars.close()


def _log_step(run_dir: str, cfg: Config, stage: str, info: DistInfo, stats: torch.Tensor, steps: int, rows: int,
              start: float, step: int, epoch: int, bar: Any, cadence: "_Cadence",
              scalars: Optional[Scalars]) -> Tuple[float, bool]:
    """All-reduce the window's losses (device tensors) and rank 0's "checkpoint by time" flag; write one metrics
    record (rank 0). The only collective and host sync of a training step, every ``train.log_every`` steps.
    Returns (loss, whether a time-based checkpoint is due)."""
    due = torch.full((1,), float(cadence.due_by_time()), dtype=torch.float64, device=info.device)
    totals = torch.cat([stats, due])
    dist.all_reduce(totals)
    values = totals.tolist()
    loss, bce, pdl = (float(v) / steps / info.world_size for v in values[:3])  # weights carry world_size
    _check_finite(loss, step - steps, step)
    seconds = max(time.perf_counter() - start, 1e-9)
    record = {"step": step, "epoch": epoch, "loss": loss, "bce": bce, "pdl": pdl, "rows_per_s": rows / seconds,
              "dense_lr": dense_lr(cfg, stage), "embedding_lr": cfg.train.embedding_lr, "time": time.time()}
    if info.is_main:
        log_record(run_dir, record, scalars)
        bar.set_postfix(loss=f"{loss:.4f}", rows_s=f"{record['rows_per_s']:.0f}")
        log.info("step %d epoch %d loss %.4f rows/s %.0f", step, epoch, loss, record["rows_per_s"])
    return loss, values[3] > 0


def _check_finite(loss: float, after: int, upto: int) -> None:
    """Stop a run whose loss became NaN / inf (every rank sees the same all-reduced value, so all stop)."""
    if not math.isfinite(loss):
        raise ValueError(f"the loss became {loss} between steps {after + 1} and {upto}; stopping before anything "
                         "is saved (lower train.embedding_lr / train.dense_lr, or check the data)")


def load_unsharded(cfg: Config, stage: str, ckpt: str) -> nn.Module:
    """The stage module with real (unsharded) tables, loaded from a checkpoint without collectives (stage 2's
    frozen MEM from the MEM checkpoint it records: :func:`load_run_checkpoint`)."""
    module = build_train_module(cfg, stage, device=torch.device("cpu"))
    state = train_state(module, None)
    load_run_checkpoint(ckpt, state, no_dist=True)
    module.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return module
