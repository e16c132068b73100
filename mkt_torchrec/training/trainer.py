"""The distributed two-stage trainer and the distributed evaluation pass.

Assembly follows TorchRec's canonical order: the stage module is built with its tables on the ``meta``
device -> the embedding optimizer is fused into backward (``apply_optimizer_in_backward``) for the tables
that train -> the planner's ``collective_plan`` (or a plan file from ``mkt plan``) -> ``DistributedModelParallel``
-> a ``CombinedOptimizer`` of the fused optimizer and a dense optimizer for everything else.

Stage ``mem`` trains on mixed source + target rows. Stage ``tem`` trains on target rows only; its MEM is loaded
from the stage-1 run's latest checkpoint by DCP (which reshards, so stage 2 may run at another world size or
plan) and frozen; at the end it exports the serving model to ``RUN/serving/``.

Run directory::

    RUN/run.json          stage, config, data, world size (written once)
    RUN/plan.json         the sharding plan used
    RUN/metrics.jsonl     one JSON record per log step (loss, bce, pdl, rows/s, learning rates)
    RUN/checkpoints/      see ``mkt_torchrec.training.checkpoint``
    RUN/serving/          stage tem: model.pt2 + serving.json
    RUN/predictions/, RUN/metrics.json   written by ``evaluate``
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Any, Dict, Iterator, NamedTuple, Optional, Tuple

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from mkt_torchrec.config import Config, config_from_dict
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.planning.plan import attach_embedding_optimizer, load_plan, make_plan, sharders, write_plan
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.build import build_train_module, stage2_uses_mem
from mkt_torchrec.training.distributed import (DistInfo, all_agree, all_gather_objects, any_true,
                                               init_distributed)

log = logging.getLogger("mkt.train")

_DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
FAIL_AT_STEP_ENV = "MKT_FAIL_AT_STEP"  # testing hook: the last rank dies right after this step


# --------------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------------


def _compute_device(cfg: Config, info: DistInfo) -> str:
    choice = cfg.train.planner.compute_device
    return info.device.type if choice == "auto" else choice


class Assembled(NamedTuple):
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    plan: Any  # torchrec ShardingPlan
    plan_meta: Dict[str, Any]  # local_world_size, compute_device (recorded in RUN/plan.json)


def assemble(cfg: Config, stage: str, info: DistInfo, plan_file: Optional[str] = None) -> Assembled:
    """Build, plan and shard the stage module."""
    torch.manual_seed(cfg.train.seed)
    module = build_train_module(cfg, stage, device=torch.device("meta"))
    attach_embedding_optimizer(module, cfg, stage)  # fused into backward, for the tables that train
    local_world = cfg.train.planner.local_world_size or info.local_world_size
    device_type = _compute_device(cfg, info)
    plan_file = plan_file or cfg.train.planner.plan_file
    if plan_file:
        plan = load_plan(plan_file, module, info.world_size, local_world, device_type)
    else:
        plan = make_plan(module, cfg, info.world_size, local_world, device_type, pg=dist.group.WORLD)
    model = DistributedModelParallel(
        module=module, env=ShardingEnv.from_process_group(dist.group.WORLD), device=info.device, plan=plan,
        sharders=sharders(),
        # a batch may hold rows of one entity only: the other entity's modules then get no gradient
        data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=True),
    )
    dense = {n: p for n, p in model.named_parameters()
             if p.requires_grad and not hasattr(p, "_in_backward_optimizers")}
    dense_cls = _DENSE_OPTIMIZERS[cfg.train.dense_optimizer]
    dense_opt = KeyedOptimizerWrapper(dense, lambda ps: dense_cls(ps, lr=cfg.train.dense_lr))
    optimizer = CombinedOptimizer([model.fused_optimizer, dense_opt])
    return Assembled(model, optimizer, plan, {"local_world_size": local_world, "compute_device": device_type})


def train_state(model: nn.Module, optimizer: Optional[CombinedOptimizer]) -> Dict[str, Any]:
    """Tensors of model (and optimizer) state, flat, for DCP. Values alias the live tensors."""
    state: Dict[str, Any] = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        for key, per_param in optimizer.state_dict()["state"].items():
            for name, value in per_param.items():
                if isinstance(value, torch.Tensor):
                    state[f"optim.{key}.{name}"] = value
    return state


# --------------------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def read_run(run_dir: str) -> Dict[str, Any]:
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: not a run directory (run.json is missing)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_config(run_dir: str) -> Config:
    """The config a run was trained with (from RUN/run.json)."""
    return config_from_dict(read_run(run_dir)["config"])


def _prepare_run_dir(cfg: Config, stage: str, data_dir: str, run_dir: str, resume: bool, mem_run: Optional[str],
                     info: DistInfo) -> None:
    error = None
    if info.is_main:
        has_ckpt = os.path.exists(os.path.join(run_dir, "checkpoints", checkpoint.LATEST))
        if has_ckpt and not resume:
            error = f"{run_dir}: holds checkpoints already; pass --resume to continue it, or use a new --run-dir"
        elif resume and os.path.isfile(os.path.join(run_dir, "run.json")) and read_run(run_dir)["stage"] != stage:
            error = f"{run_dir}: is a {read_run(run_dir)['stage']!r} run, not {stage!r}"
        else:
            os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
            if not os.path.isfile(os.path.join(run_dir, "run.json")):
                _write_json(os.path.join(run_dir, "run.json"), {
                    "stage": stage, "config": cfg.to_dict(), "data": os.path.abspath(data_dir),
                    "mem_run": os.path.abspath(mem_run) if mem_run else None, "world_size": info.world_size,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                })
    errors = all_gather_objects(error, info.world_size)
    if errors[0]:
        raise ValueError(errors[0])


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def _mem_structure(cfg: Config) -> Dict[str, Any]:
    """What decides the MEM's parameters: schema and MEM layers (not the TEM, gamma or the data)."""
    m = asdict(cfg.model)
    return {"schema": asdict(cfg.schema), "sequence": m["sequence"], "hfa": m["hfa"], "cke": m["cke"],
            "extractor_layers": m["extractor_layers"], "tower": m["tower"],
            "no_hfa": cfg.model.ablation == "no_hfa"}


