"""What stage 2 takes from stage 1: the frozen MEM (loaded from the MEM run's checkpoint and recorded by digest),
``model.tem.init_from_mem``, and a baseline's transfer from its pre-training run.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel

from mkt_torchrec.config import Config
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.assembly import MEM_IN_STAGE1, MEM_IN_STAGE2, train_state
from mkt_torchrec.training.resume import global_size
from mkt_torchrec.rundir import RunDir

log = logging.getLogger("mkt.train")


MEM_RECORD = "mem_checkpoint"  # extra.json of a stage-2 checkpoint: the MEM checkpoint its frozen MEM is


def _mem_digest(ckpt: str) -> str:
    """sha256 of a checkpoint's DCP ``.metadata``: it lists every tensor (key, shape, dtype), every chunk's file,
    offset and length, and DCP's id of the save (a new uuid per save), so any re-save changes it; reading it costs
    a few MB where hashing the tensor files would read the whole MEM (18 GB at the industrial size) each time."""
    import hashlib

    from mkt_torchrec import storage

    return "sha256:" + hashlib.sha256(storage.read_bytes(storage.join(ckpt, ".metadata"))).hexdigest()


def mem_record(ckpt: str) -> Dict[str, Any]:
    """What a stage-2 checkpoint records of the MEM checkpoint it was trained with: path, step and digest."""
    from mkt_torchrec import storage

    return {"path": storage.absolute(ckpt), "step": int(checkpoint.read_extra(ckpt)["step"]),
            "digest": _mem_digest(ckpt)}


def _recorded_mem(ckpt: str, record: Dict[str, Any]) -> str:
    """The MEM checkpoint the stage-2 checkpoint ``ckpt`` records; a ValueError (one line, naming both) if it is
    gone or changed since."""
    from mkt_torchrec import storage

    path = str(record.get("path"))
    now = _mem_digest(path) if storage.is_file(storage.join(path, ".metadata")) else None
    if now != record.get("digest"):
        state = "is missing" if now is None else f"has changed since (now {now})"
        raise ValueError(f"{ckpt}: was trained with the frozen MEM checkpoint {path} ({record.get('digest')}), which "
                         f"{state}; restore that MEM checkpoint, or train stage 2 anew in a new --run-dir")
    return path


def load_run_checkpoint(ckpt: str, state: Dict[str, Any], no_dist: bool = False) -> None:
    """Load a run's checkpoint into ``state`` (keys as :func:`train_state`'s) in place.

    A stage-2 checkpoint's frozen-MEM keys are read from the MEM checkpoint it records (refused if that changed
    since); a stage-2 checkpoint without that record (saved before stage 2 left the MEM out) holds them itself."""
    frozen = {k: v for k, v in state.items() if k.startswith(MEM_IN_STAGE2)}
    record = checkpoint.read_extra(ckpt).get(MEM_RECORD) if frozen else None
    if record is None:
        checkpoint.load(ckpt, state, no_dist=no_dist)
        return
    mem = _recorded_mem(ckpt, record)
    own = {k: v for k, v in state.items() if k not in frozen}
    if own:
        checkpoint.load(ckpt, own, no_dist=no_dist)
    checkpoint.load(mem, {MEM_IN_STAGE1 + k[len(MEM_IN_STAGE2):]: v for k, v in frozen.items()}, no_dist=no_dist)


def _mem_structure(cfg: Config) -> Dict[str, Any]:
    """What decides the MEM's parameters: schema and MEM layers (not the TEM, gamma or the data)."""
    m = asdict(cfg.model)
    return {"schema": asdict(cfg.schema), "sequence": m["sequence"], "hfa": m["hfa"], "cke": m["cke"],
            "extractor_layers": m["extractor_layers"], "tower": m["tower"],
            "no_hfa": cfg.model.ablation == "no_hfa"}


