"""The distributed scoring pass: prediction files of a split, HFA's scores, the validation of early stopping and
``evaluate``.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import replace
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from mkt_torchrec import faults, logs, storage
from mkt_torchrec.collective import Collective
from mkt_torchrec.config import Config
from mkt_torchrec.fsutil import make_dirs
from mkt_torchrec.evaluation.report_flags import base_rate_logloss
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.data.dataset import open_dataset_shared
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.training import checkpoint, runlock
from mkt_torchrec.training.assembly import assemble, configure_dense_math, train_state
from mkt_torchrec.models.build import stage_entity
from mkt_torchrec.training.distributed import DistInfo, init_distributed
from mkt_torchrec.training.feed import Feed, make_pipeline
from mkt_torchrec.training.mem_transfer import load_run_checkpoint

log = logging.getLogger("mkt.train")


def progress_bar(total: int, desc: str, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc=desc, unit="step", dynamic_ncols=True,
                disable=not enabled or not logs.progress_enabled())


class _HFAMeans:
    """Per-entity mean HFA score of each specific feature over the entity's own rows, summed on the device.

    Args:
        features: entity -> feature names of its score columns (``hfa_feature_names``); ``StepOutput.hfa`` holds
            the entities' columns one after the other, in this order, which is that of the entity codes (source
            0, target 1).
    """

    def __init__(self, features: Dict[str, List[str]]) -> None:
        self.features = features
        self.sums: Optional[torch.Tensor] = None  # (F_src + F_tgt + entities,) own-row score sums, then row counts
        self.codes: Optional[torch.Tensor] = None  # (F,) entity code of each score column, on the device

    def add(self, hfa: torch.Tensor, entity: torch.Tensor) -> None:
        """hfa (B, F_src + F_tgt), entity (B,) on the device; no host sync."""
        width = sum(len(f) for f in self.features.values())
        if hfa.shape[1] != width:
            raise RuntimeError(f"the model's HFA scores have {hfa.shape[1]} columns, the schema's specific "
                               f"features {width}")
        if self.codes is None:  # filled on the device (a tensor from a host list would copy and sync on CUDA)
            self.codes = torch.cat([torch.full((len(names),), code, dtype=entity.dtype, device=hfa.device)
                                    for code, names in enumerate(self.features.values())])  # (F,)
        own = (entity.unsqueeze(1) == self.codes.unsqueeze(0)).double()  # (B, F) 1 where the column is the row's
        rows = (entity.unsqueeze(1) == torch.arange(len(self.features), device=hfa.device)).double()  # (B, E)
        part = torch.cat([(hfa.double() * own).sum(0), rows.sum(0)])  # (F + E,)
        self.sums = part if self.sums is None else self.sums + part

    def all_reduce(self, device: torch.device) -> Dict[str, Dict[str, float]]:
        """Sum over ranks (a collective) -> {entity: {feature: mean}} of the entities with rows."""
        width = sum(len(f) for f in self.features.values())
        sums = self.sums if self.sums is not None else torch.zeros(width + len(self.features), dtype=torch.float64,
                                                                   device=device)
        dist.all_reduce(sums)
        values = sums.tolist()
        out: Dict[str, Dict[str, float]] = {}
        col = 0
        for i, (e, names) in enumerate(self.features.items()):
            count = values[width + i]
            if count > 0:
                out[e] = {n: values[col + j] / count for j, n in enumerate(names)}
            col += len(names)
        return out


def score_split(pipeline: Any, reader: ParquetReader, info: DistInfo, pred_dir: str, desc: str,
                hfa_features: Optional[Dict[str, List[str]]] = None) -> Optional[Dict[str, Dict[str, float]]]:
    """Score one pass of ``reader`` through ``pipeline`` (its model in eval mode) and write this rank's predictions
    to ``pred_dir/part-RANK.parquet`` (``user_id, entity, label, score`` [, ``activity``, ``true_prob``]); the
    directory is emptied first. Collective: every rank calls it. Scores stay on the device until the pass ends.

    With ``hfa_features`` (entity -> specific feature names, ``hfa_feature_names``) and a model that reports HFA
    scores (``StepOutput.hfa``, MKT's MEM with HFA), also returns every entity's mean score of each of its
    specific features over its own rows of all ranks: {entity: {feature: mean}}; else None."""
    cols: Dict[str, list] = {"user_id": [], "entity": [], "label": [], "activity": [], "true_prob": []}
    logits: List[torch.Tensor] = []
    hfa = _HFAMeans(hfa_features) if hfa_features is not None else None
    scored_hfa = False  # the model reports HFA scores (the same on every rank: the same model, the same steps)
    feed = Feed(reader, info, epochs=reader.epoch + 1, steps=None)
    total = -(-reader.num_rows() // max(1, reader.plan.batch_size * info.world_size))
    bar = progress_bar(total, desc, 0, info.is_main)
    with torch.no_grad():
        while True:
            try:
                out = pipeline.progress(feed)  # the forward's StepOutput (no backward in eval mode)
            except StopIteration:
                break
            fed = feed.handed.popleft()
            bar.update(1)
            scored_hfa = scored_hfa or (out.hfa is not None and out.hfa.shape[1] > 0)
            if fed.rows == 0:  # filler: this rank has scored all its rows
                continue
            batch = fed.batch
            logits.append(out.logits)
            if hfa is not None and scored_hfa:
                hfa.add(out.hfa, out.entity)
            # copies in pageable memory: a view would keep the feed's (on CUDA pinned) batch alive all pass long
            cols["user_id"].append(batch.user_id.numpy().copy())
            cols["entity"].append(batch.entity.numpy().copy())
            cols["label"].append(batch.labels.numpy().copy())
            if batch.activity is not None:
                cols["activity"].append(batch.activity.numpy().copy())
            if batch.true_prob is not None:
                cols["true_prob"].append(batch.true_prob.numpy().copy())
    bar.close()
    cols["score"] = [torch.sigmoid(torch.cat(logits).float()).cpu().numpy()] if logits else []

    def column(name: str, dtype: Any) -> np.ndarray:
        return np.concatenate(cols[name]).astype(dtype) if cols[name] else np.zeros(0, dtype)

    names = pa.array(["source", "target"])  # entity code -> name
    arrays = {"user_id": pa.array(column("user_id", np.int64)),
              "entity": names.take(pa.array(column("entity", np.int64))),
              "label": pa.array(column("label", np.float32)), "score": pa.array(column("score", np.float32))}
    has = reader.manifest.optional_columns
    if "activity" in has:
        arrays["activity"] = pa.array(column("activity", np.int64))
    if "true_prob" in has:
        arrays["true_prob"] = pa.array(column("true_prob", np.float32))
    if info.is_main:  # predictions of an earlier pass (perhaps at another world size) go first
        shutil.rmtree(pred_dir, ignore_errors=True)
        make_dirs(pred_dir)
    dist.barrier()
    path = os.path.join(pred_dir, f"part-{info.rank:05d}.parquet")
    pq.write_table(pa.table(arrays), path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    return hfa.all_reduce(info.device) if hfa is not None and scored_hfa else None


class Validation:
    """The early-stopping metric: GAUC (and AUC) of ``entity``'s rows of the validation split (the last
    ``data.validation_fraction`` of the train split in time order), scored after each epoch through the training
    pipeline, with the exact distributed metrics (no bootstrap). Predictions go to ``RUN/validation/``.

    A split too small to compute the criterion is refused before training where the manifest shows it (fewer than
    2 rows, or one class: :func:`_check_validation_size`); a NaN criterion at a validation stops the run
    (``recipe.validate``)."""

    def __init__(self, cfg: Config, data_dir: str, run: RunDir, info: DistInfo, manifest: Any, entity: str,
                 stage: str = "mem") -> None:
        from mkt_torchrec.cache.knowledge import attach
        from mkt_torchrec.models.losses import hfa_feature_names

        if cfg.data.validation_fraction <= 0 and not manifest.has_valid_files:
            raise ValueError("train.patience > 0 needs a validation split: set data.validation_fraction > 0 (or "
                             "train.patience=0 to train train.epochs epochs without early stopping)")
        self.reader = attach(ParquetReader(data_dir, "valid", cfg.schema, cfg.data, rank=info.rank,
                                           world_size=info.world_size, training=False, entity=entity,
                                           manifest=manifest), cfg, stage)
        what = ("its valid files" if manifest.has_valid_files
                else f"data.validation_fraction={cfg.data.validation_fraction}")
        if self.reader.num_rows() == 0:
            raise ValueError(f"{data_dir}: the validation split ({what}) has no {entity} rows to stop early on")
        _check_validation_size(data_dir, manifest, entity, self.reader.num_rows(), what, cfg.train.stop_on)
        self.what = what
        self.info, self.entity = info, entity
        self.eval_cfg = replace(cfg.eval, bootstrap_samples=0)
        self.pred_dir = run.validation
        self.hfa_features = hfa_feature_names(cfg.schema)

    def run(self, pipeline: Any, epoch: int) -> Dict[str, float]:
        """Score the validation split (collective) -> {"gauc", "auc", "logloss", "base_logloss" (the constant
        click-rate predictor's), "click_rate", "mean_score", "rows", "users"} of the entity, and "hfa_scores"
        ({entity: {feature: mean score}}) for a model with HFA."""
        from mkt_torchrec.evaluation.distributed_metrics import (
            compute_metrics_distributed,
        )

        self.reader.set_epoch(0)
        hfa = score_split(pipeline, self.reader, self.info, self.pred_dir, f"validate {epoch}", self.hfa_features)
        metrics = (compute_metrics_distributed(self.pred_dir, self.eval_cfg, self.info.device) or {})[self.entity]
        gauc = metrics.get("gauc")
        calibration = metrics.get("calibration") or {}
        rate = calibration.get("click_rate")
        return {"gauc": _number(gauc), "auc": _number(metrics.get("auc")), "logloss": _number(metrics.get("logloss")),
                "base_logloss": _number(base_rate_logloss(rate)), "click_rate": _number(rate),
                "mean_score": _number(calibration.get("mean_score")),
                "rows": int(metrics.get("rows", 0)), "users": int(metrics.get("users", 0)),
                **({"hfa_scores": hfa} if hfa is not None else {})}


def _check_validation_size(data_dir: str, manifest: Any, entity: str, rows: int, what: str, stop_on: str) -> None:
    """Before training, what the manifest alone can tell about the validation split: early stopping by GAUC needs
    a user with both a click and a non-click among its rows, so at least 2 rows and both classes; by log loss, a
    row. Clicks are counted per split: exact for a dataset with valid files of its own, and for a validation cut
    of the train rows the train split's own (no click at all, or only clicks, leaves none in the cut either).
    Whether a user has both classes is known only once the rows are scored: :meth:`Validation.run`'s caller
    stops the run on a NaN criterion (``recipe.validate``).

    Raises:
        ValueError: too few rows or a single class, naming the setting to raise.
    """
    if stop_on == "logloss":
        return
    clicks = (manifest.clicks or {}).get("valid" if manifest.has_valid_files else "train", {}).get(entity)
    of = manifest.split_rows("valid" if manifest.has_valid_files else "train", entity)
    one_class = clicks is not None and (clicks == 0 or clicks == of)
    if rows >= 2 and not one_class:
        return
    if one_class:
        why = f"can only hold {'non-clicks' if clicks == 0 else 'clicks'} ({clicks} clicks in {of} {entity} rows)"
        fix = "check the dataset's labels"
    else:
        why = f"has {rows} {entity} row"
        fix = "raise data.validation_fraction" if not manifest.has_valid_files else "give its valid files more rows"
    raise ValueError(f"{data_dir}: the validation split ({what}) {why}: train.stop_on={stop_on} needs at least one "
                     f"user with both a click and a non-click among the {entity} validation rows; {fix} (or set "
                     "train.patience=0 to train train.epochs epochs)")


def _number(v: Any) -> float:
    return float("nan") if v is None else float(v)


def evaluate(cfg: Config, run_dir: str, data_dir: str, into: Optional[str] = None,
             cache_version: Optional[str] = None) -> Dict[str, Any]:
    """Score the test split with the run's latest checkpoint; write predictions and RUN/metrics.json.

    ``into``: write them to that directory instead (``predictions/``, ``metrics.json`` and a copy of the run's
    ``run.json`` marked ``scored_from``, so ``mkt report`` reads it as a run), leaving the run as it is: a model
    scored on other data (``mkt daily``'s model frozen after day 1, scored on every later day).
    ``cache_version``: a stage 2 that reads its knowledge from the cache is scored with that version of it instead of
    the one it trained with (what a stale cache costs); the version must come from a MEM of the same structure.

    The model (schema, layers, ablation) is the run's own, from RUN/run.json; ``cfg`` contributes the evaluation
    settings (``eval``), batch size, workers and threads. Every rank scores its share of the test rows and writes
    its predictions, then every rank computes the exact statistics of its share of users and rank 0 merges small
    sums (:mod:`mkt_torchrec.evaluation.distributed_metrics`): no rank works while the others wait.
    """
    run = RunDir(run_dir)
    run.check_one_node()
    stage = run.stage()
    cfg = run.config().for_evaluation(cfg)  # ``EVALUATE_KEYS`` from the job, the rest the run's own
    if cache_version is not None:
        if cfg.model.tem.knowledge != "cache":
            raise ValueError(f"{run_dir}: --cache-version applies to a stage 2 trained with model.tem.knowledge=cache")
        cfg = cfg.with_settings({"cache.version": cache_version})
    info = init_distributed()
    torch.set_num_threads(cfg.train.threads)
    configure_dense_math(cfg)
    ckpt = checkpoint.final_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to evaluate")
    manifest = open_dataset_shared(data_dir, cfg.schema)
    target = run
    if into is not None:
        target = RunDir(into)
        record = {**run.record(), "scored_from": run.location, "data": storage.absolute(data_dir)}
        Collective(info.device).on_root(lambda: _start_scored_copy(target, record))
    lock = Collective(info.device).on_root(lambda: target.lock("mkt evaluate"))
    try:
        return _evaluate_locked(cfg, run, data_dir, info, manifest, stage, ckpt, target)
    finally:
        runlock.release(lock if info.is_main else None)


def _start_scored_copy(target: RunDir, record: Dict[str, Any]) -> None:
    """``evaluate(into=...)``: the directory with the run's record (rank 0, before the lock); only a directory
    ``evaluate`` (or a run) wrote is written over."""
    from mkt_torchrec.fsutil import check_replaceable

    if not target.remote:
        check_replaceable(target.path, ("run.json", "metrics.json"), "a run directory or an mkt evaluate --into output")
        make_dirs(target.path)
    target.write_record(record)


def _evaluate_locked(cfg: Config, run: RunDir, data_dir: str, info: DistInfo, manifest: Any, stage: str,
                     ckpt: str, target: Optional[RunDir] = None) -> Dict[str, Any]:
    """:func:`evaluate` once the run directory (or ``target``, where the results go) is locked."""
    from mkt_torchrec.cache.knowledge import attach

    target = target or run
    from mkt_torchrec.evaluation.distributed_metrics import compute_metrics_distributed
    from mkt_torchrec.models.losses import hfa_feature_names

    asm = assemble(cfg, stage, info, manifest=manifest)
    model = asm.model
    load_run_checkpoint(ckpt, train_state(model, None))  # stage 2: its frozen MEM from the MEM run's checkpoint
    model.eval()
    entity = "target" if stage_entity(cfg, stage) == "target" else None  # joint models: both entities
    reader = attach(ParquetReader(data_dir, "test", cfg.schema, cfg.data, rank=info.rank,
                                  world_size=info.world_size, training=False, entity=entity, manifest=manifest),
                    cfg, stage)
    wanted = manifest.rows.get("test", {}).get("target", 0) if entity else reader.num_rows()
    if wanted == 0:
        raise ValueError(f"{data_dir}: the test split has no {'target ' if entity else ''}rows to evaluate")
    faults.fault_point("evaluate", info.rank)
    pipeline = make_pipeline(model, asm.optimizer, info.device)
    hfa_scores = score_split(pipeline, reader, info, target.predictions, "evaluate", hfa_feature_names(cfg.schema))
    metrics = compute_metrics_distributed(target.predictions, cfg.eval, info.device) or {}
    if info.is_main:
        extra = checkpoint.read_extra(ckpt)
        metrics["run_dir"] = run.location
        metrics["checkpoint"] = os.path.basename(ckpt)
        metrics["checkpoint_epoch"] = int(extra["epoch"])  # the epoch early stopping chose, when it ran
        metrics["validation"] = extra.get("best")
        metrics["stage"] = stage
        metrics["ablation"] = cfg.model.ablation
        metrics["world_size"] = info.world_size
        if hfa_scores is not None:  # MKT's MEM with HFA: {entity: {specific feature: mean score on its rows}}
            metrics["hfa_scores"] = hfa_scores
        if target is not run:
            metrics["scored_from"], metrics["data"] = run.location, storage.absolute(data_dir)
        if reader.augment is not None:  # the cached stage 2: which version, and how much of it the rows found
            metrics["cache"] = {"version": cfg.cache.version, "found_rank0": reader.augment.coverage()}
        target.write_metrics(metrics)
    dist.barrier()
    return metrics
