"""Builds the module each stage trains (loss wrapper included), on any device, ``meta`` included.

Stage ``mem``: ``MEMTrain(MEM)``. Stage ``tem``: ``TEMTrain(MKTTarget(TEM, frozen MEM))``, or the TEM alone
under the ``no_mem_pretrain`` ablation. The planner (``mkt plan``) and the trainer build through here, so
the module paths a plan names are the ones the trainer shards.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import nn

from mkt_torchrec.config import Config
from mkt_torchrec.models.mkt import MEM, TEM, MKTTarget, knowledge_dims
from mkt_torchrec.models.train import MEMTrain, TEMTrain, pdl_gamma

Stage = Literal["mem", "tem"]
STAGES = ("mem", "tem")


def stage2_uses_mem(cfg: Config) -> bool:
    return cfg.model.ablation != "no_mem_pretrain"


def build_train_module(cfg: Config, stage: str, device: Optional[torch.device] = None) -> nn.Module:
    """The loss-wrapped model of ``stage`` (``mem`` or ``tem``), tables on ``device``."""
    precision = cfg.train.embedding_precision
    if stage == "mem":
        return MEMTrain(MEM(cfg.schema, cfg.model, device=device, embedding_precision=precision),
                        pdl_gamma(cfg.model))
    if stage == "tem":
        if cfg.model.ablation == "no_tem_finetune":
            raise ValueError("model.ablation=no_tem_finetune: there is no stage 2; the MEM's target tower is the "
                             "final model (evaluate the MEM run)")
        mem = MEM(cfg.schema, cfg.model, device=device, embedding_precision=precision) if stage2_uses_mem(cfg) else None
        tem = TEM(cfg.schema, cfg.model, knowledge_dims(mem) if mem is not None else None, device=device,
                  embedding_precision=precision)
        return TEMTrain(MKTTarget(tem, mem))
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
