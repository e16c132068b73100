"""The embedding optimizer of a stage, fused into backward before planning (``apply_optimizer_in_backward`` with
``train.embedding_optimizer``), and stage 2's frozen MEM, which gets none.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from torchrec import optim as trec_optim

from mkt_torchrec.config import Config

# the trainer's embedding optimizers (cfg.train.embedding_optimizer), fused into backward
EMBEDDING_OPTIMIZERS: Dict[str, type] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad, "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD, "adam": torch.optim.Adam,
}


# the stage's trainable sparse arch (stage 2 keeps the MEM frozen)
TRAINABLE_SPARSE_ARCH = {"mem": "model.sparse_arch", "tem": "model.tem.sparse_arch"}


FROZEN_MODULE = {"tem": "model.mem"}  # stage 2's frozen MEM (absent under no_mem_pretrain)


EMBEDDING_EPS = 1e-8  # fbgemm's default, passed explicitly so data_parallel tables' optimizer uses the same


def embedding_optimizer_kwargs(cfg: Config) -> Dict[str, float]:
    """Keyword arguments of the embedding optimizer, the same for fused and data_parallel tables."""
    kwargs = {"lr": cfg.train.embedding_lr}
    if cfg.train.embedding_optimizer != "sgd":
        kwargs["eps"] = EMBEDDING_EPS
    return kwargs


def frozen_module(module: nn.Module, stage: str) -> Optional[nn.Module]:
    """The stage's frozen submodule (stage 2's MEM), or None."""
    path = FROZEN_MODULE.get(stage)
    if path is None:
        return None
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def attach_embedding_optimizer(module: nn.Module, cfg: Config, stage: str) -> None:
    """Fuse ``cfg.train.embedding_optimizer`` into the backward of the stage's trainable tables, as the trainer
    does, so the planner counts their optimizer state.

    Stage 2's frozen MEM tables get a stateless fused SGD at learning rate 0: without an optimizer class
    TorchRec's sharder would give them fbgemm's default optimizer, whose state it allocates (and checkpoints).
    They never receive a gradient anyway (the MEM runs under ``no_grad``), and the trainer leaves them out of its
    optimizer and of DDP.
    """
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    arch = module.get_submodule(getattr(module, "trainable_sparse_arch", TRAINABLE_SPARSE_ARCH[stage]))
    cls = EMBEDDING_OPTIMIZERS[cfg.train.embedding_optimizer]
    for coll in (arch.ebc, arch.ec):
        if coll is not None:
            apply_optimizer_in_backward(cls, coll.parameters(), embedding_optimizer_kwargs(cfg))
    frozen = frozen_module(module, stage)
    if frozen is not None:
        for coll in (frozen.sparse_arch.ebc, frozen.sparse_arch.ec):
            if coll is not None:
                params = list(coll.parameters())
                for p in params:  # it hooks the gradient accumulator, which only trainable tensors have
                    p.requires_grad_(True)
                apply_optimizer_in_backward(torch.optim.SGD, params, {"lr": 0.0})
                for p in params:
                    p.requires_grad_(False)


def optimizer_multiplier(param: torch.Tensor) -> float:
    """Optimizer state per byte of weights, as TorchRec's planner counts it."""
    classes = getattr(param, "_optimizer_classes", None)
    cls = classes[0] if classes else None
    if cls is None or cls in (torch.optim.SGD, trec_optim.SGD):
        return 0.0
    if cls in (torch.optim.Adam, trec_optim.Adam):
        return 2.0
    if cls is trec_optim.RowWiseAdagrad:
        return 1.0 / param.shape[-1]
    return 1.0
