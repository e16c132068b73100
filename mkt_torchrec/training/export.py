"""Export a finished run's serving model to ``RUN/serving/``: a separate, single-process step.

Why separate: exporting inside the distributed trainer meant rank 0 rebuilding every table unsharded while
every other rank waited at a barrier (at industrial scale, hours: long enough for NCCL's watchdog to kill
the waiting ranks), and holding the tables twice (the unsharded training module, then the serving copy).
Here one plain process (no ``torch.distributed`` process group) reads the run's own config and latest
checkpoint and builds the serving model with its tables on ``meta``; then only the tensors the serving
model holds (the TEM, and the MEM's target path: user, shared and target-specific tables, sequences, HFA_t,
the CKE) are allocated, once, as the serving model's own buffers and parameters, and DCP loads just those
keys from the checkpoint (resharding from whatever world size and plan the run used). Source-specific tables
and the source HFA / extractor / tower are never read.

The example input ``torch.export`` traces with is 8 test rows of the dataset when ``data_dir`` is given, or
else synthetic padded ids and dense features built from the schema, so exporting does not need the dataset.

Example:
    >>> from mkt_torchrec.training.export import export_run
    >>> export_run("runs/mkt/tem")                     # doctest: +SKIP
    'runs/mkt/tem/serving/model.pt2'
"""

from __future__ import annotations

import os
from dataclasses import replace
import shutil
import uuid
from typing import Any, Dict, Optional, Tuple

import torch

from mkt_torchrec.config import Config, SchemaConfig
from mkt_torchrec.fsutil import check_replaceable, make_dirs, replace_output
from mkt_torchrec.models.serving import SERVING_FILE, ServingModel, export_serving, padded_ids, serving_keys
from mkt_torchrec.training import checkpoint
from mkt_torchrec.models.build import build_train_module

EXAMPLE_ROWS = 8
_EXPORT_MARKERS = ("serving.json",)  # what makes a directory an export: an output directory is replaced only if so
_EXPORT_WHAT = "a serving export of mkt export"
_CKPT_PREFIX = "model.model."  # train_state's "model." + the loss wrapper's ``.model``


def serving_from_run(run_dir: str) -> Tuple[Config, ServingModel]:
    """The serving model of a run's latest checkpoint, loading only the tensors serving uses.

    The stage module is built with its tables on ``meta`` (nothing allocated); the :class:`ServingModel`
    built from it gets fresh tensors for its tables, which are what DCP loads into, so every served table
    exists once in memory and no other table is read. A stage-2 checkpoint holds no MEM: the MEM's served
    tensors come from the MEM run's checkpoint it records (refused if that changed since).

    Args:
        run_dir: a stage ``tem`` run, or a stage ``mem`` run trained under
            ``model.ablation=no_tem_finetune``; for a baseline (``model.name`` other than ``mkt``), the run of its
            final stage (``mem`` for the joint models, ``tem`` for the others).

    Returns:
        The run's config (from RUN/run.json) and the loaded serving model, in eval mode (a baseline's is a
        :class:`~mkt_torchrec.models.baselines.BaselineServing`, with the same input and output).

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory, or has no complete checkpoint.
        ValueError: a MEM run of another ablation (its served model is stage 2's), or a baseline's pre-training run,
            or a stage-2 run whose MEM checkpoint is gone or changed since it trained.
    """
    from mkt_torchrec import registry
    from mkt_torchrec.models import baselines
    from mkt_torchrec.training.mem_transfer import load_run_checkpoint
    from mkt_torchrec.rundir import RunDir

    run = RunDir(run_dir)
    cfg, stage = run.config(), run.stage()
    spec = registry.of_config(cfg.model.name, cfg.model.ablation)
    if stage != spec.final_stage:
        raise ValueError(f"{run_dir}: a stage {stage!r} run of {spec.name} is pre-training; export its stage "
                         f"{spec.final_stage!r} run (a MEM is served on its own under model.ablation=no_tem_finetune)")
    ckpt = checkpoint.final_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint to export")
    model = build_train_module(cfg, stage, device=torch.device("meta")).model  # MEM, MKTTarget or a baseline
    if cfg.model.name == "mkt":
        serving = ServingModel(cfg.schema, model)
    else:
        serving = baselines.serving_model(baselines.serving_schema(cfg), model)
    del model
    _materialize(serving)
    state: Dict[str, Any] = {_CKPT_PREFIX + serving.source_keys[k]: v
                             for k, v in serving.state_dict(keep_vars=True).items()}
    load_run_checkpoint(ckpt, state, no_dist=True)  # stage 2: the MEM's tensors from the MEM run's checkpoint
    return cfg, serving.eval()


