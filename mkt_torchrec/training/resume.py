"""Loading a checkpoint into a live stage, across world sizes and plans: DCP reshards what it can, and row-wise
optimizer state is carried where a plan changes a table's column split.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Tuple

import torch
import torch.distributed as dist
from torchrec.optim.keyed import CombinedOptimizer

from mkt_torchrec.config import Config
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.assembly import Assembled, state_of
from mkt_torchrec.training.distributed import all_gather_objects

log = logging.getLogger("mkt.train")


def load_train_state(asm: Assembled, cfg: Config, ckpt: str, saved_plan: Dict[str, Any]) -> None:
    """Load a checkpoint into an assembled stage, whatever world size and plan it was saved under.

    DCP reshards every tensor whose global shape is the same under both plans. The one state that changes shape
    is a row-wise optimizer's (rowwise adagrad) momentum of a column-wise sharded table: fbgemm keeps one value per
    row *and column shard* (``rows x shards``). It is carried through its plan-independent form, one value per
    row, the column-width-weighted mean over the saved shards (exact: each value is a running mean of squared
    gradients over its columns); every new column shard starts from that mean (exact when the shards are the same).
    Stage 2's frozen MEM is not part of it (:func:`state_of`): the trainer loads it from the MEM checkpoint the
    stage-2 checkpoint records first (``load_mem_into_stage2``).

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
    regroup = {k: v for k, v in state.items() if k in saved and tuple(global_size(v)) != saved[k]}
    for key in regroup:
        if not (key.startswith("optim.") and key.endswith(".momentum1") and len(saved[key]) == 1):
            raise ValueError(f"{ckpt}: {key} has shape {list(saved[key])} there but "
                             f"{list(global_size(regroup[key]))} in this model")
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
            repeated = per_row.repeat(global_size(target)[0] // per_row.numel())
            for offset, local in _local_pieces(target):
                local.copy_(repeated[offset:offset + local.numel()].to(local.device))


def global_size(t: Any) -> tuple:
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
