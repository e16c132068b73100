"""CTNet, as the MKT paper adapts it: pre-train on source rows, transfer user and entity-shared embeddings only.

Paper: Lixin Liu, Yanling Wang, Tianming Wang, Dong Guan, Jiawei Wu, Jingxu Chen, Rong Xiao, Wenxiang Zhu and Fei
Fang, "Continual Transfer Learning for Cross-Domain Click-Through Rate Prediction at Taobao", WWW 2023 Companion
(the MKT paper's [17]).

Our reading:
    - CTNet proper keeps a continually trained source model and plugs its hidden representations into the target
      model through GLU adapters. The MKT paper (4.1.3): "Since CTNet can not deal with multiple entities, we can
      only transfer the embedding of user and entity-shared features during fine-tuning." We implement that
      adaptation: stage ``mem`` trains the base model on source rows; stage ``tem`` trains a new target model whose
      user and entity-shared tables (the behaviour sequences use the entity-shared item table, so it includes
      them) start from the pre-trained ones; its dense layers start afresh; nothing is frozen.
    - Base model: our DIN (``din.py``), as for Finetune. The pre-trained model reads every feature of both entities
      (the target-specific ones are null on its source rows), the fine-tuned model the TEM's inputs (user,
      entity-shared, target-specific). The transfer is every table of the fine-tuned model
      (``model.sparse_arch.``): its user and entity-shared tables carry the pre-trained embeddings, and its
      target-specific tables carry nothing, since pre-training never looks them up (their ids are null on source
      rows): they arrive as initialised (with the same ``train.seed``, bit-equal to the fine-tuned model's own
      initialisation).
"""

from __future__ import annotations

from typing import Optional

import torch

from mkt_torchrec.config import Config
from mkt_torchrec.models.baselines.common import BaselineModel
from mkt_torchrec.models.baselines.din import din_model

# the paper this model reproduces (its family and stages: its entry in mkt_torchrec.registry)
PAPER = ("Liu et al., 'Continual Transfer Learning for Cross-Domain Click-Through Rate Prediction "
         "at Taobao', WWW 2023 Companion, as adapted in Guan et al., arXiv 2402.19101 (4.1.3)")


def build_model(cfg: Config, stage: str, device: Optional[torch.device]) -> BaselineModel:
    return din_model(cfg, "all" if stage == "mem" else "target", device)
