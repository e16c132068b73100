"""MKT's two models: the Multi-Entity Model (stage 1) and the Target Entity Model (stage 2).

MEM (paper 3.2): embeddings -> sequence encoder -> HFA per entity -> CKE (shared MMoE) and SKE / TKE ->
entity towers. TEM (paper 3.3): its own embeddings -> knowledge from the frozen MEM through gates -> DNN.
:class:`MKTTarget` is the stage-2 model (frozen MEM + TEM); its ``serving`` counterpart is in
``mkt_torchrec.models.serving``. Losses live in ``mkt_torchrec.models.losses``.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from mkt_torchrec.config import ENTITIES, ModelConfig, SchemaConfig
from mkt_torchrec.models.base_rate import last_linear
from mkt_torchrec.modules.hfa import HFA, PadAlign
from mkt_torchrec.modules.layers import MMoE, GLUGate, mlp
from mkt_torchrec.modules.sparse import FeatureGroups, GroupArch, SparseArch, SparseFeatures

ENTITY_CODE = {"source": 0, "target": 1}


class EntityOutput(NamedTuple):
    q: torch.Tensor  # (N, d_HFA) HFA output
    g_com: torch.Tensor  # (N, d_CKE) common knowledge (Eq. 7)
    g_ind: torch.Tensor  # (N, d_CKE) independent knowledge from SKE / TKE (Eq. 8)
    logits: torch.Tensor  # (N,) entity tower
    scores: torch.Tensor  # (N, F_spec) HFA importance scores ((N, 0) with no_hfa)


class MEMOutput(NamedTuple):
    logits: torch.Tensor  # (B,) each row scored by its own entity's tower
    g_com: torch.Tensor  # (B, d_CKE)
    g_ind: torch.Tensor  # (B, d_CKE)
    pdl: torch.Tensor  # () Eq. 10: mean cosine(g_com, g_ind) over source rows + the same over target rows
    hfa_scores: Dict[str, torch.Tensor]  # entity -> (B, F_spec_e) every row scored as that entity's; select
    # a row's own with ``entity == ENTITY_CODE[e]``
    hfa_score_mean: torch.Tensor  # () mean HFA score of the source rows + the same of the target rows (0: no_hfa)


class Knowledge(NamedTuple):
    """Same-meaning knowledge the MEM hands to the TEM (paper 3.3): all (B, width) for target rows."""

    user: torch.Tensor  # v_u
    seq: torch.Tensor  # v_seq
    shared: torch.Tensor  # v_shared
    cross: torch.Tensor  # g_com^t, the CKE output through the target gate
    logit: Optional[torch.Tensor] = None  # (B,) the MEM's target-tower logit (``model.tem.mem_logit`` only)


def _check_schema(schema: SchemaConfig) -> None:
    for e in ENTITIES:
        if not schema.features_of("specific", e) and not schema.dense_of("specific", e):
            raise ValueError(f"schema: the {e} entity has no specific feature; HFA needs at least one per entity")


def _mean_over(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of values (B,) over the rows where weight (B,) is 1; 0 when there are none."""
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