def check_mem_run(cfg: Config, mem_run: str) -> None:
    """Refuse a stage-1 run whose MEM is not the one this config's stage 2 builds, naming what differs (a baseline's
    frozen pre-trained model: :func:`check_pretraining_run`)."""
    if cfg.model.name != "mkt":
        check_pretraining_run(cfg, mem_run)
        return
    mine, theirs = _mem_structure(cfg), _mem_structure(RunDir(mem_run).config())
    differ = sorted(k for k in mine if mine[k] != theirs[k])
    if differ:
        raise ValueError(f"{mem_run}: its MEM was trained with other settings for {differ} than this config "
                         "(stage 2 must use the stage-1 schema and MEM layers; model.ablation no_hfa counts)")


def load_mem_into_stage2(model: DistributedModelParallel, mem_run: str, resumed: Optional[str] = None
                          ) -> Dict[str, Any]:
    """DCP-load the stage-1 MEM into stage 2's frozen MEM: the MEM checkpoint that the stage-2 checkpoint
    ``resumed`` records (refused if it changed since), else the MEM run's best-validated, else latest checkpoint.
    Returns its :func:`mem_record`, which every stage-2 checkpoint records."""
    if RunDir(mem_run).stage() != "mem":
        raise ValueError(f"{mem_run}: is not a stage 'mem' run")
    record = checkpoint.read_extra(resumed).get(MEM_RECORD) if resumed else None
    if record is not None:
        ckpt = _recorded_mem(resumed, record)  # type: ignore[arg-type]
    else:  # a new stage 2 (or one resumed from a checkpoint that holds its MEM itself: that copy is not read)
        ckpt = checkpoint.final_checkpoint(mem_run)
        if ckpt is None:
            raise FileNotFoundError(f"{mem_run}: no complete checkpoint of the MEM to fine-tune from")
        record = mem_record(ckpt)
    state = {MEM_IN_STAGE1 + k[len(MEM_IN_STAGE2):]: v for k, v in train_state(model, None).items()
             if k.startswith(MEM_IN_STAGE2)}
    checkpoint.load(ckpt, state)
    return record


TEM_FROM_MEM = ("sparse_arch.", "group_arch.attention.")  # what ``model.tem.init_from_mem`` copies


def init_tem_from_mem(model: DistributedModelParallel, ckpt: str) -> List[str]:
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
        if sizes.get(source) == tuple(global_size(value)):
            state[source] = value
    checkpoint.load(ckpt, state)
    return sorted(tem + k[len(mem):] for k in state)


def check_pretraining_run(cfg: Config, mem_run: Optional[str]) -> None:
    """A baseline's fine-tuning stage needs its own pre-training run: same model and schema."""
    if not mem_run:
        raise ValueError(f"model.name={cfg.model.name} stage tem fine-tunes a pre-trained model: pass --mem-run "
                         "with its stage-mem run")
    run = RunDir(mem_run)
    theirs = run.config()
    if run.stage() != "mem":
        raise ValueError(f"{mem_run}: is not a stage 'mem' run")
    differ = [k for k in ("name", "baselines") if getattr(theirs.model, k) != getattr(cfg.model, k)]
    differ += ["schema"] if theirs.schema != cfg.schema else []
    if differ:
        raise ValueError(f"{mem_run}: was pre-trained with other settings for {differ} than this config")


def transfer_from_pretraining(model: DistributedModelParallel, mem_run: str, prefixes: tuple) -> str:
    """DCP-load the tensors under ``prefixes`` (the registry's transfer list) from the pre-training run's final
    checkpoint into this stage's model; they then train with everything else."""
    ckpt = checkpoint.final_checkpoint(mem_run)
    if ckpt is None:
        raise FileNotFoundError(f"{mem_run}: no complete checkpoint to fine-tune from")
    state = {k: v for k, v in train_state(model, None).items()
             if any(k[len("model."):].startswith(p) for p in prefixes)}
    checkpoint.load(ckpt, state)
    return ckpt


def load_unsharded(cfg: Config, stage: str, ckpt: str) -> nn.Module:
    """The stage module with real (unsharded) tables, loaded from a checkpoint in one process without
    collectives (stage 2's frozen MEM from the MEM checkpoint it records: :func:`load_run_checkpoint`)."""
    from mkt_torchrec.models.build import build_train_module

    module = build_train_module(cfg, stage, device=torch.device("cpu"))
    state = train_state(module, None)
    load_run_checkpoint(ckpt, state, no_dist=True)
    module.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    return module