def _serving_schema(cfg: Config) -> SchemaConfig:
    """The schema of the served model's inputs: ``cfg.schema``, or a baseline's own (PGTL: one more key)."""
    if cfg.model.name == "mkt":
        return cfg.schema
    from mkt_torchrec.models import baselines

    return baselines.serving_schema(cfg)


def _materialize(module: torch.nn.Module) -> None:
    """Replace every ``meta`` parameter / buffer of ``module`` by an uninitialised CPU tensor."""
    for name, tensor in list(module.state_dict(keep_vars=True).items()):
        if not tensor.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        real = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
        if isinstance(tensor, torch.nn.Parameter):
            setattr(owner, attr, torch.nn.Parameter(real, requires_grad=False))
        else:
            setattr(owner, attr, real)


def synthetic_example(schema: SchemaConfig, rows: int = EXAMPLE_ROWS,
                      seed: int = 0) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """A serving input built from the schema alone, for tracing: random table rows with some nulls, and
    sequences of lengths from 0 to ``max_len`` (-1 after the length), plus standard-normal dense features.

    Args:
        schema: feature schema.
        rows: batch size (>= 2: ``torch.export`` specialises a dimension of size 0 or 1).
        seed: generator seed.

    Returns:
        ids (key -> (B,) or (B, L) int64, keys as :func:`serving_keys`) and dense (B, F_dense) float32.
    """
    gen = torch.Generator().manual_seed(seed)
    ids: Dict[str, torch.Tensor] = {}
    for key in serving_keys(schema):  # sequences before their side columns
        table_rows = schema.tables[schema.table_of(key)].rows
        max_len = schema.max_len_of(key)
        if max_len is not None:
            values = torch.randint(0, table_rows, (rows, max_len), generator=gen, dtype=torch.int64)
            lengths = torch.linspace(0, max_len, rows).round().long()  # (B,) from empty to full
            ids[key] = values.masked_fill(torch.arange(max_len).unsqueeze(0) >= lengths.unsqueeze(1), -1)
        else:
            values = torch.randint(0, table_rows, (rows,), generator=gen, dtype=torch.int64)
            values[0] = -1  # a null
            ids[key] = values
    dense = torch.randn(rows, len(schema.dense), generator=gen, dtype=torch.float32)
    return ids, dense


def _data_example(cfg: Config, data_dir: str) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """Up to EXAMPLE_ROWS target test rows (the manifest only: training already checked the files); a split
    with fewer than 2 target rows (``torch.export`` traces a batch dimension of at least 2) gets the synthetic
    example."""
    from mkt_torchrec.data.dataset import open_dataset
    from mkt_torchrec.data.reader import ParquetReader

    reader = ParquetReader(data_dir, "test", cfg.schema, replace(cfg.data, num_workers=0), training=False,
                           entity="target", batch_size=EXAMPLE_ROWS,
                           manifest=open_dataset(data_dir, cfg.schema, check_files=False))
    example = next(iter(reader), None)
    if example is None or len(example) < 2:
        return synthetic_example(_serving_schema(cfg))
    schema = _serving_schema(cfg)
    return padded_ids(example.sparse_features, schema, serving_keys(schema)), example.dense_features


