"""Loss wrappers with TorchRec's train-pipeline contract: ``forward(batch) -> (loss, StepOutput)``.

Like TorchRec's ``DLRMTrain``, the loss lives outside the model; the second element carries detached
tensors for logging and metrics.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from mkt_torchrec.config import ENTITIES, ModelConfig, SchemaConfig
from mkt_torchrec.data.batch import Batch
from mkt_torchrec.models.mkt import MEM, MKTTarget


class StepOutput(NamedTuple):
    loss: torch.Tensor  # () total loss, detached
    logits: torch.Tensor  # (B,) detached
    labels: torch.Tensor  # (B,)
    entity: torch.Tensor  # (B,)
    bce: torch.Tensor  # () cross-entropy part, detached
    pdl: torch.Tensor  # () PDL part before gamma, detached (0 for the TEM)
    # (B, F_src + F_tgt) the MEM's HFA scores, detached: every row scored as a source row (columns of
    # hfa_feature_names' source features), then as a target row; (B, 0) with no_hfa; None for other models
    hfa: Optional[torch.Tensor] = None


def hfa_feature_names(schema: SchemaConfig) -> Dict[str, List[str]]:
    """Entity -> the specific features its HFA scores, in the order of its score columns (GroupArch's: sparse
    specific features, then dense ones). ``StepOutput.hfa`` holds the source entity's columns, then the target's."""
    return {e: list(schema.features_of("specific", e)) + list(schema.dense_of("specific", e)) for e in ENTITIES}


def _bce(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch, or (with ``weights``) the weighted sum."""
    if weights is None:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)
    per_row = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B,)
    return (per_row * weights).sum()


def precision_context(module: nn.Module) -> ContextManager:
    """bfloat16 autocast on ``module.autocast_device`` (set by the trainer for ``train.precision: bf16``), else
    nothing. Read from an attribute, not from the batch, so the forward stays traceable by TorchRec's pipeline."""
    device = getattr(module, "autocast_device", None)
    return torch.autocast(device_type=device, dtype=torch.bfloat16) if device else nullcontext()


def _share(batch: Batch, like: torch.Tensor) -> torch.Tensor:
    """This rank's share of the global step's rows (1 without weights)."""
    return like.new_ones(()) if batch.weights is None else batch.weights.sum()


class MEMTrain(nn.Module):
    """Loss_MEM = Loss_src + Loss_tgt + gamma * Loss_pdl (paper Eq. 11).

    Loss_src + Loss_tgt is the binary cross-entropy averaged over all rows of the batch (the paper's sums over
    each entity's rows, divided by the batch size), so each entity weighs by its share of rows as in Eq. 11.

    In distributed training the batch carries ``weights`` (world size / rows of the global step, 0 for filler
    rows): the gradients averaged over ranks (by DDP and by TorchRec's sharded tables) are then those of the mean
    over the global step's rows, whatever the world size. PDL is a statistic of each rank's batch, weighted by
    the rank's share of rows.

    With ``score_penalty`` > 0 (``model.hfa.score_penalty``, an extension) the loss also adds score_penalty x
    the mean HFA score over each entity's rows, weighted like PDL.

    Args:
        mem: the MEM.
        gamma: PDL weight (0 for the ``no_pdl`` ablation).
        score_penalty: weight of the HFA score penalty (0: off).
    """

    def __init__(self, mem: MEM, gamma: float, score_penalty: float = 0.0) -> None:
        super().__init__()
        self.model = mem
        self.gamma = gamma
        self.score_penalty = score_penalty

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, StepOutput]:
        with precision_context(self):
            out = self.model(batch.sparse_features, batch.dense_features, batch.entity)
        logits, pdl = out.logits.float(), out.pdl.float()  # the loss is computed in fp32
        bce = _bce(logits, batch.labels, batch.weights)
        loss = bce + self.gamma * pdl * _share(batch, bce)
        if self.score_penalty > 0:
            loss = loss + self.score_penalty * out.hfa_score_mean.float() * _share(batch, bce)
        hfa = torch.cat([out.hfa_scores[e] for e in ENTITIES], dim=-1)  # (B, F_src + F_tgt)
        return loss, StepOutput(loss.detach(), logits.detach(), batch.labels, batch.entity, bce.detach(),
                                pdl.detach(), hfa.detach())


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
        with precision_context(self):
            logits = self.model(batch.sparse_features, batch.dense_features).float()
        loss = _bce(logits, batch.labels, batch.weights)
        zero = loss.new_zeros(())
        return loss, StepOutput(loss.detach(), logits.detach(), batch.labels, batch.entity, loss.detach(), zero)