class MEM(nn.Module):
    """Multi-Entity Model, pre-trained on mixed source + target rows (paper 3.2).

    v^e = [v_u || v_seq || v_shared || v_spec^e] (Eq. 1-2); q^e = HFA_e(v^e) (Eq. 3-6, one d_HFA for both
    entities); g_com^e = CKE(q^e) with entity e's gate (Eq. 7); g_ind^e = SKE/TKE(v^e) (Eq. 8);
    logit^e = tower_e([g_com^e || g_ind^e]).

    Args:
        schema: feature schema.
        cfg: model config (HFA, CKE, extractors, towers, ablation).
        device: ``meta`` to build without allocating tables (planning, DMP).
        embedding_precision: table storage, ``fp32`` or ``fp16``.

    Example:
        >>> mem = MEM(cfg.schema, cfg.model)                          # doctest: +SKIP
        >>> out = mem(batch.sparse_features, batch.dense_features, batch.entity)
        >>> out.logits.shape                                          # (B,)
    """

    def __init__(self, schema: SchemaConfig, cfg: ModelConfig, device: Optional[torch.device] = None,
                 embedding_precision: str = "fp32") -> None:
        super().__init__()
        _check_schema(schema)
        self.sparse_arch = SparseArch(schema, list(schema.features), list(schema.sequences), device=device,
                                      precision=embedding_precision)
        self.group_arch = GroupArch(schema, cfg.sequence, ENTITIES,
                                    unit_dense=cfg.hfa.fixed_scale and cfg.ablation != "no_hfa")
        ctx = self.group_arch.context_dim
        spec_widths = {e: sum(d) for e, d in self.group_arch.spec_dims.items()}
        if cfg.ablation == "no_hfa":
            padded = max(spec_widths.values())
            self.hfa = nn.ModuleDict({e: PadAlign(ctx, spec_widths[e], padded) for e in ENTITIES})
        else:
            self.hfa = nn.ModuleDict({e: HFA(ctx, self.group_arch.spec_dims[e], cfg.hfa,
                                             dense_blocks=len(self.group_arch.spec_dense[e])) for e in ENTITIES})
        d_q = self.hfa["source"].out_dim
        self.cke = MMoE(d_q, cfg.cke.expert_layers, cfg.cke.experts, num_gates=len(ENTITIES))
        self.extractors = nn.ModuleDict({  # SKE, TKE
            e: mlp(ctx + spec_widths[e], cfg.extractor_layers, linear_last=True) for e in ENTITIES})
        self.towers = nn.ModuleDict({
            e: mlp(2 * self.cke.out_dim, cfg.tower, linear_last=True) for e in ENTITIES})
        self.squared_pdl = cfg.pdl == "squared_cosine"

    # ---- dense phase -----------------------------------------------------------------------------------
    def entity_forward(self, groups: FeatureGroups, entity: str) -> EntityOutput:
        """All rows of ``groups`` as rows of ``entity`` -> EntityOutput (N rows)."""
        context = torch.cat([groups.user, groups.seq, groups.shared], dim=-1)  # (N, d_ctx)
        spec = groups.spec[entity]  # (N, d_spec_e)
        hfa = self.hfa[entity](context, spec)
        g_com = self.cke(hfa.q, gate=ENTITY_CODE[entity])  # (N, d_CKE)
        g_ind = self.extractors[entity](torch.cat([context, spec], dim=-1))  # (N, d_CKE)
        logits = self.towers[entity](torch.cat([g_com, g_ind], dim=-1)).squeeze(-1)  # (N,)
        return EntityOutput(q=hfa.q, g_com=g_com, g_ind=g_ind, logits=logits, scores=hfa.scores)

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """The bias added to each entity's logit (``mkt_torchrec.models.base_rate``)."""
        return {e: last_linear(self.towers[e]).bias for e in ENTITIES}

    def dense_forward(self, sparse: SparseFeatures, dense: torch.Tensor, entity: torch.Tensor) -> MEMOutput:
        """Each entity's path runs on every row and each row keeps its own entity's result (``torch.where``).

        Selecting rows instead (``nonzero`` + index) would make the step wait for the device to report how many
        rows each entity has, and a batch without one entity would leave that path's parameters without a
        gradient (DDP's ``find_unused_parameters``); masking costs the per-entity layers twice the FLOPs of a
        split and keeps the step free of host syncs, with the same values and gradients.
        """
        groups = self.group_arch(sparse, dense)
        logits = g_com = g_ind = pdl = score_mean = None
        scores: Dict[str, torch.Tensor] = {}
        for name, code in ENTITY_CODE.items():
            out = self.entity_forward(groups, name)  # every row as a row of this entity
            mine = entity == code  # (B,)
            weight = mine.to(out.logits.dtype)
            cosine = nn.functional.cosine_similarity(out.g_com, out.g_ind, dim=-1)  # (B,) Eq. 9
            if self.squared_pdl:  # model.pdl: squared_cosine: minimised at orthogonality, not at -g_com
                cosine = cosine * cosine
            part = _mean_over(cosine, weight)  # mean over this entity's rows (Eq. 10)
            # (no_hfa's PadAlign scores nothing; a module type, not a shape: the pipeline FX-traces this forward)
            scored = isinstance(self.hfa[name], HFA)
            score_part = _mean_over(out.scores.mean(dim=-1), weight) if scored else torch.zeros_like(part)
            if logits is None:
                logits, g_com, g_ind, pdl, score_mean = out.logits, out.g_com, out.g_ind, part, score_part
            else:
                logits = torch.where(mine, out.logits, logits)
                g_com = torch.where(mine.unsqueeze(-1), out.g_com, g_com)
                g_ind = torch.where(mine.unsqueeze(-1), out.g_ind, g_ind)
                pdl = pdl + part
                score_mean = score_mean + score_part
            scores[name] = out.scores
        return MEMOutput(logits=logits, g_com=g_com, g_ind=g_ind, pdl=pdl, hfa_scores=scores,
                         hfa_score_mean=score_mean)

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor, entity: torch.Tensor) -> MEMOutput:
        """kjt: jagged sparse features; dense (B, F_dense); entity (B,) 0 = source, 1 = target."""
        return self.dense_forward(self.sparse_arch(kjt), dense, entity)

    def knowledge_from(self, sparse: SparseFeatures, dense: torch.Tensor, with_logit: bool = False) -> Knowledge:
        """The target path only (the grey part of the paper's Figure 2): every row is a target row. With
        ``with_logit`` the target tower runs too (TKE + tower) and its logit is ``Knowledge.logit``."""
        groups = self.group_arch(sparse, dense, entities=("target",))
        if with_logit:
            out = self.entity_forward(groups, "target")
            return Knowledge(user=groups.user, seq=groups.seq, shared=groups.shared, cross=out.g_com,
                             logit=out.logits)
        context = torch.cat([groups.user, groups.seq, groups.shared], dim=-1)
        q = self.hfa["target"](context, groups.spec["target"]).q
        return Knowledge(user=groups.user, seq=groups.seq, shared=groups.shared,
                         cross=self.cke(q, gate=ENTITY_CODE["target"]))

    def target_logits_from(self, sparse: SparseFeatures, dense: torch.Tensor) -> torch.Tensor:
        """The MEM's target tower on every row (the ``no_tem_finetune`` ablation's final model)."""
        groups = self.group_arch(sparse, dense, entities=("target",))
        return self.entity_forward(groups, "target").logits


