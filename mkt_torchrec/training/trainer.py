"""The distributed two-stage trainer and the distributed evaluation pass.

Assembly follows TorchRec's canonical order: the stage module is built with its tables on the ``meta``
device -> the embedding optimizer is fused into backward (``apply_optimizer_in_backward``) for the tables
that train -> the planner's ``collective_plan`` (or a plan file from ``mkt plan``) -> ``DistributedModelParallel``
-> a ``CombinedOptimizer`` of the fused optimizer and a dense optimizer for everything else.

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
    RUN/predictions/, RUN/metrics.json   written by ``evaluate``
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, replace
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from mkt_torchrec import faults, logs
from mkt_torchrec.collective import Collective
from mkt_torchrec.config import Config, config_from_dict
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.data.dataset import open_dataset_shared
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.planning.plan import (FROZEN_MODULE, attach_embedding_optimizer, embedding_optimizer_kwargs,
                                       frozen_module, load_plan, make_plan, manifest_pooling, sharders, write_plan)
from mkt_torchrec.training import checkpoint, device_check, runlock
from mkt_torchrec.training.build import (build_train_module, compile_dense, dense_lr, stage2_uses_mem,
                                         stage_entity, stage_transfer)
from mkt_torchrec.training.distributed import DistInfo, all_gather_objects, all_sum, init_distributed

log = logging.getLogger("mkt.train")

_DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}


def dense_optimizer(cfg: Config, params: Any, lr: float) -> torch.optim.Optimizer:
    """``train.dense_optimizer`` over ``params``, fused (one kernel for all parameters, on CPU and CUDA) where
    torch has a fused implementation: the same update rule as the per-tensor loop, with far fewer launches."""
    return _DENSE_OPTIMIZERS[cfg.train.dense_optimizer](params, lr=lr, fused=True)


def configure_dense_math(cfg: Config) -> None:
    """``train.tf32``: TensorFloat-32 matmuls / convolutions on CUDA (the flags do nothing on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    torch.backends.cudnn.allow_tf32 = cfg.train.tf32


# --------------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------------


def _compute_device(cfg: Config, info: DistInfo, plan_file: Optional[str] = None) -> str:
    """The device type the plan is for: ``train.planner.compute_device``, or this rank's. A job that asked for CUDA
    (the setting, or a plan file made for cuda) and runs on the CPU stops here, saying why it has no GPU."""
    choice = cfg.train.planner.compute_device
    wanted = {"train.planner.compute_device=cuda"} if choice == "cuda" else set()
    if plan_file:
        try:
            with open(plan_file, encoding="utf-8") as f:
                if (json.load(f) or {}).get("compute_device") == "cuda":
                    wanted.add(f"the plan file {plan_file} is for cuda")
        except (OSError, ValueError, AttributeError):
            pass  # load_plan names what is wrong with the file
    if wanted and info.device.type != "cuda":
        from mkt_torchrec.training.distributed import cuda_unavailable_reason

        raise ValueError(f"{' and '.join(sorted(wanted))}, but this job runs on {info.device.type}: "
                         f"{cuda_unavailable_reason()}")
    return info.device.type if choice == "auto" else choice


def _dmp_device(info: DistInfo) -> torch.device:
    """The device DMP places the model on. Under the accelerator emulation the rank's device object is
    ``cpu:0``, and ``Tensor.to(cpu:0)`` copies even on the CPU: DMP's ``.to(device)`` would then leave the
    data_parallel tables computing with a copy that initialisation and checkpoints never reach. The emulated
    rank's memory is the host's, so DMP gets ``cpu`` (what ``cuda:L`` is to a GPU rank: its own memory)."""
    return torch.device("cpu") if device_check.enabled() and info.device == device_check.EMULATED_DEVICE \
        else info.device


class Assembled(NamedTuple):
    model: DistributedModelParallel
    optimizer: CombinedOptimizer
    plan: Any  # torchrec ShardingPlan
    plan_meta: Dict[str, Any]  # local_world_size, compute_device (recorded in RUN/plan.json)
    replicated: Dict[str, str]  # param name -> table name of the trainable data_parallel tables


def _under(name: str, prefix: Optional[str]) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def _replicated_tables(model: nn.Module, plan: Any, frozen: Optional[str]) -> Dict[str, str]:
    """Parameter name -> table name of every trainable table the plan replicates (data_parallel)."""
    params = dict(model.named_parameters())
    out = {}
    for path, module_plan in plan.plan.items():
        if _under(path, frozen):
            continue
        for table, ps in module_plan.items():
            if ps.sharding_type == "data_parallel":
                for attr in ("embedding_bags", "embeddings"):
                    name = f"{path}.{attr}.{table}.weight"
                    if name in params:
                        out[name] = table
    return out


def _embedding_optimizer_for_replicated(cfg: Config, params: Dict[str, nn.Parameter]) -> KeyedOptimizerWrapper:
    """The configured embedding optimizer, as a regular optimizer, for data_parallel tables (which TorchRec
    trains with a dense kernel and no fused optimizer). Same update rule and hyper-parameters as fbgemm's."""
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    name = cfg.train.embedding_optimizer
    classes = {"rowwise_adagrad": RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    if name not in classes:  # a lazy Adam cannot be reproduced densely; plans never replicate under it
        raise ValueError(f"train.embedding_optimizer={name}: data_parallel tables {sorted(params)} cannot use it; "
                         "re-plan (the planner avoids data_parallel under adam) or use another plan file")
    kwargs = embedding_optimizer_kwargs(cfg)
    return KeyedOptimizerWrapper(params, lambda ps: classes[name](ps, **kwargs))


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping arithmetic): a counter-based hash, element by element."""
    x = x ^ ((x >> 30) & 0x3FFFFFFFF)
    x = x * -4658895280553007687  # 0xbf58476d1ce4e5b9 as int64
    x = x ^ ((x >> 27) & 0x1FFFFFFFFF)
    x = x * -7723592293110705685  # 0x94d049bb133111eb as int64
    return x ^ ((x >> 31) & 0x1FFFFFFFF)


_INIT_CHUNK_ELEMENTS = 1 << 22  # entries hashed at once by init_tables: about 150 MB of temporaries at most


def _table_values(seed: int, table: str, rows: int, row0: int, col0: int, shape: Tuple[int, int], dim: int,
                  device: Optional[torch.device] = None) -> torch.Tensor:
    """Uniform(-1/sqrt(rows), 1/sqrt(rows)) values of rows ``row0..`` / columns ``col0..`` of a table: a hash of
    (seed, table, row, column), so every shard of every plan draws exactly the values of the same entries.
    Computed on ``device`` (default CPU): integer hashing and exact float64 steps, the same bits on any device."""
    import zlib

    salt = (zlib.crc32(table.encode()) << 20) ^ (seed * 0x9E3779B9)
    r = torch.arange(row0, row0 + shape[0], dtype=torch.int64, device=device).unsqueeze(1)
    c = torch.arange(col0, col0 + shape[1], dtype=torch.int64, device=device).unsqueeze(0)
    h = _mix(r * dim + c + salt)
    unit = ((h >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)  # [0, 1)
    bound = 1.0 / math.sqrt(rows)
    return ((unit * 2.0 - 1.0) * bound).float()


def init_tables(model: nn.Module, seed: int) -> None:
    """Initialise every embedding table from (seed, table, row, column) alone, whatever the plan.

    TorchRec initialises each shard with the rank's random state, so the same seed gave other tables on another
    world size or plan; here a counter-based hash gives every entry one value (TorchRec's default distribution,
    uniform(+-1/sqrt(rows))). Each rank fills only its own shards, in place, through the state dict's views, on
    the shard's own device and in chunks of rows (``_INIT_CHUNK_ELEMENTS`` entries), so the temporaries stay
    small whatever the table's size.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def fill(t: torch.Tensor, table: str, rows: int, dim: int, r0: int, c0: int) -> None:
        step = max(1, _INIT_CHUNK_ELEMENTS // max(1, t.shape[1]))
        for i in range(0, t.shape[0], step):
            part = t[i:i + step]  # (chunk rows, shard columns), a view
            part.copy_(_table_values(seed, table, rows, r0 + i, c0, tuple(part.shape), dim, device=t.device))

    with torch.no_grad():
        for key, value in model.state_dict().items():
            parts = key.split(".")
            if len(parts) < 3 or parts[-1] != "weight" or parts[-3] not in ("embedding_bags", "embeddings"):
                continue
            table = parts[-2]
            if isinstance(value, ShardedTensor):
                rows, dim = value.size()
                for shard in value.local_shards():
                    (r0, c0), t = shard.metadata.shard_offsets, shard.tensor
                    fill(t, table, rows, dim, r0, c0)
            elif value.dim() == 2 and value.numel():
                rows, dim = value.shape
                fill(value, table, rows, dim, 0, 0)


def assemble(cfg: Config, stage: str, info: DistInfo, plan_file: Optional[str] = None,
             manifest: Optional[Any] = None) -> Assembled:
    """Build, plan and shard the stage module; build its optimizer.

    Every trainable table trains with the configured embedding optimizer, whatever its sharding: fused into
    backward for sharded tables, the same rule as a regular optimizer for data_parallel ones. Stage 2's frozen
    MEM is in no optimizer and not in DDP. Tables are initialised the same way under every plan
    (:func:`init_tables`), so a seed gives the same model at any world size. The planner costs each feature with
    the dataset's measured mean ids per row (``manifest``; see ``train.planner.pooling_factors``).
    """
    torch.manual_seed(cfg.train.seed)
    module = build_train_module(cfg, stage, device=torch.device("meta"))
    if cfg.train.compile:
        compile_dense(module)
    module.autocast_device = info.device.type if cfg.train.precision == "bf16" else None  # see precision_context
    attach_embedding_optimizer(module, cfg, stage)  # fused into backward, for the tables that train
    frozen = FROZEN_MODULE.get(stage) if frozen_module(module, stage) is not None else None
    frozen_names = [n for n, _ in module.named_parameters() if _under(n, frozen)]
    local_world = cfg.train.planner.local_world_size or info.local_world_size
    plan_file = plan_file or cfg.train.planner.plan_file
    device_type = _compute_device(cfg, info, plan_file)
    if plan_file:
        plan = load_plan(plan_file, module, info.world_size, local_world, device_type)
    else:
        plan = make_plan(module, cfg, info.world_size, local_world, device_type, pg=dist.group.WORLD,
                         pooling=manifest_pooling(manifest) if manifest is not None else None)
    model = DistributedModelParallel(
        module=module, env=ShardingEnv.from_process_group(dist.group.WORLD), device=_dmp_device(info), plan=plan,
        sharders=sharders(),
        # every dense parameter gets a gradient every step (the MEM runs both entity paths on all rows; the frozen
        # MEM is not in DDP), so DDP need not search the graph for unused ones
        data_parallel_wrapper=DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=False,
                                                         params_to_ignore=frozen_names),
    )
    init_tables(model, cfg.train.seed)
    replicated = _replicated_tables(model, plan, frozen)
    params = dict(model.named_parameters())
    dense = {n: p for n, p in params.items() if p.requires_grad and not hasattr(p, "_in_backward_optimizers")
             and n not in replicated and not _under(n, frozen)}
    parts: List[Tuple[str, Any]] = []
    for key, opt in model.fused_optimizer.optimizers:
        names = [CombinedOptimizer.prepend_opt_key(n, key) for n in opt.params]
        if not (names and all(_under(n, frozen) for n in names)):  # the frozen MEM's tables train with nothing
            parts.append((key, opt))
    if replicated:
        parts.append(("", _embedding_optimizer_for_replicated(cfg, {n: params[n] for n in replicated})))
    lr = dense_lr(cfg, stage)
    parts.append(("", KeyedOptimizerWrapper(dense, lambda ps: dense_optimizer(cfg, ps, lr))))
    optimizer = CombinedOptimizer(parts)
    if device_check.enabled():  # tests: sharded state placed as TorchRec places it on a GPU (rank:R/cuda:L)
        device_check.place_on_accelerator([model.state_dict(), optimizer.state_dict()["state"]], local_world)
    return Assembled(model, optimizer, plan, {"local_world_size": local_world, "compute_device": device_type},
                     replicated)


# A data_parallel table's optimizer (a regular torch optimizer) names its state differently from fbgemm's fused
# one; checkpoints use fbgemm's names, so a table's optimizer state survives a plan that shards it another way.
_REPLICATED_STATE = {"sum": "momentum1"}  # ("step" counts steps; unused without lr_decay: not saved)


def train_state(model: nn.Module, optimizer: Optional[CombinedOptimizer],
                replicated: Optional[Dict[str, str]] = None, rowwise: bool = False) -> Dict[str, Any]:
    """Tensors of model (and optimizer) state, flat, for DCP. Values alias the live tensors.

    Args:
        model: the (sharded) model.
        optimizer: its optimizer, or None for the model only.
        replicated: param name -> table name of the data_parallel tables (their state is saved under the
            names the fused optimizer of a sharded table uses: ``optim.<param>.<table>.momentum1``).
        rowwise: the embedding optimizer keeps one value per row (rowwise adagrad): a replicated table's
            ``(rows, 1)`` state is saved as the fused optimizer's ``(rows,)``.
    """
    state: Dict[str, Any] = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optimizer is not None:
        replicated = replicated or {}
        for key, per_param in optimizer.state_dict()["state"].items():
            table = replicated.get(key)
            for name, value in per_param.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if table is not None:
                    if name not in _REPLICATED_STATE:
                        continue
                    value = value.view(-1) if rowwise else value
                    name = f"{table}.{_REPLICATED_STATE[name]}"
                state[f"optim.{key}.{name}"] = value
    return state


def state_of(asm: "Assembled", cfg: Config) -> Dict[str, Any]:
    """Checkpoint state of an assembled stage (model + every optimizer), less stage 2's frozen MEM: its tensors are
    the MEM run's checkpoint, which a stage-2 checkpoint records (``extra.json``'s :data:`MEM_RECORD`) instead of
    holding a second copy (:func:`load_run_checkpoint` reads both)."""
    state = train_state(asm.model, asm.optimizer, asm.replicated, cfg.train.embedding_optimizer == "rowwise_adagrad")
    return {k: v for k, v in state.items() if not k.startswith(_MEM_IN_STAGE2)}


# Stage 2's frozen MEM (``FROZEN_MODULE``) in train_state's keys, and where the MEM run's checkpoint holds the same
# tensors (stage 1's module is ``MEMTrain(MEM)``: ``model.`` + the loss wrapper's ``model.``).
_MEM_IN_STAGE2, _MEM_IN_STAGE1 = f"model.{FROZEN_MODULE['tem']}.", "model.model."
MEM_RECORD = "mem_checkpoint"  # extra.json of a stage-2 checkpoint: the MEM checkpoint its frozen MEM is


def _mem_digest(ckpt: str) -> str:
    """sha256 of a checkpoint's DCP ``.metadata``: it lists every tensor (key, shape, dtype), every chunk's file,
    offset and length, and DCP's id of the save (a new uuid per save), so any re-save changes it; reading it costs
    a few MB where hashing the tensor files would read the whole MEM (18 GB at the industrial size) each time."""
    import hashlib

    with open(os.path.join(ckpt, ".metadata"), "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def mem_record(ckpt: str) -> Dict[str, Any]:
    """What a stage-2 checkpoint records of the MEM checkpoint it was trained with: path, step and digest."""
    return {"path": os.path.abspath(ckpt), "step": int(checkpoint.read_extra(ckpt)["step"]),
            "digest": _mem_digest(ckpt)}


def _recorded_mem(ckpt: str, record: Dict[str, Any]) -> str:
    """The MEM checkpoint the stage-2 checkpoint ``ckpt`` records; a ValueError (one line, naming both) if it is
    gone or changed since."""
    path = str(record.get("path"))
    now = _mem_digest(path) if os.path.isfile(os.path.join(path, ".metadata")) else None
    if now != record.get("digest"):
        state = "is missing" if now is None else f"has changed since (now {now})"
        raise ValueError(f"{ckpt}: was trained with the frozen MEM checkpoint {path} ({record.get('digest')}), which "
                         f"{state}; restore that MEM checkpoint, or train stage 2 anew in a new --run-dir")
    return path


def load_run_checkpoint(ckpt: str, state: Dict[str, Any], no_dist: bool = False) -> None:
    """Load a run's checkpoint into ``state`` (keys as :func:`train_state`'s) in place.

    A stage-2 checkpoint's frozen-MEM keys are read from the MEM checkpoint it records (refused if that changed
    since); a stage-2 checkpoint without that record (saved before stage 2 left the MEM out) holds them itself."""
    frozen = {k: v for k, v in state.items() if k.startswith(_MEM_IN_STAGE2)}
    record = checkpoint.read_extra(ckpt).get(MEM_RECORD) if frozen else None
    if record is None:
        checkpoint.load(ckpt, state, no_dist=no_dist)
        return
    mem = _recorded_mem(ckpt, record)
    own = {k: v for k, v in state.items() if k not in frozen}
    if own:
        checkpoint.load(ckpt, own, no_dist=no_dist)
    checkpoint.load(mem, {_MEM_IN_STAGE1 + k[len(_MEM_IN_STAGE2):]: v for k, v in frozen.items()}, no_dist=no_dist)


# --------------------------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
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
        _write_json(os.path.join(run_dir, "run.json"), {
            "stage": stage, "config": cfg.to_dict(), "data": os.path.abspath(data_dir),
            "mem_run": os.path.abspath(mem_run) if mem_run else None, "world_size": info.world_size,
            "created": (previous or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%S")),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    lock = Collective(info.device).on_root(prepare)
    return lock if info.is_main else None


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


def _load_mem_into_stage2(model: DistributedModelParallel, mem_run: str, resumed: Optional[str] = None
                          ) -> Dict[str, Any]:
    """DCP-load the stage-1 MEM into stage 2's frozen MEM: the MEM checkpoint that the stage-2 checkpoint
    ``resumed`` records (refused if it changed since), else the MEM run's best-validated, else latest checkpoint.
    Returns its :func:`mem_record`, which every stage-2 checkpoint records."""
    if read_run(mem_run)["stage"] != "mem":
        raise ValueError(f"{mem_run}: is not a stage 'mem' run")
    record = checkpoint.read_extra(resumed).get(MEM_RECORD) if resumed else None
    if record is not None:
        ckpt = _recorded_mem(resumed, record)  # type: ignore[arg-type]
    else:  # a new stage 2 (or one resumed from a checkpoint that holds its MEM itself: that copy is not read)
        ckpt = checkpoint.final_checkpoint(mem_run)
        if ckpt is None:
            raise FileNotFoundError(f"{mem_run}: no complete checkpoint of the MEM to fine-tune from")
        record = mem_record(ckpt)
    state = {_MEM_IN_STAGE1 + k[len(_MEM_IN_STAGE2):]: v for k, v in train_state(model, None).items()
             if k.startswith(_MEM_IN_STAGE2)}
    checkpoint.load(ckpt, state)
    return record


TEM_FROM_MEM = ("sparse_arch.", "group_arch.attention.")  # what ``model.tem.init_from_mem`` copies


def _init_tem_from_mem(model: DistributedModelParallel, ckpt: str) -> List[str]:
    """``model.tem.init_from_mem``: DCP-load the TEM's embedding tables and sequence encoder from the stage-1
    MEM's checkpoint ``ckpt`` (the same module paths under the MEM; DCP reshards to the TEM's own plan). Tables
    the MEM does not hold, or holds with another shape, keep their initialisation. Returns the TEM keys loaded."""
    tem, mem = "model.model.tem.", "model.model."
    sizes = checkpoint.global_sizes(ckpt)
    state = {}
    for key, value in train_state(model, None).items():
        if not key.startswith(tem) or not key[len(tem):].startswith(TEM_FROM_MEM):
            continue
        source = mem + key[len(tem):]
        if sizes.get(source) == tuple(_global_size(value)):
            state[source] = value
    checkpoint.load(ckpt, state)
    return sorted(tem + k[len(mem):] for k in state)


def _check_pretraining_run(cfg: Config, mem_run: Optional[str]) -> None:
    """A baseline's fine-tuning stage needs its own pre-training run: same model and schema."""
    if not mem_run:
        raise ValueError(f"model.name={cfg.model.name} stage tem fine-tunes a pre-trained model: pass --mem-run "
                         "with its stage-mem run")
    theirs = run_config(mem_run)
    if read_run(mem_run)["stage"] != "mem":
        raise ValueError(f"{mem_run}: is not a stage 'mem' run")
    differ = [k for k in ("name", "baselines") if getattr(theirs.model, k) != getattr(cfg.model, k)]
    differ += ["schema"] if theirs.schema != cfg.schema else []
    if differ:
        raise ValueError(f"{mem_run}: was pre-trained with other settings for {differ} than this config")


def _transfer_from_pretraining(model: DistributedModelParallel, mem_run: str, prefixes: tuple) -> str:
    """DCP-load the tensors under ``prefixes`` (the registry's transfer list) from the pre-training run's final
    checkpoint into this stage's model; they then train with everything else."""
    ckpt = checkpoint.final_checkpoint(mem_run)
    if ckpt is None:
        raise FileNotFoundError(f"{mem_run}: no complete checkpoint to fine-tune from")
    state = {k: v for k, v in train_state(model, None).items()
             if any(k[len("model."):].startswith(p) for p in prefixes)}
    checkpoint.load(ckpt, state)
    return ckpt


def _log_record(run_dir: str, record: Dict[str, Any]) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


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


def _weighted(batch: Batch, global_rows: float, world_size: int, real: bool) -> Batch:
    """The batch with its loss weights: ``world_size / rows of the global step`` for real rows, 0 for filler.

    DDP and TorchRec's sharded tables both average gradients over ranks; weighting each rank's rows by
    ``world_size / global rows`` makes that average the gradient of the mean over the global step's rows, so
    training does not depend on how rows are split over ranks (or on a rank having only filler).
    """
    value = world_size / global_rows if real else 0.0
    return replace(batch, weights=torch.full((len(batch),), value, dtype=torch.float32))


class _Fed(NamedTuple):
    """One batch the feed handed to the pipeline, and what the trainer needs to know of it once trained."""

    batch: Batch  # host memory (pinned on CUDA), loss weights set
    epoch: int  # the reader's epoch it belongs to
    rows: int  # this rank's real rows (0: filler)
    global_rows: int  # real rows of the step, all ranks together
    reader_state: Dict[str, Any]  # this rank's reader position after it
    epoch_end: bool  # the last step of its epoch


class _Feed:
    """Loss-weighted batches for a train pipeline, without any collective or host sync.

    The reader's step schedule (:meth:`ParquetReader.step_rows`) gives every rank, from the manifest alone, the
    number of steps left in the epoch and the rows all ranks train at each. So a rank that has run out of rows
    steps on a zero-weight filler batch until the epoch's last step (sharded lookups are collectives every rank
    joins), and each row's loss weight, ``world_size / rows of the step`` (see :func:`_weighted`), needs no
    all-reduce. The pipeline pulls batches ahead of the step it trains, so the feed keeps what it handed out in
    ``handed``, in order: the trainer pops one per trained step and so knows the reader position to checkpoint.

    On a GPU the batches are pinned (page-locked, so the pipeline's host-to-device copy is non-blocking) by a
    thread of the feed's own, :data:`PIN_AHEAD` batches ahead of the pipeline, so the main thread never waits for
    the copy into pinned memory. The thread runs the reader and hands its batches over in order: the batches,
    their order and the reader positions are the same as without it.

    Args:
        reader: this rank's reader, at the position to continue from (only the feed touches it until the feed
            is exhausted).
        info: the process group.
        epochs: stop at the end of this epoch count.
        steps: stop after this many batches (None: no limit).
        pin: what makes a batch's pinned copy (default: ``Batch.pin_memory`` on a CUDA device, none elsewhere).
    """

    def __init__(self, reader: ParquetReader, info: DistInfo, epochs: int, steps: Optional[int],
                 pin: Optional[Callable[[Batch], Batch]] = None) -> None:
        self.reader, self.world_size = reader, info.world_size
        self.epochs, self.steps = epochs, steps
        self.pin = pin if pin is not None else (Batch.pin_memory if info.device.type == "cuda" else None)
        self.handed: Deque[_Fed] = deque()
        self._filler: Optional[Batch] = None
        self._batches: Iterator[_Fed] = self._generate()
        if self.pin is not None:
            self._batches = _Ahead(self._pinned(self._batches), PIN_AHEAD)

    def __iter__(self) -> "_Feed":
        return self

    def __next__(self) -> Batch:
        fed = next(self._batches)
        self.handed.append(fed)
        return fed.batch

    def _pinned(self, fed: Iterator[_Fed]) -> Iterator[_Fed]:
        for f in fed:
            yield f._replace(batch=self.pin(f.batch))  # type: ignore[misc]

    def _generate(self) -> Iterator[_Fed]:
        left = self.steps
        while self.reader.epoch < self.epochs:
            epoch = self.reader.epoch
            schedule = self.reader.step_rows()
            mine = self.reader.batches_left()
            batches = iter(self.reader)
            for i, global_rows in enumerate(schedule):
                if left is not None and left <= 0:
                    return
                batch = next(batches) if i < mine else None
                if batch is not None:
                    self._filler = batch
                else:
                    batch = self._filler if self._filler is not None else self.reader.first_batch()
                rows = len(batch) if i < mine else 0
                batch = _weighted(batch, global_rows, self.world_size, real=rows > 0)
                yield _Fed(batch, epoch, rows, global_rows, self.reader.state_dict(), i == len(schedule) - 1)
                if left is not None:
                    left -= 1
            if next(batches, None) is not None:  # ending the iteration moves the reader to the next epoch
                raise RuntimeError(f"the reader yielded more than the {mine} batches its schedule counts")


PIN_AHEAD = 2  # batches the feed's pinning thread prepares ahead of the pipeline (which holds two more)


class _Ahead:
    """Runs an iterator in a daemon thread, ``depth`` items ahead of the consumer, handing items (and the
    iterator's exception, if it raises) over in order through a bounded queue."""

    _END = object()

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        import queue
        import threading

        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(source,), name="mkt-feed-pin", daemon=True)
        self._thread.start()

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                self._queue.put((item, None))
            self._queue.put((self._END, None))
        except BaseException as e:  # noqa: BLE001 - raised again in the consumer's thread
            self._queue.put((self._END, e))

    def __iter__(self) -> "_Ahead":
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if item is self._END:
            self._done = True
            self._thread.join()
            if error is not None:
                raise error
            raise StopIteration
        return item


def make_pipeline(model: nn.Module, optimizer: Any, device: torch.device) -> Any:
    """TorchRec's ``TrainPipelineSparseDist`` over the sharded model.

    Why this pipeline: it overlaps the next batch's host-to-device copy and the sharded modules' input
    distribution (the id all-to-alls) with the current step's forward and backward, keeps the plain
    forward / backward / step order (so training equals the serial loop), and needs nothing of the model beyond
    FX-traceability around its sharded modules. The semi-sync and prefetch variants change the update order or
    need UVM caching, which our plans do not use. On CPU there are no side streams, so it overlaps nothing but
    runs the same code.
    """
    from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)


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
        _check_pretraining_run(cfg, mem_run)
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
        mem_used = _load_mem_into_stage2(model, mem_run, latest)  # type: ignore[arg-type]
        if cfg.model.tem.init_from_mem and latest is None:
            loaded = _init_tem_from_mem(model, mem_used["path"])
            if info.is_main:
                log.info("model.tem.init_from_mem: the TEM starts from %d tensors of %s", len(loaded),
                         mem_used["path"])
    if stage_transfer(cfg, stage) and latest is None:  # else in the checkpoint
        _transfer_from_pretraining(model, mem_run, stage_transfer(cfg, stage))  # type: ignore[arg-type]
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
        _truncate_log(run_dir, step, info.is_main)
        if info.is_main:
            log.info("resumed %s from %s (step %d, epoch %d, saved by %d ranks, now %d)", run_dir, latest, step,
                     epoch, int(extra.get("world_size", 0)), info.world_size)

    saver = checkpoint.AsyncCheckpointer(run_dir, info.is_main, cfg.train.keep_checkpoints)
    cadence = _Cadence(cfg.train, info.is_main)
    tc = cfg.train
    validating = tc.patience > 0
    epochs = tc.max_epochs if validating else tc.epochs
    valid_entity = "source" if entity == "source" else "target"  # the target entity's GAUC is what counts
    validation = _Validation(cfg, data_dir, run_dir, info, manifest, valid_entity) if validating else None
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
    bar = _bar(est_steps, f"train {stage}", step, info.is_main)
    model.train()
    pipeline = make_pipeline(model, optimizer, info.device)
    window_rows, window_start = 0, time.perf_counter()
    stats = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss, bce, pdl summed since the last log
    window_steps, last_loss = 0, float("nan")
    stopped = validating and best is not None and since_best >= tc.patience  # resumed after the early stop
    faults.fault_point("train", info.rank)
    while reader.epoch < epochs and not stopped and (steps_left is None or steps_left > 0):
        feed = _Feed(reader, info, reader.epoch + 1, steps_left)  # one epoch: validation runs between epochs
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
                                                window_start, step, epoch, bar, cadence)
                runlock.refresh(lock)
                stats.zero_()
                window_rows, window_steps, window_start = 0, 0, time.perf_counter()
            if fed.epoch_end:
                if info.is_main:
                    _log_record(run_dir, {"epoch_end": epoch, "step": step, "rows_trained": epoch_rows,
                                          "rows_in_split": split_rows})
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
            _log_record(run_dir, {"validation": epoch, "step": step, **metrics, "best_epoch": best["epoch"],
                                  "early_stop": stopped})
            log.info("epoch %d validation (%s rows): GAUC %.4f AUC %.4f; best epoch %d%s", epoch, valid_entity,
                     metrics["gauc"], metrics["auc"], best["epoch"], " - stopping early" if stopped else "")
        save()  # every validated epoch: a resumed run continues the early stopping from here; `best` points at
        # the best one
    bar.close()
    if window_steps:
        last_loss, _ = _log_step(run_dir, cfg, stage, info, stats, window_steps, window_rows, window_start, step,
                                 epoch, bar, cadence)
    saver.wait()
    final = checkpoint.latest_checkpoint(run_dir) if info.is_main else None
    final = all_gather_objects(final, info.world_size)[0]
    if final is None or not final.endswith(f"step-{step:08d}"):
        save()
        saver.wait()
    dist.barrier()
    return {"run_dir": run_dir, "stage": stage, "steps": step, "epochs": reader.epoch, "loss": last_loss,
            "world_size": info.world_size, "best": best}


def load_train_state(asm: Assembled, cfg: Config, ckpt: str, saved_plan: Dict[str, Any]) -> None:
    """Load a checkpoint into an assembled stage, whatever world size and plan it was saved under.

    DCP reshards every tensor whose global shape is the same under both plans. The one state that changes shape
    is a row-wise optimizer's (rowwise adagrad) momentum of a column-wise sharded table: fbgemm keeps one value per
    row *and column shard* (``rows x shards``). It is carried through its plan-independent form, one value per
    row, the column-width-weighted mean over the saved shards (exact: each value is a running mean of squared
    gradients over its columns); every new column shard starts from that mean (exact when the shards are the same).
    Stage 2's frozen MEM is not part of it (:func:`state_of`): the trainer loads it from the MEM checkpoint the
    stage-2 checkpoint records first (``_load_mem_into_stage2``).

    Args:
        asm: the assembled stage.
        cfg: its config.
        ckpt: the checkpoint directory.
        saved_plan: the plan record the checkpoint was saved under (its ``extra.json``), for column widths.

    Raises:
        ValueError: a tensor of another shape that is not such a momentum (another model, naming the key).
    """
    asm.optimizer.init_state()  # create lazy optimizer state so DCP has tensors to load into
    state = state_of(asm, cfg)
    saved = checkpoint.global_sizes(ckpt)
    regroup = {k: v for k, v in state.items() if k in saved and tuple(_global_size(v)) != saved[k]}
    for key in regroup:
        if not (key.startswith("optim.") and key.endswith(".momentum1") and len(saved[key]) == 1):
            raise ValueError(f"{ckpt}: {key} has shape {list(saved[key])} there but "
                             f"{list(_global_size(regroup[key]))} in this model")
    _drop_state(asm.optimizer, checkpoint.load(ckpt, {k: v for k, v in state.items() if k not in regroup},
                                               optional_prefix="optim."))
    # a rank holds the optimizer state of its own shards only: agree on the keys, then load them collectively
    keys = sorted(set().union(*all_gather_objects(sorted(regroup), dist.get_world_size())))
    if not keys:
        return
    full = {k: torch.empty(saved[k]) for k in keys}
    checkpoint.load(ckpt, full)  # every rank reads these (one float per row and column shard)
    with torch.no_grad():
        for key, target in regroup.items():
            per_row = _rowwise_mean(full[key], key, saved_plan)
            repeated = per_row.repeat(_global_size(target)[0] // per_row.numel())
            for offset, local in _local_pieces(target):
                local.copy_(repeated[offset:offset + local.numel()].to(local.device))


def _global_size(t: Any) -> tuple:
    return tuple(t.size())


def _local_pieces(t: Any) -> List[Tuple[int, torch.Tensor]]:
    """(offset, tensor) of this rank's pieces of a 1-d tensor, sharded or not."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(t, ShardedTensor):
        return [(int(s.metadata.shard_offsets[0]), s.tensor) for s in t.local_shards()]
    return [(0, t)]


def _rowwise_mean(saved: torch.Tensor, key: str, saved_plan: Dict[str, Any]) -> torch.Tensor:
    """One value per row from a saved ``rows x column shards`` row-wise momentum, weighted by shard widths."""
    name = key[len("optim."):]
    for attr in (".embedding_bags.", ".embeddings."):
        if attr in name:
            module, table = name.split(attr)[0], name.split(attr)[1].split(".")[0]
            break
    else:
        raise ValueError(f"{key}: not an embedding table's optimizer state")
    entry = (saved_plan.get("modules") or {}).get(module, {}).get(table) or {}
    widths = [s[3] for s in (entry.get("shards") or [])] if entry.get("sharding_type") in (
        "column_wise", "table_column_wise") else []
    rows = int(entry["rows"]) if "rows" in entry else saved.numel() // max(1, len(widths))
    blocks = saved.view(-1, rows)  # (column shards, rows)
    if len(widths) != blocks.shape[0]:
        widths = [1] * blocks.shape[0]
    w = torch.tensor(widths, dtype=torch.float64).unsqueeze(1) / float(sum(widths))
    return (blocks.double() * w).sum(0).float()  # (rows,)


def _drop_state(optimizer: CombinedOptimizer, absent: set) -> None:
    """Forget the optimizer state ``init_state`` made for parameters the checkpoint had none for (they had no
    gradient yet), so the resumed run steps exactly as the uninterrupted one."""
    for key, opt in optimizer.optimizers:
        for name, param in opt.params.items():
            full = CombinedOptimizer.prepend_opt_key(name, key)
            per_param = opt.state.get(param, {})
            names = [n for n, v in per_param.items() if isinstance(v, torch.Tensor)]
            if names and all(f"optim.{full}.{n}" in absent for n in names):
                del opt.state[param]


def _log_step(run_dir: str, cfg: Config, stage: str, info: DistInfo, stats: torch.Tensor, steps: int, rows: int,
              start: float, step: int, epoch: int, bar: Any, cadence: "_Cadence") -> Tuple[float, bool]:
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
        _log_record(run_dir, record)
        bar.set_postfix(loss=f"{loss:.4f}", rows_s=f"{record['rows_per_s']:.0f}")
        log.info("step %d epoch %d loss %.4f rows/s %.0f", step, epoch, loss, record["rows_per_s"])
    return loss, values[3] > 0


def _check_finite(loss: float, after: int, upto: int) -> None:
    """Stop a run whose loss became NaN / inf (every rank sees the same all-reduced value, so all stop)."""
    if not math.isfinite(loss):
        raise ValueError(f"the loss became {loss} between steps {after + 1} and {upto}; stopping before anything "
                         "is saved (lower train.embedding_lr / train.dense_lr, or check the data)")


def _truncate_log(run_dir: str, step: int, is_main: bool) -> None:
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


def _bar(total: int, desc: str, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=min(initial, total), desc=desc, unit="step", dynamic_ncols=True,
                disable=not enabled or not logs.progress_enabled())


# --------------------------------------------------------------------------------------------------------
# Full (unsharded) state
# --------------------------------------------------------------------------------------------------------


def load_unsharded(cfg: Config, stage: str, ckpt: str) -> nn.Module:
    """The stage module with real (unsharded) tables, loaded from a checkpoint without collectives (stage 2's
    frozen MEM from the MEM checkpoint it records: :func:`load_run_checkpoint`)."""
    module = build_train_module(cfg, stage, device=torch.device("cpu"))
    state = train_state(module, None)
    load_run_checkpoint(ckpt, state, no_dist=True)
    module.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return module


# --------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------


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
    feed = _Feed(reader, info, epochs=reader.epoch + 1, steps=None)
    total = -(-reader.num_rows() // max(1, reader.plan.batch_size * info.world_size))
    bar = _bar(total, desc, 0, info.is_main)
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
        os.makedirs(pred_dir)
    dist.barrier()
    path = os.path.join(pred_dir, f"part-{info.rank:05d}.parquet")
    pq.write_table(pa.table(arrays), path + ".tmp")
    os.replace(path + ".tmp", path)
    dist.barrier()
    return hfa.all_reduce(info.device) if hfa is not None and scored_hfa else None


class _Validation:
    """The early-stopping metric: GAUC (and AUC) of ``entity``'s rows of the validation split (the last
    ``data.validation_fraction`` of the train split in time order), scored after each epoch through the training
    pipeline, with the exact distributed metrics (no bootstrap). Predictions go to ``RUN/validation/``."""

    def __init__(self, cfg: Config, data_dir: str, run_dir: str, info: DistInfo, manifest: Any, entity: str) -> None:
        if cfg.data.validation_fraction <= 0:
            raise ValueError("train.patience > 0 needs a validation split: set data.validation_fraction > 0 (or "
                             "train.patience=0 to train train.epochs epochs without early stopping)")
        self.reader = ParquetReader(data_dir, "valid", cfg.schema, cfg.data, rank=info.rank,
                                    world_size=info.world_size, training=False, entity=entity, manifest=manifest)
        if self.reader.num_rows() == 0:
            raise ValueError(f"{data_dir}: the validation split (data.validation_fraction="
                             f"{cfg.data.validation_fraction}) has no {entity} rows to stop early on")
        self.info, self.entity = info, entity
        self.eval_cfg = replace(cfg.eval, bootstrap_samples=0)
        self.pred_dir = os.path.join(run_dir, "validation")

    def run(self, pipeline: Any, epoch: int) -> Dict[str, float]:
        """Score the validation split (collective) -> {"gauc", "auc", "rows", "users"} of the entity."""
        from mkt_torchrec.evaluation.distributed_metrics import compute_metrics_distributed

        self.reader.set_epoch(0)
        score_split(pipeline, self.reader, self.info, self.pred_dir, f"validate {epoch}")
        metrics = (compute_metrics_distributed(self.pred_dir, self.eval_cfg, self.info.device) or {})[self.entity]
        gauc = metrics.get("gauc")
        return {"gauc": float("nan") if gauc is None else float(gauc), "auc": float(metrics.get("auc") or "nan"),
                "rows": int(metrics.get("rows", 0)), "users": int(metrics.get("users", 0))}


def evaluate(cfg: Config, run_dir: str, data_dir: str) -> Dict[str, Any]:
    """Score the test split with the run's latest checkpoint; write predictions and RUN/metrics.json.

    The model (schema, layers, ablation) is the run's own, from RUN/run.json; ``cfg`` contributes the evaluation
    settings (``eval``), batch size, workers and threads. Every rank scores its share of the test rows and writes
    its predictions, then every rank computes the exact statistics of its share of users and rank 0 merges small
    sums (:mod:`mkt_torchrec.evaluation.distributed_metrics`): no rank works while the others wait.
    """
    run = read_run(run_dir)
    evaluation = cfg
    if evaluation.train.planner.plan_file:
        raise ValueError("train.planner.plan_file does not apply to evaluate: it plans for its own world size")
    cfg = run_config(run_dir)
    cfg.eval, cfg.train.threads = evaluation.eval, evaluation.train.threads
    cfg.data.batch_size, cfg.data.num_workers = evaluation.data.batch_size, evaluation.data.num_workers
    cfg.train.planner.plan_file = None  # evaluation may run at another world size: plan afresh
    info = init_distributed()
    torch.set_num_threads(cfg.train.threads)
    configure_dense_math(cfg)
    stage = run["stage"]
    ckpt = checkpoint.final_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint to evaluate")
    manifest = open_dataset_shared(data_dir, cfg.schema)
    lock = Collective(info.device).on_root(lambda: runlock.acquire(run_dir, "mkt evaluate"))
    try:
        return _evaluate_locked(cfg, run_dir, data_dir, info, manifest, stage, ckpt)
    finally:
        runlock.release(lock if info.is_main else None)


def _evaluate_locked(cfg: Config, run_dir: str, data_dir: str, info: DistInfo, manifest: Any, stage: str,
                     ckpt: str) -> Dict[str, Any]:
    """:func:`evaluate` once the run directory is locked."""
    from mkt_torchrec.evaluation.distributed_metrics import compute_metrics_distributed
    from mkt_torchrec.models.train import hfa_feature_names

    asm = assemble(cfg, stage, info, manifest=manifest)
    model = asm.model
    load_run_checkpoint(ckpt, train_state(model, None))  # stage 2: its frozen MEM from the MEM run's checkpoint
    model.eval()
    entity = "target" if stage_entity(cfg, stage) == "target" else None  # joint models: both entities
    reader = ParquetReader(data_dir, "test", cfg.schema, cfg.data, rank=info.rank, world_size=info.world_size,
                           training=False, entity=entity, manifest=manifest)
    wanted = manifest.rows.get("test", {}).get("target", 0) if entity else reader.num_rows()
    if wanted == 0:
        raise ValueError(f"{data_dir}: the test split has no {'target ' if entity else ''}rows to evaluate")
    faults.fault_point("evaluate", info.rank)
    pipeline = make_pipeline(model, asm.optimizer, info.device)
    pred_dir = os.path.join(run_dir, "predictions")
    hfa_scores = score_split(pipeline, reader, info, pred_dir, "evaluate", hfa_feature_names(cfg.schema))
    metrics = compute_metrics_distributed(pred_dir, cfg.eval, info.device) or {}
    if info.is_main:
        extra = checkpoint.read_extra(ckpt)
        metrics["run_dir"] = run_dir
        metrics["checkpoint"] = os.path.basename(ckpt)
        metrics["checkpoint_epoch"] = int(extra["epoch"])  # the epoch early stopping chose, when it ran
        metrics["validation"] = extra.get("best")
        metrics["stage"] = stage
        metrics["ablation"] = cfg.model.ablation
        metrics["world_size"] = info.world_size
        if hfa_scores is not None:  # MKT's MEM with HFA: {entity: {specific feature: mean score on its rows}}
            metrics["hfa_scores"] = hfa_scores
        _write_json(os.path.join(run_dir, "metrics.json"), metrics)
    dist.barrier()
    return metrics
