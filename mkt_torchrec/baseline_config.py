"""Settings of the baselines (``model.baselines``, ``model.pgtl``, ``model.keep``): part of the config
(:mod:`mkt_torchrec.config`), kept apart so that module stays one job. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mkt_torchrec.typed import check

KNOWLEDGE = ("user", "item", "interaction")  # KEEP's knowledge vectors K_u, K_i, K_ui (models/baselines/keep.py)


@dataclass
class BaselinesConfig:
    """Layer sizes of the paper's ten baselines (4.1.2; ``model.name`` other than ``mkt``), defaults from its 4.1.3.

    Args:
        dnn: DNN of the single-domain models (MLP, DIN, FiBiNet) and of Finetune's and CTNet's base model (paper:
            [128, 64, 16, 1] public, [1024, 512, 64, 1] industrial); the last size is 1 (a logit).
        shared: shared network of the joint models: each MMoE expert, PLE's experts (one extraction level per size),
            STAR's star-topology layers before the towers, CoNet's two base networks, MiNet's network (paper: [128, 64]
            public, [1024, 512] industrial).
        tower: each entity's tower after ``shared`` (paper: [16, 1] public, [64, 1] industrial); the last size is 1.
        mmoe_experts: MMoE's experts (paper: 3).
        ple_specific_experts: PLE's experts per entity at each extraction level.
        ple_shared_experts: PLE's shared experts at each extraction level.
        attention_mlp: hidden sizes of DIN's activation unit (DIN's released code: [80, 40]) and of MiNet's
            item-level and interest-level attention networks.
        fibinet_reduction: reduction ratio of FiBiNet's SENET layer (FiBiNet paper: 3).
        fibinet_bilinear: FiBiNet's bilinear interaction: ``field_all`` (one matrix), ``field_each`` (one per
            field) or ``field_interaction`` (one per field pair).
    """

    dnn: list[int] = field(default_factory=lambda: [128, 64, 16, 1])
    shared: list[int] = field(default_factory=lambda: [128, 64])
    tower: list[int] = field(default_factory=lambda: [16, 1])
    mmoe_experts: int = 3
    ple_specific_experts: int = 1
    ple_shared_experts: int = 1
    attention_mlp: list[int] = field(default_factory=lambda: [80, 40])
    fibinet_reduction: int = 3
    fibinet_bilinear: Literal["field_all", "field_each", "field_interaction"] = "field_interaction"

    def _validate(self, key: str) -> None:
        for name in ("dnn", "shared", "tower", "attention_mlp"):
            layers = getattr(self, name)
            check(len(layers) > 0 and all(x >= 1 for x in layers), f"{key}.{name}",
                   f"expected a non-empty list of positive ints, got {layers}")
        for name in ("dnn", "tower"):
            layers = getattr(self, name)
            check(layers[-1] == 1, f"{key}.{name}", f"the last size must be 1 (a logit), got {layers}")
        for name in ("mmoe_experts", "ple_specific_experts", "ple_shared_experts", "fibinet_reduction"):
            check(getattr(self, name) >= 1, f"{key}.{name}", f"expected a positive int, got {getattr(self, name)}")


@dataclass
class PGTLConfig:
    """PGTL, the prior-guided transfer baseline (``model.name=pgtl``; ``mkt_torchrec.models.baselines.pgtl``).

    Args:
        ablation: ``none``, or the paper's Table 3 variants: ``no_specific_embedding`` (the shared embeddings
            only, no domain attention) or ``no_prior`` (the target item's own features stand in for the prior).
        attention: hidden sizes of each domain's attention network over a field's embedding (paper: [6, 4]).
        generator: sizes of each feature generator G_f (source, prior, target); the last is the item width.
        tower: each entity's CTR tower over [context, item representation]; the last size is 1.
        lambda_steps: training steps over which the gradient reversal's lambda follows DANN's 2/(1+exp(-10p))-1,
            p = min(1, step / lambda_steps).
        adversarial_weight: weight of the discriminator's cross-entropy in the loss.
    """

    ablation: Literal["none", "no_specific_embedding", "no_prior"] = "none"
    attention: list[int] = field(default_factory=lambda: [6, 4])
    generator: list[int] = field(default_factory=lambda: [128, 64])
    tower: list[int] = field(default_factory=lambda: [64, 16, 1])
    lambda_steps: int = 1000
    adversarial_weight: float = 1.0

    def _validate(self, key: str) -> None:
        for name in ("attention", "generator", "tower"):
            layers = getattr(self, name)
            check(len(layers) > 0 and all(x >= 1 for x in layers), f"{key}.{name}",
                   f"expected a non-empty list of positive ints, got {layers}")
        check(self.tower[-1] == 1, f"{key}.tower", f"the last size must be 1 (a logit), got {self.tower}")
        check(self.lambda_steps >= 1, f"{key}.lambda_steps", f"expected a positive int, got {self.lambda_steps}")
        check(self.adversarial_weight >= 0, f"{key}.adversarial_weight", "expected a number >= 0")


@dataclass
class KeepConfig:
    """KEEP, the knowledge extraction and plugging baseline (``model.name=keep``;
    ``mkt_torchrec.models.baselines.keep``).

    Args:
        knowledge: which knowledge vectors are plugged, in K(u, i) order: ``user`` (K_u, the extractor's user-id
            embedding), ``item`` (K_i, its entity-shared feature embeddings), ``interaction`` (K_ui, its DNN's last
            hidden layer); the paper plugs all three (4.2.3), one at a time is its ablation.
    """

    knowledge: list[str] = field(default_factory=lambda: list(KNOWLEDGE))

    def _validate(self, key: str) -> None:
        check(len(self.knowledge) > 0 and len(set(self.knowledge)) == len(self.knowledge)
              and set(self.knowledge) <= set(KNOWLEDGE), f"{key}.knowledge",
              f"expected a non-empty list of distinct names from {list(KNOWLEDGE)}, got {self.knowledge}")
