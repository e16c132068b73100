"""The serving model: the grey part of the paper's Figure 2, exported without the training code.

:class:`ServingModel` is the TEM plus the frozen MEM's target path only (no source-entity module, no
source-specific table), with plain-PyTorch table lookups (:class:`PaddedLookup`) in place of TorchRec's
sharded collections. Its input is padded table-row ids (see :func:`padded_ids`) and dense features; its output
is the click probability. :func:`export_serving` writes it with ``torch.export`` to one ``.pt2`` file that
``torch.export.load(path).module()`` runs on its own.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Dict, Optional, Union

import torch
from torch import nn

from mkt_torchrec.config import SchemaConfig
from mkt_torchrec.models.mkt import MEM, TEM, MKTTarget
from mkt_torchrec.modules.sparse import PaddedLookup, padded_ids

SERVING_FILE = "model.pt2"


def serving_keys(schema: SchemaConfig) -> list[str]:
    """The sparse inputs of the serving model: user, shared and target-specific features, then sequences."""
    return (schema.features_of("user") + schema.features_of("shared") + schema.features_of("specific", "target")
            + list(schema.sequences))


def _dense_only(module: Union[MEM, TEM], keep_target_tower: bool = False) -> Union[MEM, TEM]:
    """A copy of a MEM / TEM without its TorchRec tables (the serving lookup replaces them).

    Of a MEM only the target path is kept: HFA_t and the CKE, plus TKE and the target tower when the MEM's
    own target tower is the served model (``no_tem_finetune``).
    """
    sparse_arch = module.sparse_arch
    module.sparse_arch = None  # type: ignore[assignment]
    try:
        clone = copy.deepcopy(module)
    finally:
        module.sparse_arch = sparse_arch
    if isinstance(clone, MEM):
        del clone.hfa["source"], clone.extractors["source"], clone.towers["source"]
        if not keep_target_tower:
            del clone.extractors["target"], clone.towers["target"]
    return clone


class ServingModel(nn.Module):
    """TEM + the MEM's target path, or (``no_tem_finetune``) the MEM's target tower alone.

    Args:
        schema: feature schema.
        model: a trained :class:`MKTTarget` (stage 2), or a :class:`MEM` for the ``no_tem_finetune`` ablation.

    Example:
        >>> serving = ServingModel(cfg.schema, stage2_model).eval()                       # doctest: +SKIP
        >>> serving(padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema)),
        ...         batch.dense_features)                                               # (B,) probabilities
    """

    def __init__(self, schema: SchemaConfig, model: Union[MKTTarget, MEM]) -> None:
        super().__init__()
        self.mem_lookup: Optional[PaddedLookup] = None
        self.mem: Optional[MEM] = None
        self.tem_lookup: Optional[PaddedLookup] = None
        self.tem: Optional[TEM] = None
        if isinstance(model, MEM):
            self.mem_lookup = _target_lookup(schema, model)
            self.mem = _dense_only(model, keep_target_tower=True)  # type: ignore[assignment]
        else:
            self.tem_lookup = PaddedLookup(schema, model.tem.sparse_arch)
            self.tem = _dense_only(model.tem)  # type: ignore[assignment]
            if model.mem is not None:
                self.mem_lookup = _target_lookup(schema, model.mem)
                self.mem = _dense_only(model.mem)  # type: ignore[assignment]
        self.requires_grad_(False)

    def forward(self, ids: Dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """ids: key -> (B,) or (B, L) int64 table rows, -1 for null / padding; dense (B, F_dense) -> (B,)."""
        if self.tem is None:
            assert self.mem is not None and self.mem_lookup is not None
            return torch.sigmoid(self.mem.target_logits_from(self.mem_lookup(ids), dense))
        assert self.tem_lookup is not None
        knowledge = None
        if self.mem is not None:
            assert self.mem_lookup is not None
            knowledge = self.mem.knowledge_from(self.mem_lookup(ids), dense)
        return torch.sigmoid(self.tem.dense_forward(self.tem_lookup(ids), dense, knowledge))


def _target_lookup(schema: SchemaConfig, mem: MEM) -> PaddedLookup:
    lookup = PaddedLookup(schema, mem.sparse_arch)
    keep = set(serving_keys(schema))
    lookup.features = [f for f in lookup.features if f in keep]
    for table in {schema.table_of(f) for f in schema.features_of("specific", "source")}:
        if table not in {schema.table_of(k) for k in keep}:
            delattr(lookup, f"table__{table}")  # source-only tables are not served
    return lookup


def export_serving(schema: SchemaConfig, model: Union[MKTTarget, MEM], out_dir: str,
                   example_ids: Dict[str, torch.Tensor], example_dense: torch.Tensor) -> str:
    """Export :class:`ServingModel` with ``torch.export`` to ``out_dir/model.pt2`` (atomically).

    Also writes ``out_dir/serving.json`` describing the inputs. Returns the .pt2 path.
    """
    serving = ServingModel(schema, model).eval()
    batch = torch.export.Dim("batch", min=1)
    dynamic = ({k: {0: batch} for k in example_ids}, {0: batch})
    program = torch.export.export(serving, (example_ids, example_dense), dynamic_shapes=dynamic, strict=False)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, SERVING_FILE)
    partial = os.path.join(out_dir, "model.partial.pt2")
    torch.export.save(program, partial)
    os.replace(partial, path)
    spec = {
        "file": SERVING_FILE,
        "inputs": {k: {"shape": ["B", schema.sequences[k].max_len] if k in schema.sequences else ["B"],
                       "dtype": "int64", "table": schema.table_of(k), "null_or_padding": -1}
                   for k in example_ids},
        "dense": {"shape": ["B", len(schema.dense)], "columns": list(schema.dense), "null": 0.0},
        "output": "click probability, shape (B,)",
        "id_mapping": "raw ids -> table rows with mkt_torchrec.data.schema.map_ids (per table)",
    }
    with open(os.path.join(out_dir, "serving.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
    os.replace(os.path.join(out_dir, "serving.json.tmp"), os.path.join(out_dir, "serving.json"))
    return path


def load_serving(path: str) -> nn.Module:
    """Load an exported serving model (no pickle; torch.export's own format)."""
    return torch.export.load(path).module()


__all__ = ["ServingModel", "export_serving", "load_serving", "padded_ids", "serving_keys"]
