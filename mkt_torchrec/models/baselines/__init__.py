"""The MKT paper's ten baselines (4.1.2, Table 2), selected by ``model.name``; one model per file.

Every baseline trains with the same machinery as MKT: a :class:`~mkt_torchrec.modules.sparse.SparseArch` of
TorchRec collections fed the batch's KeyedJaggedTensor (sharded by the planner, trained by
``TrainPipelineSparseDist``), a dense arch, and a loss wrapper with MKT's ``(loss, StepOutput)`` contract; the final
stage's model is evaluated on target rows and exported with MKT's serving input contract.

Families (Table 2):

- ``single_domain`` (MLP, DIN, FiBiNet): one stage ``tem`` on target rows.
- ``joint`` (MMoE, PLE, STAR, CoNet): one stage ``mem`` on both entities' rows, each row scored by its own
  entity's tower; the final model is scored on target rows.
- ``pretrain_finetune`` (MiNet, Finetune, CTNet): stage ``mem`` (pre-training), then stage ``tem`` on target rows,
  starting from the ``mem`` run's tensors under the stage's ``transfer`` prefixes.

Example:
    >>> from mkt_torchrec.models.baselines import MODELS, build_train_module
    >>> MODELS["finetune"].stages["tem"].transfer
    ('model.',)
    >>> module = build_train_module(cfg, "tem", torch.device("meta"))      # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Optional

import torch
from torch import nn

from mkt_torchrec import registry
from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.models.baselines.common import (BaselineModel, BaselineServing, BaselineTrain, ModelSpec,
                                                  StageSpec)


def spec_of(name: str) -> ModelSpec:
    """A baseline's registry entry (``mkt_torchrec.registry``, plugins included) with its module's ``PAPER``.

    Raises:
        ValueError: not a baseline's name.
    """
    entry = registry.get(name) if name in registry.names() else None
    if entry is None or not entry.is_baseline:
        raise ValueError(f"model.name={name!r} is not a baseline; baselines: {list(registry.baseline_names())}")
    module = importlib.import_module(entry.module)  # type: ignore[arg-type]
    return ModelSpec(name, entry.family, dict(entry.stages), getattr(module, "PAPER", ""))


def _builder(name: str) -> Callable[[Config, str, Optional[torch.device]], BaselineModel]:
    return importlib.import_module(registry.get(name).module).build_model  # type: ignore[arg-type]


# name -> spec of every baseline registered when this package was first imported
MODELS: Dict[str, ModelSpec] = {name: spec_of(name) for name in registry.baseline_names()}


def final_stage(name: str) -> str:
    """The stage whose run is a baseline's final model (evaluated and exported)."""
    return list(spec_of(name).stages)[-1]


def build_train_module(cfg: Config, stage: str, device: Optional[torch.device] = None) -> nn.Module:
    """The loss-wrapped baseline ``cfg.model.name`` of ``stage``, tables on ``device`` (``meta`` to plan or shard).

    Raises:
        ValueError: not a baseline, or a stage the baseline does not have.
    """
    spec = spec_of(cfg.model.name)
    if stage not in spec.stages:
        raise ValueError(f"model.name={spec.name} trains in stage(s) {list(spec.stages)}; it has no stage {stage!r}")
    return BaselineTrain(_builder(spec.name)(cfg, stage, device))


def serving_schema(cfg: Config) -> SchemaConfig:
    """The schema of a baseline's serving inputs: its module's ``serving_schema(cfg)`` where it has one (PGTL's
    related items are one more input key), else ``cfg.schema``."""
    spec_of(cfg.model.name)  # (a baseline's name, or one line)
    hook = getattr(importlib.import_module(registry.get(cfg.model.name).module), "serving_schema", None)  # type: ignore[arg-type]
    return hook(cfg) if hook is not None else cfg.schema


def serving_model(schema: SchemaConfig, model: BaselineModel) -> BaselineServing:
    """The serving model of a trained baseline (its final stage's ``model``): its class's ``serving_class`` (a
    :class:`BaselineServing` that serves more than one sparse arch, e.g. KEEP's), else :class:`BaselineServing`."""
    return getattr(model, "serving_class", BaselineServing)(schema, model)


__all__ = ["MODELS", "BaselineModel", "BaselineServing", "BaselineTrain", "ModelSpec", "StageSpec",
           "build_train_module", "final_stage", "serving_model", "serving_schema", "spec_of"]
