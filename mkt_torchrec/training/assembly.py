"""Assembly of a stage: the module on ``meta`` -> the fused embedding optimizer -> a plan ->
``DistributedModelParallel`` -> a ``CombinedOptimizer``; deterministic table initialisation; the checkpoint state
of an assembled stage.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from mkt_torchrec.config import Config
from mkt_torchrec.planning.embedding_optimizer import (FROZEN_MODULE, attach_embedding_optimizer,
                                                       embedding_optimizer_kwargs, frozen_module)
from mkt_torchrec.planning.plan import make_plan, manifest_pooling, sharders
from mkt_torchrec.planning.plan_file import load_plan
from mkt_torchrec.training import device_check
from mkt_torchrec.models.build import build_train_module, compile_dense, dense_lr
from mkt_torchrec.training.distributed import DistInfo

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
    return {k: v for k, v in state.items() if not k.startswith(MEM_IN_STAGE2)}


# Stage 2's frozen MEM (``FROZEN_MODULE``) in train_state's keys, and where the MEM run's checkpoint holds the same
# tensors (stage 1's module is ``MEMTrain(MEM)``: ``model.`` + the loss wrapper's ``model.``).
MEM_IN_STAGE2, MEM_IN_STAGE1 = f"model.{FROZEN_MODULE['tem']}.", "model.model."