class TEM(nn.Module):
    """Target Entity Model (paper 3.3): its own embeddings and DNN, with gated knowledge from the MEM.

    x = [v_u || v_seq || v_shared || v_spec^t] of the TEM's own embeddings; with knowledge, each of v_u, v_seq,
    v_shared gets ``+ gate(MEM's vector of the same meaning)`` (Eq. 12 applied per vector). The DNN
    ``cfg.tem.dnn`` (e.g. [128, 64, 16, 1]) is split after layer ``cfg.tem.cross_layer``: that hidden layer's
    output (default: the second, 64 wide) is the TEM's user-entity cross vector g_cross, and
    g_cross_final = g_cross + gate_cross(g_com^t) (Eq. 12) feeds the rest of the DNN.

    Args:
        schema: feature schema.
        cfg: model config.
        knowledge_dims: widths of the MEM's (user, seq, shared, cross) vectors; ``None`` builds the TEM
            without gates (the ``no_mem_pretrain`` single-domain baseline).
        device: ``meta`` to build without allocating tables.
        embedding_precision: table storage, ``fp32`` or ``fp16``.

    Example:
        >>> tem = TEM(cfg.schema, cfg.model, knowledge_dims=None)    # doctest: +SKIP
        >>> tem(batch.sparse_features, batch.dense_features).shape   # (B,)
    """

    def __init__(self, schema: SchemaConfig, cfg: ModelConfig, knowledge_dims: Optional[Knowledge] = None,
                 device: Optional[torch.device] = None, embedding_precision: str = "fp32") -> None:
        super().__init__()
        _check_schema(schema)
        features = (schema.features_of("user") + schema.features_of("shared")
                    + schema.features_of("specific", "target"))
        self.sparse_arch = SparseArch(schema, features, list(schema.sequences), device=device,
                                      precision=embedding_precision)
        self.group_arch = GroupArch(schema, cfg.sequence, ("target",))
        ga = self.group_arch
        x_dim = ga.context_dim + sum(ga.spec_dims["target"])
        dnn = cfg.tem.dnn
        cut = cfg.tem.cross_layer + 1
        self.bottom = mlp(x_dim, dnn[:cut])  # (B, dnn[cross_layer]) = g_cross
        self.top = mlp(dnn[cut - 1], dnn[cut:], linear_last=True)  # -> (B, 1)
        self.mem_logit = knowledge_dims is not None and cfg.tem.mem_logit  # add the MEM's target logit
        if self.mem_logit:  # start as the MEM's own target model: the TEM's correction starts at 0
            last = self.top if isinstance(self.top, nn.Linear) else self.top[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.gates: Optional[nn.ModuleDict] = None
        if knowledge_dims is not None:
            kd = knowledge_dims
            self.gates = nn.ModuleDict({
                "user": GLUGate(int(kd.user), ga.user_dim), "seq": GLUGate(int(kd.seq), ga.seq_dim),
                "shared": GLUGate(int(kd.shared), ga.shared_dim), "cross": GLUGate(int(kd.cross), dnn[cut - 1]),
            })

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """The bias of the target logit (``mkt_torchrec.models.base_rate``); none when the TEM is a correction
        added to the MEM's target logit (``model.tem.mem_logit``: it starts at 0, as the MEM's own model)."""
        return {} if self.mem_logit else {"target": last_linear(self.top).bias}

    def dense_forward(self, sparse: SparseFeatures, dense: torch.Tensor,
                      knowledge: Optional[Knowledge] = None) -> torch.Tensor:
        g = self.group_arch(sparse, dense)
        user, seq, shared = g.user, g.seq, g.shared
        if self.gates is not None:
            if knowledge is None:
                raise ValueError("this TEM was built with knowledge gates; pass the MEM's knowledge")
            user = user + self.gates["user"](knowledge.user)
            seq = seq + self.gates["seq"](knowledge.seq)
            shared = shared + self.gates["shared"](knowledge.shared)
        g_cross = self.bottom(torch.cat([user, seq, shared, g.spec["target"]], dim=-1))  # (B, d_cross)
        if self.gates is not None and knowledge is not None:
            g_cross = g_cross + self.gates["cross"](knowledge.cross)  # Eq. 12
        logits = self.top(g_cross).squeeze(-1)  # (B,)
        if self.mem_logit:
            if knowledge is None or knowledge.logit is None:
                raise ValueError("this TEM adds the MEM's target logit (model.tem.mem_logit); pass knowledge "
                                 "computed with_logit=True")
            logits = logits + knowledge.logit
        return logits

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor,
                knowledge: Optional[Knowledge] = None) -> torch.Tensor:
        return self.dense_forward(self.sparse_arch(kjt), dense, knowledge)