def _knowledge_spec(cfg: Config, widths: Any) -> Dict[str, Any]:
    """serving.json's ``knowledge`` of a cached stage 2: the version it was trained with, how the keys are made and
    which kind fills which columns (``mkt_torchrec.cache.keys``; ``mkt score`` is the reference client)."""
    from mkt_torchrec.cache.keys import key_spec
    from mkt_torchrec.models.serving import knowledge_inputs
    from mkt_torchrec.storage import display

    spec = key_spec(cfg.schema, cfg.cache.category_feature)
    dseq = int(widths.seq)
    return {"columns": knowledge_inputs(widths), "cache_version": cfg.cache.version,
            "store": display(str(cfg.cache.uri)) if cfg.cache.uri else None,
            "keys": {**spec.to_dict(), "definition": "mkt_torchrec.cache.keys.keys_of over the table rows"},
            "layout": [["user", "user", 0, int(widths.user)], ["seq", "user_category", 0, dseq],
                       ["shared", "item", 0, int(widths.shared)],
                       ["cross", "user_category", dseq, dseq + int(widths.cross)]],
            "missing_key": "zeros"}


def export_run(run_dir: str, data_dir: Optional[str] = None, out_dir: Optional[str] = None) -> str:
    """Export a run's final model (a stage ``tem`` run, or a ``no_tem_finetune`` MEM run) for serving.

    Single process, no process group: run it after training, not inside it. Writes ``model.pt2`` and
    ``serving.json`` (see :func:`~mkt_torchrec.models.serving.export_serving`) into a temporary sibling
    directory and renames it to ``out_dir`` when complete (replacing a previous export, never anything else), so an
    interrupted export never leaves a finished-looking serving directory.

    Args:
        run_dir: the run directory (its RUN/run.json config and latest checkpoint are used).
        data_dir: a dataset whose test split gives the example input for ``torch.export``; ``None``: a
            synthetic example built from the schema (:func:`synthetic_example`).
        out_dir: where to write (a local path); default ``RUN/serving`` (for a run directory on object storage, its
            local copy, then the store's ``RUN/serving/`` with serving.json last).

    Returns:
        The path of the exported ``model.pt2``.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory, or has no complete checkpoint.
        ValueError: a MEM run not trained under ``model.ablation=no_tem_finetune``.
        FileExistsError: ``out_dir`` exists and is not an earlier export (a file, or a directory without
            serving.json): it is never replaced (:func:`mkt_torchrec.fsutil.replace_output`).
    """
    from mkt_torchrec.rundir import RunDir

    run = RunDir(run_dir)
    to_run = out_dir is None
    out_dir = out_dir or run.serving  # (a run directory on object storage: its local copy, then the store)
    check_replaceable(os.path.abspath(out_dir), _EXPORT_MARKERS, _EXPORT_WHAT)  # before the work, and at the rename
    cfg, serving = serving_from_run(run_dir)
    ids, dense = _data_example(cfg, data_dir) if data_dir else synthetic_example(_serving_schema(cfg))
    knowledge = None
    if getattr(serving, "cached", None) is not None:  # the cached stage 2: the knowledge is an input
        knowledge = _knowledge_spec(cfg, serving.cached)  # type: ignore[arg-type]
        dense = torch.cat([dense, torch.randn(dense.shape[0], len(knowledge["columns"]),
                                              generator=torch.Generator().manual_seed(0))], dim=1)
    parent, name = os.path.split(os.path.abspath(out_dir))
    make_dirs(parent)
    tmp = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        export_serving(_serving_schema(cfg), serving, tmp, ids, dense, knowledge)
        replace_output(tmp, os.path.abspath(out_dir), _EXPORT_MARKERS, _EXPORT_WHAT)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if to_run:
        run.push("serving", last=("serving/serving.json",))  # serving.json marks the export complete
    return os.path.join(out_dir, SERVING_FILE)


__all__ = ["export_run", "serving_from_run", "synthetic_example"]
