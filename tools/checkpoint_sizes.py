"""Checkpoint sizes of a config's two stages, from its table shapes alone (nothing is trained or allocated).

Each stage module is built on the ``meta`` device as the trainer builds it; a checkpoint holds what the trainer's
``state_of`` saves:

* model: every tensor of the module's state dict (tables: rows x dim x dtype bytes; dense parameters and buffers);
* optimizer: the state of what trains. Embedding tables (``train.embedding_optimizer``): rowwise_adagrad keeps
  one float32 per row, adagrad one per entry, adam two per entry, sgd nothing. Dense parameters
  (``train.dense_optimizer``): adam keeps two float32 per entry plus a step, adagrad one plus a step, sgd nothing.
  Stage 2's frozen MEM trains with nothing.

Stage 2 is counted twice: as checkpoints were before (the frozen MEM saved again in every stage-2 checkpoint) and
as they are now (the MEM left out; the checkpoint records the MEM run's checkpoint instead). Not counted: DCP's
``.metadata`` and ``extra.json`` (kilobytes to megabytes), and a plan's column-wise sharding of a table under
rowwise_adagrad, which keeps one momentum per row and column shard (the figures count one per row).

Usage::

    python tools/checkpoint_sizes.py --config configs/industrial.yaml [--set KEY=VALUE ...]

Prints one line per stage, then one JSON object on the last line (bytes, and GB = 1e9 bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import torch

from mkt_torchrec.config import Config, load_config
from mkt_torchrec.models.build import build_train_module
from mkt_torchrec.training.assembly import MEM_IN_STAGE2

_TABLE_STATE = {"rowwise_adagrad": "row", "adagrad": 1, "adam": 2, "sgd": 0}  # float32 values per entry
_DENSE_STATE = {"adam": 2, "adagrad": 1, "sgd": 0}  # float32 values per entry (plus one step each, if any)


def _is_table(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 3 and parts[-1] == "weight" and parts[-3] in ("embedding_bags", "embeddings")


def stage_sizes(cfg: Config, stage: str) -> Dict[str, int]:
    """Bytes of a stage's checkpoint, by part: ``tables``, ``dense`` (model), ``table_optimizer``,
    ``dense_optimizer``, and ``frozen_mem`` (stage 2's MEM, included in the others' sums only as said)."""
    module = build_train_module(cfg, stage, device=torch.device("meta"))
    trainable = {f"model.{n}" for n, p in module.named_parameters() if p.requires_grad}
    out = {"tables": 0, "dense": 0, "table_optimizer": 0, "dense_optimizer": 0, "frozen_mem": 0}
    per_entry = _TABLE_STATE[cfg.train.embedding_optimizer]
    dense_per_entry = _DENSE_STATE[cfg.train.dense_optimizer]
    for name, t in module.state_dict(keep_vars=True).items():
        key, size = f"model.{name}", t.numel() * t.element_size()
        if stage == "tem" and key.startswith(MEM_IN_STAGE2):
            out["frozen_mem"] += size  # in no optimizer
            continue
        if _is_table(key):
            out["tables"] += size
            out["table_optimizer"] += 4 * (t.shape[0] if per_entry == "row" else per_entry * t.numel())
        else:
            out["dense"] += size
            if key in trainable and dense_per_entry:
                out["dense_optimizer"] += 4 * (dense_per_entry * t.numel() + 1)
    return out


def checkpoint_sizes(cfg: Config) -> Dict[str, Any]:
    """{stage1_bytes, stage2_old_bytes (MEM saved again), stage2_new_bytes, by_stage: parts}."""
    mem = stage_sizes(cfg, "mem")
    result: Dict[str, Any] = {"stage1_bytes": sum(mem.values()), "by_stage": {"mem": mem}}
    try:
        tem = stage_sizes(cfg, "tem")
    except ValueError:  # no stage 2 (model.ablation=no_tem_finetune, a joint baseline)
        return _with_gb(result)
    own = sum(v for k, v in tem.items() if k != "frozen_mem")
    result.update(stage2_old_bytes=own + tem["frozen_mem"], stage2_new_bytes=own, by_stage={"mem": mem, "tem": tem})
    return _with_gb(result)


def _with_gb(result: Dict[str, Any]) -> Dict[str, Any]:
    for k in [k for k in result if k.endswith("_bytes")]:
        result[k[:-len("_bytes")] + "_gb"] = round(result[k] / 1e9, 2)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a config YAML (e.g. configs/industrial.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    sizes = checkpoint_sizes(cfg)
    for stage, parts in sizes["by_stage"].items():
        print(f"stage {stage}: " + ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in parts.items()))
    summary = {"config": args.config, "embedding_optimizer": cfg.train.embedding_optimizer,
               "dense_optimizer": cfg.train.dense_optimizer, "embedding_precision": cfg.train.embedding_precision,
               **{k: v for k, v in sizes.items() if k != "by_stage"}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
