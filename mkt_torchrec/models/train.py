"""Loss wrappers with TorchRec's train-pipeline contract: ``forward(batch) -> (loss, StepOutput)``.

Like TorchRec's ``DLRMTrain``, the loss lives outside the model; the second element carries detached
tensors for logging and metrics.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from torch import nn

from mkt_torchrec.config import ModelConfig
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.models.mkt import MEM, MKTTarget


class StepOutput(NamedTuple):
    loss: torch.Tensor  # () total loss, detached
    logits: torch.Tensor  # (B,) detached
    labels: torch.Tensor  # (B,)
    entity: torch.Tensor  # (B,)
    bce: torch.Tensor  # () cross-entropy part, detached
    pdl: torch.Tensor  # () PDL part before gamma, detached (0 for the TEM)


class MEMTrain(nn.Module):
    """Loss_MEM = Loss_src + Loss_tgt + gamma * Loss_pdl (paper Eq. 11).

    Loss_src + Loss_tgt is the binary cross-entropy averaged over all rows of the batch (the paper's sums over
    each entity's rows, divided by the batch size), so each entity weighs by its share of rows as in Eq. 11.

    Args:
        mem: the MEM.
        gamma: PDL weight (0 for the ``no_pdl`` ablation).
    """

    def __init__(self, mem: MEM, gamma: float) -> None:
        super().__init__()
        self.model = mem
        self.gamma = gamma

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, StepOutput]:
        out = self.model(batch.sparse_features, batch.dense_features, batch.entity)
        bce = nn.functional.binary_cross_entropy_with_logits(out.logits, batch.labels)
        loss = bce + self.gamma * out.pdl
        return loss, StepOutput(loss.detach(), out.logits.detach(), batch.labels, batch.entity,
                                bce.detach(), out.pdl.detach())


def pdl_gamma(cfg: ModelConfig) -> float:
    """gamma of Eq. 11: 0 under the ``no_pdl`` ablation."""
    return 0.0 if cfg.ablation == "no_pdl" else cfg.pdl_gamma


class TEMTrain(nn.Module):
    """Loss_TEM: binary cross-entropy over target rows (paper Eq. 13). Batches must hold target rows only.

    Args:
        model: the stage-2 model (frozen MEM + TEM, or the TEM alone).
    """

    def __init__(self, model: MKTTarget) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, StepOutput]:
        logits = self.model(batch.sparse_features, batch.dense_features)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        zero = loss.new_zeros(())
        return loss, StepOutput(loss.detach(), logits.detach(), batch.labels, batch.entity, loss.detach(), zero)