def check_mem_run(cfg: Config, mem_run: str) -> None:
    """Refuse a stage-1 run whose MEM is not the one this config's stage 2 builds, naming what differs."""
    mine, theirs = _mem_structure(cfg), _mem_structure(run_config(mem_run))
    differ = sorted(k for k in mine if mine[k] != theirs[k])
    if differ:
        raise ValueError(f"{mem_run}: its MEM was trained with other settings for {differ} than this config "
                         "(stage 2 must use the stage-1 schema and MEM layers; model.ablation no_hfa counts)")


def _load_mem_into_stage2(model: DistributedModelParallel, mem_run: str) -> str:
    """DCP-load the stage-1 MEM (its latest checkpoint) into the frozen MEM of the stage-2 model."""
    ckpt = checkpoint.latest_checkpoint(mem_run)
    if ckpt is None:
        raise FileNotFoundError(f"{mem_run}: no complete checkpoint of the MEM to fine-tune from")
    if read_run(mem_run)["stage"] != "mem":
        raise ValueError(f"{mem_run}: is not a stage 'mem' run")
    prefix2, prefix1 = "model.model.mem.", "model.model."
    state = {prefix1 + k[len(prefix2):]: v for k, v in train_state(model, None).items() if k.startswith(prefix2)}
    checkpoint.load(ckpt, state)
    return ckpt


