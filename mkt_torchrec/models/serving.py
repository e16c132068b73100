"""The serving model: the grey part of the paper's Figure 2, exported without the training code.

:class:`ServingModel` is the TEM plus the frozen MEM's target path only (no source-entity module, no
source-specific table), with plain-PyTorch table lookups (:class:`PaddedLookup`) in place of TorchRec's
sharded collections. Its input is padded table-row ids (see :func:`padded_ids`) and dense features; its output
is the click probability. :func:`export_serving` writes it with ``torch.export`` to one ``.pt2`` file that
``torch.export.load(path).module()`` runs on its own.

The serving lookups hold the trained tables themselves (detached, not copied), so building a serving model
never doubles the memory of the tables; ``mkt_torchrec.training.export`` builds one on ``meta`` tables and
loads only the tensors it holds (:attr:`ServingModel.source_keys`) from a checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pickle
from typing import Any, Dict, Iterator, Optional, Set, Tuple, Union

import torch
from torch import nn

from mkt_torchrec.config import SchemaConfig
from mkt_torchrec.models.mkt import MEM, TEM, Knowledge, MKTTarget, split_knowledge
from mkt_torchrec.modules.sparse import PaddedLookup, SparseArch, padded_ids

SERVING_FILE = "model.pt2"


def serving_keys(schema: SchemaConfig) -> list[str]:
    """The sparse inputs of the serving model: user, shared and target-specific features, then sequences, then
    the sequences' side columns."""
    return (schema.features_of("user") + schema.features_of("shared") + schema.features_of("specific", "target")
            + list(schema.sequences) + schema.side_keys)


def _dense_only(module: Union[MEM, TEM], keep_target_tower: bool = False) -> Union[MEM, TEM]:
    """A copy of a MEM / TEM without its TorchRec tables (the serving lookup replaces them).

    Of a MEM only the target path is kept: HFA_t and the CKE, plus TKE and the target tower when the MEM's
    own target tower is the served model (``no_tem_finetune``) or its logit feeds the TEM (``tem.mem_logit``).
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

    The table buffers of its lookups are the trained tables themselves (detached, sharing storage: no copy);
    the dense layers are copies. Build it from a model that no longer trains. A model built with its tables
    on ``meta`` gives a serving model with ``meta`` table buffers, to be materialised and loaded by the caller.

    Args:
        schema: feature schema.
        model: a trained :class:`MKTTarget` (stage 2), or a :class:`MEM` for the ``no_tem_finetune`` ablation.

    Attributes:
        source_keys: this model's ``state_dict()`` key -> the key of the same tensor in ``model.state_dict()``
            (what a checkpoint of ``model`` holds it under); covers every tensor the serving model has.

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
        self.cached: Optional[Knowledge] = None  # the knowledge arrives with the dense features (a cache version)
        self.source_keys: Dict[str, str] = {}
        if isinstance(model, MEM):
            self.mem_lookup, keys = _target_lookup(schema, model)
            self._record("mem_lookup.", "", keys)
            self.mem = _dense_only(model, keep_target_tower=True)  # type: ignore[assignment]
            self._record("mem.", "", {k: k for k in self.mem.state_dict()})
        else:
            self.tem_lookup, keys = _shared_lookup(schema, model.tem.sparse_arch)
            self._record("tem_lookup.", "tem.", keys)
            self.tem = _dense_only(model.tem)  # type: ignore[assignment]
            self._record("tem.", "tem.", {k: k for k in self.tem.state_dict()})
            self.cached = model.cached
            if model.mem is not None:
                self.mem_lookup, keys = _target_lookup(schema, model.mem)
                self._record("mem_lookup.", "mem.", keys)
                self.mem = _dense_only(model.mem, keep_target_tower=model.tem.mem_logit)  # type: ignore[assignment]
                self._record("mem.", "mem.", {k: k for k in self.mem.state_dict()})
        self.requires_grad_(False)
        unmatched = set(self.state_dict()) ^ set(self.source_keys)
        assert not unmatched, f"serving state without a source key (or the reverse): {sorted(unmatched)}"

    def _record(self, prefix: str, source_prefix: str, keys: Dict[str, str]) -> None:
        self.source_keys.update({prefix + k: source_prefix + v for k, v in keys.items()})

    def forward(self, ids: Dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """ids: key -> (B,) or (B, L) int64 table rows, -1 for null / padding; dense (B, F_dense) -> (B,)."""
        if self.tem is None:
            assert self.mem is not None and self.mem_lookup is not None
            return torch.sigmoid(self.mem.target_logits_from(self.mem_lookup(ids), dense))
        assert self.tem_lookup is not None
        knowledge = None
        if self.cached is not None:  # dense (B, F_dense + knowledge widths): see knowledge_inputs
            dense, knowledge = split_knowledge(dense, self.cached)
        elif self.mem is not None:
            assert self.mem_lookup is not None
            knowledge = self.mem.knowledge_from(self.mem_lookup(ids), dense, self.tem.mem_logit)
        return torch.sigmoid(self.tem.dense_forward(self.tem_lookup(ids), dense, knowledge))


def _shared_lookup(schema: SchemaConfig, arch: SparseArch,
                   keep: Optional[Set[str]] = None) -> Tuple[PaddedLookup, Dict[str, str]]:
    """A PaddedLookup over ``arch``'s own (detached) tables, restricted to the features in ``keep`` (all by
    default) and the tables they and the sequences use; and its buffer name -> the table's key in
    ``arch.state_dict()`` prefixed ``sparse_arch.``."""
    features = [f for f in arch.features if keep is None or f in keep]
    tables = {schema.table_of(k) for k in features + arch.sequences + arch.side_keys}
    weights = {t: w for t, w in arch.table_weights().items() if t in tables}
    lookup = PaddedLookup(schema, features, list(arch.sequences), weights)  # the trained tables, not copies
    name_of = {id(p): n for n, p in arch.named_parameters()}
    keys = {f"table__{table}": "sparse_arch." + name_of[id(weight)] for table, weight in weights.items()}
    return lookup, keys


def _target_lookup(schema: SchemaConfig, mem: MEM) -> Tuple[PaddedLookup, Dict[str, str]]:
    """The MEM's lookup for its target path: source-only tables are not served."""
    return _shared_lookup(schema, mem.sparse_arch, set(serving_keys(schema)))


