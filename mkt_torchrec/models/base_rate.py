"""Fresh output layers start at the click rate: the bias of each entity's logit is ``logit(p)``.

A tower's last layer starts with a bias drawn like its weights (about zero), so a fresh model predicts about 0.5
for every row while CTR data clicks at a few percent: the first epochs spend their steps moving every score
down, and a model stopped early, or whose stage-1 knowledge dominates, can end far off the click rate (mean score
0.36 against a click rate of 0.19 was seen for a fine-tuned TEM). Starting the bias at ``log(p / (1 - p))`` of the
rows the stage trains on starts every prediction at the click rate (the weights stay random: the model's
ranking still starts from scratch).

A model names its logit biases with ``output_biases() -> {entity: tensor}``: the bias (or a view of it)
added to that entity's logit by its last layer. The outermost module that defines it is asked (``MKTTarget``
answers for its TEM); a tensor shared by several entities starts at their pooled click rate. A model without
the method (a plugin's) keeps its own initialisation. Layers loaded afterwards (stage 2's MEM, a baseline's
pre-trained tensors, a resumed checkpoint) overwrite what this set.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

log = logging.getLogger("mkt.train")


def last_linear(module: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` of a layer stack (``mlp(..., linear_last=True)``, a ``Sequential``, ``DiceMLP``)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"{type(module).__name__} has no linear layer")
    return linears[-1]


def output_biases(module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The outermost ``output_biases()`` of ``module``'s tree (None: no module defines it)."""
    for m in module.modules():
        hook = getattr(m, "output_biases", None)
        if callable(hook):
            return hook()
    return None


def init_at_click_rate(module: nn.Module, clicks: Mapping[str, int], rows: Mapping[str, int]
                       ) -> Dict[str, float]:
    """Set each entity's logit bias of ``module`` to ``logit(clicks / rows)`` of the entities it trains on
    (``rows`` > 0); returns {entity: bias set}. A click rate of 0 or 1 is clipped to 1e-4 / 1 - 1e-4."""
    biases = output_biases(module)
    if biases is None:
        log.info("%s names no output bias (output_biases): it keeps its own initialisation", type(module).__name__)
        return {}
    groups: List[Tuple[torch.Tensor, List[str]]] = []
    for entity, tensor in biases.items():
        if rows.get(entity, 0) <= 0:
            continue
        for t, entities in groups:
            if _same(t, tensor):
                entities.append(entity)
                break
        else:
            groups.append((tensor, [entity]))
    out = {}
    with torch.no_grad():
        for tensor, entities in groups:
            p = sum(clicks[e] for e in entities) / sum(rows[e] for e in entities)
            p = min(max(p, 1e-4), 1 - 1e-4)
            value = math.log(p / (1 - p))
            tensor.fill_(value)
            out.update(dict.fromkeys(entities, value))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.device == b.device
