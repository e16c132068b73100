"""Builds the module each stage trains (loss wrapper included), on any device, ``meta`` included.

Stage ``mem``: ``MEMTrain(MEM)``. Stage ``tem``: ``TEMTrain(MKTTarget(TEM, frozen MEM))``, or the TEM alone
under the ``no_mem_pretrain`` ablation. A baseline (``model.name`` other than ``mkt``) is built by
``mkt_torchrec.models.baselines``. The planner (``mkt plan``) and the trainer build through here, so the module
paths a plan names are the ones the trainer shards.
"""

from __future__ import annotations

from typing import List, Literal, Optional

import torch
from torch import nn

from mkt_torchrec import registry
from mkt_torchrec.config import Config
from mkt_torchrec.models import baselines
from mkt_torchrec.models.mkt import MEM, TEM, MKTTarget, knowledge_dims
from mkt_torchrec.models.losses import MEMTrain, TEMTrain, pdl_gamma

Stage = Literal["mem", "tem"]
STAGES = ("mem", "tem")


def stage2_uses_mem(cfg: Config) -> bool:
    """Stage 2 holds a frozen stage-1 model loaded from a stage-1 run: MKT's MEM, or a baseline's pre-trained model
    where its registry entry's stage ``tem`` says ``frozen_mem`` (KEEP's extractor). Any other baseline's stage
    ``tem`` loads the tensors its registry entry names (``registry.get(name).stages["tem"].transfer``), if any."""
    if cfg.model.name != "mkt":
        tem = registry.of_config(cfg.model.name).stages.get("tem")
        return tem is not None and tem.frozen_mem
    return cfg.model.ablation != "no_mem_pretrain"


def stage2_holds_mem(cfg: Config) -> bool:
    """Stage 2 holds the frozen stage-1 model itself: :func:`stage2_uses_mem`, unless MKT's knowledge comes from
    the cache (``model.tem.knowledge: cache``: the MEM run is then only checked against the cache version and, with
    ``model.tem.init_from_mem``, the TEM's starting tables)."""
    return stage2_uses_mem(cfg) and not (cfg.model.name == "mkt" and cfg.model.tem.knowledge == "cache")


def fine_tunes(cfg: Config, stage: str) -> bool:
    """``stage`` starts from a stage-1 model: MKT's TEM beside its frozen MEM, or a baseline's stage ``tem`` that
    loads tensors of its pre-training (not a model trained from scratch on target rows)."""
    return stage == "tem" and (stage2_uses_mem(cfg) or bool(stage_transfer(cfg, stage)))


def dense_lr(cfg: Config, stage: str) -> float:
    """The dense optimizer's learning rate of ``stage``: ``train.finetune_dense_lr`` where it fine-tunes, if set."""
    if cfg.train.finetune_dense_lr is not None and fine_tunes(cfg, stage):
        return cfg.train.finetune_dense_lr
    return cfg.train.dense_lr


def stage_entity(cfg: Config, stage: str) -> Optional[str]:
    """The rows a stage trains on: None (both entities), ``source`` or ``target``, from the model's registry entry
    (MKT: its MEM trains on both, its TEM on target rows; Finetune pre-trains on source rows)."""
    spec = registry.of_config(cfg.model.name, cfg.model.ablation)
    if not spec.is_baseline:
        spec = registry.get("mkt")  # every MKT variant trains its stages on MKT's rows
    if stage not in spec.stages:
        raise ValueError(f"model.name={cfg.model.name} has no stage {stage!r}; its stages: {list(spec.stages)}")
    return spec.stages[stage].entity


def stage_transfer(cfg: Config, stage: str) -> tuple:
    """State-dict prefixes (after the leading ``model.``) a baseline's stage ``tem`` loads from its stage-``mem``
    run before training (its registry entry); () for MKT (whose stage 2 loads a frozen MEM instead) and
    single-stage models."""
    if cfg.model.name == "mkt" or stage != "tem":
        return ()
    return tuple(registry.of_config(cfg.model.name).stages[stage].transfer)


def build_train_module(cfg: Config, stage: str, device: Optional[torch.device] = None) -> nn.Module:
    """The loss-wrapped model of ``stage`` (``mem`` or ``tem``), tables on ``device``."""
    if cfg.model.name != "mkt":
        return baselines.build_train_module(cfg, stage, device)
    precision = cfg.train.embedding_precision
    if stage == "mem":
        return MEMTrain(MEM(cfg.schema, cfg.model, device=device, embedding_precision=precision),
                        pdl_gamma(cfg.model), cfg.model.hfa.score_penalty)
    if stage == "tem":
        if cfg.model.ablation == "no_tem_finetune":
            raise ValueError("model.ablation=no_tem_finetune: there is no stage 2; the MEM's target tower is the "
                             "final model (evaluate the MEM run)")
        if stage2_uses_mem(cfg) and cfg.model.tem.knowledge == "cache":  # the knowledge read from a cache version
            from mkt_torchrec.cache.knowledge import knowledge_widths

            widths = knowledge_widths(cfg)
            return TEMTrain(MKTTarget(TEM(cfg.schema, cfg.model, widths, device=device, embedding_precision=precision),
                                      cached=widths))
        mem = MEM(cfg.schema, cfg.model, device=device, embedding_precision=precision) if stage2_uses_mem(cfg) else None
        tem = TEM(cfg.schema, cfg.model, knowledge_dims(mem) if mem is not None else None, device=device,
                  embedding_precision=precision)
        return TEMTrain(MKTTarget(tem, mem))
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


def compile_dense(module: nn.Module, backend: str = "inductor") -> List[str]:
    """``train.compile``: ``torch.compile`` (dynamic batch) each dense leaf module in place (``nn.Module.compile``):
    HFA / its no_hfa stand-in, the CKE (MMoE), extractors, towers and DNNs (``nn.Sequential`` MLPs), sequence
    attention and GLU gates. TorchRec's pipeline FX-traces the model around its sharded modules; the tracer calls
    each module's Python ``forward``, so it sees through them, while the steps run the compiled code. Modules inside
    a compiled one are not compiled again. ``backend``: torch.compile's (``aot_eager`` skips code generation: the
    tests' choice, same graphs and autograd). Returns the compiled modules' names."""
    from mkt_torchrec.modules.hfa import HFA, PadAlign
    from mkt_torchrec.modules.layers import GLUGate, MMoE
    from mkt_torchrec.modules.sequence import DINAttention, MultiHeadTargetAttention

    kinds = (HFA, PadAlign, MMoE, GLUGate, DINAttention, MultiHeadTargetAttention, nn.Sequential)
    compiled: List[str] = []
    for name, m in module.named_modules():
        if isinstance(m, kinds) and not any(name.startswith(c + ".") for c in compiled):
            m.compile(dynamic=True, backend=backend)
            compiled.append(name)
    return compiled

