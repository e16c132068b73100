"""Finetune: pre-train a base model on source rows only, then fine-tune all of it on target rows.

Paper: the "vanilla Finetune" of the MKT paper (Guan et al., "Effective Two-Stage Knowledge Transfer for
Multi-Entity Cross-Domain Recommendation", arXiv 2402.19101, 4.1.2; also its production baseline, 4.2.3): "pre-trains
a base model ONLY on the source domain data and fine-tunes the resulting model on the target domain data". It
names no base model and cites no paper for the method.

Our reading:
    - Base model: our DIN (``din.py``: activation-unit interests, Dice DNN ``model.baselines.dnn``, MKT paper
      4.1.3's single-domain sizes), so Finetune differs from the DIN baseline by the pre-training alone.
    - Its inputs are every feature of both entities: the same network, hence the same tensors, in both stages.
      On a source row the target-specific features are null (zero embeddings) and on a target row the
      source-specific ones are: pre-training learns the source-specific part, fine-tuning the target-specific
      part, and both learn the user, entity-shared, sequence and DNN parameters.
    - Stage ``mem`` trains on source rows only; stage ``tem`` loads every tensor of it (``model.``) and trains
      every parameter on target rows. The serving model feeds zeros for the source-specific features, which are
      null on every target row.
"""

from __future__ import annotations

from typing import Optional

import torch

from mkt_torchrec.config import Config
from mkt_torchrec.models.baselines.common import BaselineModel
from mkt_torchrec.models.baselines.din import din_model

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Finetune (pre-train on the source domain, fine-tune on the target domain) as described in "
         "Guan et al., 'Effective Two-Stage Knowledge Transfer for Multi-Entity Cross-Domain "
         "Recommendation', arXiv 2402.19101, 2024 (4.1.2)")


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    return din_model(cfg, "all", device)