def _log_record(run_dir: str, record: Dict[str, Any]) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def train(cfg: Config, stage: str, data_dir: str, run_dir: str, resume: bool = False,
          mem_run: Optional[str] = None) -> Dict[str, Any]:
    """Train one stage in the current process group (every rank calls it). Returns a summary (rank 0)."""
    info = init_distributed()
    torch.set_num_threads(cfg.train.threads)
    if stage == "tem" and stage2_uses_mem(cfg) and not mem_run:
        raise ValueError("stage tem needs --mem-run MEM_RUN_DIR (or model.ablation=no_mem_pretrain)")
    if stage == "tem" and stage2_uses_mem(cfg):
        check_mem_run(cfg, mem_run)  # type: ignore[arg-type]
    _prepare_run_dir(cfg, stage, data_dir, run_dir, resume, mem_run, info)
    model, optimizer, plan, plan_meta = assemble(cfg, stage, info)
    plan_record: Dict[str, Any] = {}
    if info.is_main:
        plan_path = os.path.join(run_dir, "plan.json")
        write_plan(plan, model.module if hasattr(model, "module") else model, plan_path,
                   {"stage": stage, "world_size": info.world_size, **plan_meta})
        with open(plan_path, encoding="utf-8") as f:
            plan_record = json.load(f)  # every checkpoint records the plan it was saved under
    if stage == "tem" and stage2_uses_mem(cfg):
        _load_mem_into_stage2(model, mem_run)  # type: ignore[arg-type]
    entity = "target" if stage == "tem" else None
    reader = ParquetReader(data_dir, "train", cfg.schema, cfg.data, rank=info.rank, world_size=info.world_size,
                           entity=entity)
    step, epoch = 0, 0
    latest = checkpoint.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        optimizer.init_state()  # create lazy optimizer state so DCP has tensors to load into
        state = train_state(model, optimizer)
        checkpoint.load(latest, state)
        extra = checkpoint.read_extra(latest)
        step, epoch = int(extra["step"]), int(extra["epoch"])
        reader.load_state_dict(extra["readers"][info.rank])
        if info.is_main:
            log.info("resumed %s from %s (step %d, epoch %d)", run_dir, latest, step, epoch)

    def save() -> None:
        readers = all_gather_objects(reader.state_dict(), info.world_size)
        checkpoint.save(run_dir, step, train_state(model, optimizer),
                        {"step": step, "epoch": epoch, "readers": readers, "world_size": info.world_size,
                         "stage": stage, "plan": plan_record}, info.is_main, cfg.train.keep_checkpoints)

    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "0"))
    tc = cfg.train
    rows_per_step = reader.plan.batch_size * info.world_size
    est_steps = tc.epochs * max(1, (reader.manifest.rows["train"]["target"] if entity else reader.num_rows())
                                // rows_per_step)
    if tc.max_steps:
        est_steps = min(est_steps, tc.max_steps)
    bar = _bar(est_steps, f"train {stage}", step, info.is_main)
    model.train()
    window_rows, window_start, last_loss = 0, time.perf_counter(), float("nan")
    done = tc.max_steps and step >= tc.max_steps
    while epoch < tc.epochs and not done:
        batches = iter(reader)
        while True:
            batch = next(batches, None)
            if not all_agree(batch is not None, info.device):
                break
            assert batch is not None
            batch = batch.to(info.device)
            loss, out = model(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            window_rows += len(batch)
            last_loss = float(out.loss)
            bar.update(1)
            if step % tc.log_every == 0:
                stats = torch.tensor([float(out.loss), float(out.bce), float(out.pdl), float(window_rows)])
                dist.all_reduce(stats)
                seconds = time.perf_counter() - window_start
                record = {"step": step, "epoch": epoch, "loss": float(stats[0]) / info.world_size,
                          "bce": float(stats[1]) / info.world_size, "pdl": float(stats[2]) / info.world_size,
                          "rows_per_s": float(stats[3]) / seconds, "dense_lr": tc.dense_lr,
                          "embedding_lr": tc.embedding_lr, "time": time.time()}
                if info.is_main:
                    _log_record(run_dir, record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", rows_s=f"{record['rows_per_s']:.0f}")
                    log.info("step %d epoch %d loss %.4f rows/s %.0f", step, epoch, record["loss"],
                             record["rows_per_s"])
                window_rows, window_start = 0, time.perf_counter()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                save()
            if fail_at and step == fail_at and info.rank == info.world_size - 1:
                os._exit(3)  # testing hook: simulate a rank dying mid-run
            if tc.max_steps and step >= tc.max_steps:
                done = True
                break
        if not done:
            epoch += 1
            reader.set_epoch(epoch)
    bar.close()
    final = checkpoint.latest_checkpoint(run_dir) if info.is_main else None
    final = all_gather_objects(final, info.world_size)[0]
    if final is None or not final.endswith(f"step-{step:08d}"):
        save()
    summary: Dict[str, Any] = {"run_dir": run_dir, "stage": stage, "steps": step, "epochs": epoch,
                               "loss": last_loss, "world_size": info.world_size}
    if stage == "tem":
        dist.barrier()
        if info.is_main:
            summary["serving"] = export_run(cfg, run_dir, data_dir)
        dist.barrier()
    return summary


def _bar(total: int, desc: str, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc=desc, unit="step", dynamic_ncols=True,
                disable=not enabled or os.environ.get("MKT_PROGRESS") == "0")


# --------------------------------------------------------------------------------------------------------
# Full (unsharded) state and the serving export
# --------------------------------------------------------------------------------------------------------


def load_unsharded(cfg: Config, stage: str, ckpt: str) -> nn.Module:
    """The stage module with real (unsharded) tables, loaded from a checkpoint without collectives."""
    module = build_train_module(cfg, stage, device=torch.device("cpu"))
    state = train_state(module, None)
    checkpoint.load(ckpt, state, no_dist=True)
    module.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return module


def export_run(cfg: Config, run_dir: str, data_dir: str) -> str:
    """Export RUN's final stage-2 model (or, for ``no_tem_finetune``, a MEM run) to RUN/serving/."""
    from mkt_torchrec.models.mkt import MEM
    from mkt_torchrec.models.serving import export_serving, padded_ids, serving_keys

    run = read_run(run_dir)
    ckpt = checkpoint.latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export")
    module = load_unsharded(cfg, run["stage"], ckpt).model.eval()
    final: nn.Module = module
    if isinstance(module, MEM) and cfg.model.ablation != "no_tem_finetune":
        raise ValueError(f"{run_dir}: a MEM run is served only under model.ablation=no_tem_finetune")
    reader = ParquetReader(data_dir, "test", cfg.schema, cfg.data, training=False, entity="target", batch_size=8)
    example = next(iter(reader))
    ids = padded_ids(example.sparse_features, cfg.schema, serving_keys(cfg.schema))
    return export_serving(cfg.schema, final, os.path.join(run_dir, "serving"), ids, example.dense_features)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


def _padded_stream(reader: ParquetReader, device: torch.device) -> Iterator[Tuple[Batch, bool]]:
    """Yield (batch, is_real) until every rank is done; a finished rank repeats its last batch as filler,
    because sharded lookups are collectives that every rank must join."""
    batches = iter(reader)
    last: Optional[Batch] = None
    while True:
        batch = next(batches, None)
        if not any_true(batch is not None, device):
            return
        if batch is None:
            if last is None:
                raise RuntimeError("this rank has no test rows at all while others do; use fewer ranks")
            yield last, False
        else:
            last = batch
            yield batch, True


def evaluate(cfg: Config, run_dir: str, data_dir: str) -> Dict[str, Any]:
    """Score the test split with the run's latest checkpoint; write predictions and RUN/metrics.json.

    The model (schema, layers, ablation, planner) is the run's own, from RUN/run.json; ``cfg`` contributes
    the evaluation settings (``eval``), batch size and threads.
    """
    from mkt_torchrec.evaluation.report_metrics import compute_metrics

    run = read_run(run_dir)
    evaluation = cfg
    cfg = run_config(run_dir)
    cfg.eval, cfg.train.threads, cfg.data.batch_size = evaluation.eval, evaluation.train.threads, evaluation.data.batch_size
    cfg.train.planner.plan_file = None  # evaluation may run at another world size: plan afresh
    info = init_distributed()
    torch.set_num_threads(cfg.train.threads)
    stage = run["stage"]
    ckpt = checkpoint.latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to evaluate")
    model = assemble(cfg, stage, info).model
    state = train_state(model, None)
    checkpoint.load(ckpt, state)
    model.eval()
    entity = "target" if stage == "tem" else None
    reader = ParquetReader(data_dir, "test", cfg.schema, cfg.data, rank=info.rank, world_size=info.world_size,
                           training=False, entity=entity)
    cols: Dict[str, list] = {"user_id": [], "entity": [], "label": [], "score": [], "activity": [],
                             "true_prob": []}
    names = {0: "source", 1: "target"}
    bar = _bar(reader.num_rows() // max(1, reader.plan.batch_size * info.world_size), "evaluate", 0, info.is_main)
    with torch.no_grad():
        for batch, real in _padded_stream(reader, info.device):
            _, out = model(batch.to(info.device))
            bar.update(1)
            if not real:
                continue
            cols["user_id"].append(batch.user_id.numpy())
            cols["entity"] += [names[int(e)] for e in batch.entity.tolist()]
            cols["label"].append(batch.labels.numpy())
            cols["score"].append(torch.sigmoid(out.logits.float()).cpu().numpy())
            if batch.activity is not None:
                cols["activity"].append(batch.activity.numpy())
            if batch.true_prob is not None:
                cols["true_prob"].append(batch.true_prob.numpy())
    bar.close()
    import numpy as np

    pred_dir = os.path.join(run_dir, "predictions")
    if info.is_main:
        os.makedirs(pred_dir, exist_ok=True)
    dist.barrier()
    def column(name: str, dtype: Any) -> pa.Array:
        return pa.array(np.concatenate(cols[name]) if cols[name] else np.zeros(0, dtype))

    arrays = {"user_id": column("user_id", np.int64), "entity": pa.array(cols["entity"], pa.string()),
              "label": column("label", np.float32), "score": column("score", np.float32)}
    has = reader.manifest.optional_columns
    if "activity" in has:
        arrays["activity"] = column("activity", np.int64)
    if "true_prob" in has:
        arrays["true_prob"] = column("true_prob", np.float32)
    table = pa.table(arrays)
    path = os.path.join(pred_dir, f"part-{info.rank:05d}.parquet")
    pq.write_table(table, path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    metrics: Dict[str, Any] = {}
    if info.is_main:
        metrics = compute_metrics(pred_dir, cfg.eval)
        metrics["run_dir"] = run_dir
        metrics["checkpoint"] = os.path.basename(ckpt)
        metrics["stage"] = stage
        metrics["ablation"] = cfg.model.ablation
        _write_json(os.path.join(run_dir, "metrics.json"), metrics)
    dist.barrier()
    return metrics