def knowledge_dims(mem: MEM) -> Knowledge:
    """Widths of the vectors :meth:`MEM.knowledge_from` returns (as ints in a Knowledge tuple)."""
    ga = mem.group_arch
    return Knowledge(user=ga.user_dim, seq=ga.seq_dim, shared=ga.shared_dim, cross=mem.cke.out_dim)  # type: ignore[arg-type]


def split_knowledge(dense: torch.Tensor, widths: Knowledge) -> tuple:
    """``[dense || v_u || v_seq || v_shared || g_com^t]`` (the cached stage 2's input, ``mkt_torchrec.cache.knowledge``)
    -> (dense, Knowledge); ``widths`` holds the four widths as ints."""
    sizes = [int(widths.user), int(widths.seq), int(widths.shared), int(widths.cross)]
    own = dense.shape[1] - sum(sizes)
    parts = torch.split(dense, [own, *sizes], dim=1)
    return parts[0], Knowledge(user=parts[1], seq=parts[2], shared=parts[3], cross=parts[4])


class MKTTarget(nn.Module):
    """The stage-2 model: a frozen MEM's target path plugged into a trainable TEM.

    The MEM never trains here: its parameters have ``requires_grad=False``, it stays in eval mode whatever
    ``train()`` is called with, and its forward runs under ``torch.no_grad()``, so no gradient or optimizer
    state ever exists for it. With ``mem=None`` it is the TEM alone (``no_mem_pretrain``), or, with ``cached``, the
    TEM fed the MEM's knowledge from a cache version: the knowledge arrives appended to the dense features
    (:func:`split_knowledge`) and no MEM is held (``model.tem.knowledge: cache``).

    Args:
        tem: the target entity model (built with ``knowledge_dims(mem)`` when ``mem`` is given).
        mem: the pre-trained MEM, or None.
        cached: the knowledge widths (a Knowledge of ints) when the knowledge comes from the cache.

    Example:
        >>> model = MKTTarget(TEM(schema, cfg, knowledge_dims(mem)), mem)     # doctest: +SKIP
        >>> model(batch.sparse_features, batch.dense_features).shape          # (B,)
    """

    def __init__(self, tem: TEM, mem: Optional[MEM] = None, cached: Optional[Knowledge] = None) -> None:
        super().__init__()
        if mem is not None and cached is not None:
            raise ValueError("MKTTarget: the knowledge comes from the MEM or from the cache, not both")
        self.tem = tem
        self.mem = mem
        self.cached = cached
        if mem is not None:
            mem.requires_grad_(False)
            mem.eval()

    def output_biases(self) -> Dict[str, torch.Tensor]:
        """The TEM's (the frozen MEM's biases are the MEM run's)."""
        return self.tem.output_biases()

    def train(self, mode: bool = True) -> "MKTTarget":
        super().train(mode)
        if self.mem is not None:
            self.mem.eval()
        return self

    def forward(self, kjt: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        """kjt: jagged sparse features of target rows; dense (B, F_dense) -> logits (B,)."""
        knowledge = None
        if self.cached is not None:
            dense, knowledge = split_knowledge(dense, self.cached)
        elif self.mem is not None:
            with torch.no_grad():
                knowledge = self.mem.knowledge_from(self.mem.sparse_arch(kjt), dense, self.tem.mem_logit)
        return self.tem(kjt, dense, knowledge)
