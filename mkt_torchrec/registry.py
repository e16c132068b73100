"""Every runnable model in one table: MKT, its ablations and the baselines, with their families and stages.

Each entry is a :class:`RunSpec`: what ``mkt run --runs NAME`` trains, in which stages, on which rows, which
stage's run is the final model (evaluated on target rows) and whether ``mkt run`` exports it for serving. Every
"is this MKT or a baseline?" question, every list of families, stages or served models reads it; nothing else
lists models. A run's config names its entry through ``model.name`` (and, for MKT, ``model.ablation``).

Adding a baseline is one module (``build_model(cfg, stage, device)``, see ``mkt_torchrec.models.baselines``) plus
its entry here. A model outside this package registers itself: list its module in ``MKT_MODELS`` (comma-separated
importable names, e.g. ``MKT_MODELS=my_models.wide_deep``); each is imported before the table is first read, in
every process (ranks inherit the variable), and calls :func:`register`.

This module imports no torch: the config, the CLI's help and the report read it cheaply.

Example:
    >>> from mkt_torchrec import registry
    >>> registry.get("finetune").stages["tem"].transfer
    ('model.',)
    >>> registry.of_config("mkt", "no_tem_finetune").final_stage
    'mem'
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Tuple

if TYPE_CHECKING:
    from mkt_torchrec.config import Config

PLUGINS_ENV = "MKT_MODELS"

# family -> its label in reports, in the order of the paper's Table 2
FAMILIES: Dict[str, str] = {"single_domain": "Single-domain", "joint": "Joint training",
                            "pretrain_finetune": "Pre-training & fine-tuning", "mkt": "MKT and ablations",
                            "other": "Other"}


@dataclass(frozen=True)
class StageSpec:
    """One training stage of a run.

    Attributes:
        entity: the rows this stage trains on: None (both entities), ``source`` or ``target``.
        transfer: for a baseline's stage ``tem`` only: state-dict key prefixes of the train module (the same keys
            in both stages' modules) whose tensors are loaded from the stage ``mem`` run's checkpoint before
            training. Every parameter trains in every stage; nothing is frozen. (MKT's TEM loads its frozen MEM
            whole; that is the model's own design, not a transfer list.)
        frozen_mem: for a baseline's stage ``tem`` only: its module holds the stage ``mem`` model whole at
            ``model.mem`` (KEEP's knowledge extractor), loaded from the ``mem`` run's checkpoint and frozen exactly as
            MKT's TEM holds its MEM (``mkt_torchrec.training.mem_transfer``); nothing of it trains.
    """

    entity: Optional[str]
    transfer: Tuple[str, ...] = ()
    frozen_mem: bool = False


@dataclass(frozen=True)
class RunSpec:
    """A runnable model.

    Attributes:
        name: what ``mkt run --runs`` takes.
        family: a key of :data:`FAMILIES`.
        label: its name in tables (``MKT``, ``w/o HFA``, ``Finetune``).
        stages: the stages its run directories hold, in training order (``mem`` before ``tem``).
        model: ``model.name`` of its config (``mkt`` for MKT and its ablations).
        ablation: ``model.ablation`` of its config (MKT's runs only).
        module: for a baseline, the importable module with ``build_model`` (and ``PAPER``, its reading of the paper).
        made_as: the run whose directories and settings are this one's, when it trains nothing of its own
            (``no_tem_finetune`` is the ``mkt`` run's MEM, evaluated on its own target tower).
        served: ``mkt run`` exports its final run for serving (``serving/model.pt2``).
        extra: further ``(dotted key, value)`` settings of its config (``mkt_cached``: the knowledge from the cache).
    """

    name: str
    family: str
    label: str
    stages: Mapping[str, StageSpec]
    model: str = "mkt"
    ablation: str = "none"
    module: Optional[str] = None
    made_as: Optional[str] = None
    served: bool = False
    extra: Tuple[Tuple[str, Any], ...] = ()

    @property
    def final_stage(self) -> str:
        """The stage whose run is the final model: evaluated on target rows, exported when served."""
        return list(self.stages)[-1]

    def serves(self, stage: str) -> bool:
        """Whether a run of this model's ``stage`` is exported for serving (``mkt train`` / ``mkt run`` export it,
        ``mkt export`` takes it): the final stage of a served model."""
        return self.served and stage == self.final_stage

    @property
    def is_baseline(self) -> bool:
        return self.model != "mkt"

    def settings(self) -> Dict[str, Any]:
        """The config settings that make a run of this model (of the run it is made as, if any)."""
        spec = get(self.made_as) if self.made_as else self
        if spec.is_baseline:
            return {"model.name": spec.model, **dict(spec.extra)}
        return {"model.name": "mkt", "model.ablation": spec.ablation, **dict(spec.extra)}

    def config(self, base: "Config", seed: int = 0) -> "Config":
        """The resolved config of this model's run of seed index ``seed`` from the job's config: the model's
        :meth:`settings`, and seed ``train.seed + seed`` for parameter initialisation and data order (the dataset
        itself stays the same)."""
        seeded = base.train.seed + seed
        return base.with_settings({**self.settings(), "train.seed": seeded, "data.seed": seeded})


_MKT = {"mem": StageSpec(None), "tem": StageSpec("target")}
_SINGLE_DOMAIN = {"tem": StageSpec("target")}
_JOINT = {"mem": StageSpec(None)}


def _baseline(name: str, family: str, label: str, stages: Mapping[str, StageSpec], served: bool) -> RunSpec:
    return RunSpec(name, family, label, dict(stages), model=name, module=f"mkt_torchrec.models.baselines.{name}",
                   served=served)


_PRETRAIN = {"mem": StageSpec("source"), "tem": StageSpec("target", ("model.",))}
_RUNS: Dict[str, RunSpec] = {spec.name: spec for spec in (
    RunSpec("mkt", "mkt", "MKT", _MKT, served=True),
    RunSpec("no_hfa", "mkt", "w/o HFA", _MKT, ablation="no_hfa", served=True),
    RunSpec("no_pdl", "mkt", "w/o PDL", _MKT, ablation="no_pdl", served=True),
    RunSpec("no_mem_pretrain", "single_domain", "w/o MEM pretrain", _SINGLE_DOMAIN, ablation="no_mem_pretrain",
            served=True),
    # MKT with stage 2 reading the MEM's knowledge from a cache version (KEEP's degenerated form; ``mkt run`` builds
    # and loads the version between the stages: mkt_torchrec/cache/pipeline.py)
    RunSpec("mkt_cached", "mkt", "MKT (cached knowledge)", _MKT, served=True,
            extra=(("model.tem.knowledge", "cache"),)),
    RunSpec("no_tem_finetune", "mkt", "w/o TEM finetune", {"mem": StageSpec(None)}, ablation="no_tem_finetune",
            made_as="mkt", served=True),
    # the paper's Table 2 baselines (4.1.2); joint models are compared, not exported
    _baseline("mlp", "single_domain", "MLP", _SINGLE_DOMAIN, True),
    _baseline("din", "single_domain", "DIN", _SINGLE_DOMAIN, True),
    _baseline("fibinet", "single_domain", "FiBiNet", _SINGLE_DOMAIN, True),
    _baseline("mmoe", "joint", "MMoE", _JOINT, False),
    _baseline("ple", "joint", "PLE", _JOINT, False),
    _baseline("star", "joint", "STAR", _JOINT, False),
    _baseline("conet", "joint", "CoNet", _JOINT, False),
    _baseline("minet", "pretrain_finetune", "MiNet", {"mem": StageSpec(None), "tem": StageSpec("target", ("model.",))},
              True),
    _baseline("finetune", "pretrain_finetune", "Finetune", _PRETRAIN, True),
    _baseline("ctnet", "pretrain_finetune", "CTNet", {"mem": StageSpec("source"),
                                                     "tem": StageSpec("target", ("model.sparse_arch.",))}, True),
    _baseline("keep", "pretrain_finetune", "KEEP", {"mem": StageSpec(None),
                                                   "tem": StageSpec("target", frozen_mem=True)}, True),
    _baseline("pgtl", "joint", "PGTL", _JOINT, False),
    _baseline("pepnet", "joint", "PEPNet", _JOINT, False),
)}
_plugins_loaded = False


def register(spec: RunSpec) -> RunSpec:
    """Add a model (a plugin's entry; see the module docstring). Registering the same entry again is a no-op.

    Raises:
        ValueError: the name is taken by another entry, or the entry is malformed.
    """
    if _RUNS.get(spec.name) not in (None, spec):
        raise ValueError(f"{PLUGINS_ENV}: a model named {spec.name!r} is registered already")
    if spec.family not in FAMILIES:
        raise ValueError(f"model {spec.name!r}: family {spec.family!r} is not one of {list(FAMILIES)}")
    if not spec.stages or any(s not in ("mem", "tem") for s in spec.stages) or list(spec.stages) == ["tem", "mem"]:
        raise ValueError(f"model {spec.name!r}: stages must be mem, tem or mem then tem, got {list(spec.stages)}")
    if spec.is_baseline and (spec.module is None or spec.model != spec.name):
        raise ValueError(f"model {spec.name!r}: a baseline needs module= and model= its own name")
    _RUNS[spec.name] = spec
    return spec


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"{PLUGINS_ENV}: cannot import {module!r}: {e}") from None


def runs() -> Dict[str, RunSpec]:
    """Every runnable model, by name, in table order (MKT's runs, then the baselines, then plugins)."""
    _load_plugins()
    return dict(_RUNS)


def get(name: str) -> RunSpec:
    """The entry of ``mkt run --runs NAME``.

    Raises:
        ValueError: no such model.
    """
    spec = runs().get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; choose from {list(runs())}")
    return spec


def names() -> Tuple[str, ...]:
    return tuple(runs())


def mkt_names() -> Tuple[str, ...]:
    """MKT and its ablations (not its variants with extra settings, such as ``mkt_cached``: asked for by name)."""
    return tuple(n for n, s in runs().items() if not s.is_baseline and not s.extra)


def baseline_names() -> Tuple[str, ...]:
    return tuple(n for n, s in runs().items() if s.is_baseline)


def model_names() -> Tuple[str, ...]:
    """The values ``model.name`` takes: ``mkt`` and every baseline."""
    return ("mkt",) + baseline_names()


def ablations() -> Tuple[str, ...]:
    """The values ``model.ablation`` takes: ``none`` (MKT) and each ablation's."""
    return tuple(dict.fromkeys(s.ablation for s in runs().values() if not s.is_baseline))


def of_config(model: str, ablation: str = "none") -> RunSpec:
    """The entry a config's ``model.name`` / ``model.ablation`` trains.

    Raises:
        ValueError: no such model.
    """
    for spec in runs().values():
        if spec.model == model and (spec.is_baseline or spec.ablation == ablation):
            return spec
    raise ValueError(f"model.name={model!r} (model.ablation={ablation!r}) is not a registered model; "
                     f"model.name is one of {list(model_names())}")


def family_of(model: str, ablation: str = "none") -> str:
    """The family of a run made with this ``model.name`` / ``model.ablation``; ``other`` if none is registered."""
    try:
        return of_config(model, ablation).family
    except ValueError:
        return "other"


def evaluated_stages(name: str) -> Tuple[str, ...]:
    """The stages of a run that are evaluated: its final stage, and the final stage of each run made as it (the
    ``mkt`` MEM is ``no_tem_finetune``'s model)."""
    spec = get(name)
    made = [s.final_stage for s in runs().values() if s.made_as == name]
    return tuple(st for st in spec.stages if st == spec.final_stage or st in made)