def knowledge_inputs(widths: Knowledge) -> list[str]:
    """Names of the dense input columns a cached stage 2's serving model takes after the dense features: the
    cache's vectors in :class:`Knowledge` order (``mkt_torchrec.cache.knowledge``)."""
    return [f"knowledge.{name}[{i}]" for name in Knowledge._fields[:4] for i in range(int(getattr(widths, name)))]


def export_serving(schema: SchemaConfig, model: Union[MKTTarget, MEM, ServingModel], out_dir: str,
                   example_ids: Dict[str, torch.Tensor], example_dense: torch.Tensor,
                   knowledge: Optional[Dict[str, Any]] = None) -> str:
    """Export :class:`ServingModel` with ``torch.export`` to ``out_dir/model.pt2`` (atomically).

    Also writes ``out_dir/serving.json`` describing the inputs.

    Args:
        schema: feature schema.
        model: a trained :class:`MKTTarget` / :class:`MEM` (wrapped in a ServingModel here), or a ServingModel.
        out_dir: directory to write (created if missing).
        example_ids: example input, key -> (B,) / (B, L) int64 (see :func:`padded_ids`), with B >= 2.
        example_dense: (B, F_dense) float32 (a cached stage 2: (B, F_dense + knowledge widths)).
        knowledge: a cached stage 2: how its extra dense columns are looked up (cache version, kinds, keys), written
            to serving.json's ``knowledge``.

    Returns:
        The path of ``model.pt2``.
    """
    serving = (model if isinstance(model, ServingModel) else ServingModel(schema, model)).eval()
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
        "inputs": {k: {"shape": ["B", schema.max_len_of(k)] if schema.max_len_of(k) is not None else ["B"],
                       "dtype": "int64", "table": schema.table_of(k), "null_or_padding": -1}
                   for k in example_ids},
        "dense": {"shape": ["B", int(example_dense.shape[1])],
                  "columns": list(schema.dense) + (knowledge["columns"] if knowledge else []), "null": 0.0},
        **({"knowledge": {k: v for k, v in knowledge.items() if k != "columns"}} if knowledge else {}),
        "output": "click probability, shape (B,)",
        "id_mapping": "raw ids -> table rows with mkt_torchrec.data.schema.map_ids (per table)",
    }
    with open(os.path.join(out_dir, "serving.json.tmp"), "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=2)
    os.replace(os.path.join(out_dir, "serving.json.tmp"), os.path.join(out_dir, "serving.json"))
    return path


class UnsafeServingFile(ValueError):
    """A serving archive that asks to unpickle more than tensors."""


@contextlib.contextmanager
def _tensor_only_torch_load() -> Iterator[None]:
    """Make every ``torch.load`` inside the block ``weights_only=True`` (tensors and plain containers only)."""
    real = torch.load

    def tensors_only(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = tensors_only  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load = real  # type: ignore[assignment]


def load_serving(path: str, trusted: bool = False) -> nn.Module:
    """Load an exported serving model (``model.pt2``).

    A ``.pt2`` archive may mark weights, constants and example inputs as pickles, and ``torch.export.load``
    unpickles them with ``torch.load(weights_only=False)``, i.e. a crafted archive runs code. Ours never
    pickles (plain tensors are stored raw), so by default every ``torch.load`` during loading is forced to
    ``weights_only=True``: a file from someone else can then hold tensors and graph JSON only.

    Args:
        path: the ``.pt2`` file.
        trusted: skip that restriction (only for files you exported yourself with custom objects).

    Raises:
        UnsafeServingFile: the archive holds a pickle that is not plain tensors.
    """
    if trusted:
        return torch.export.load(path).module()
    try:
        with _tensor_only_torch_load():
            return torch.export.load(path).module()
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeServingFile(f"{path}: refused: it holds a pickle that is not plain tensors ({first})") from None


__all__ = ["ServingModel", "UnsafeServingFile", "export_serving", "load_serving", "padded_ids", "serving_keys"]
