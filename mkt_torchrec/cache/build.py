"""``mkt cache build``: a MEM checkpoint's knowledge of every user, item and (user, category) of a dataset, as a
knowledge-cache snapshot (KEEP's offline knowledge extraction, sections 5.2-5.3).

KEEP (arXiv 2208.10174) extracts the pre-trained model's knowledge offline, in decomposed (user-level, item-level)
and degenerated (user x category) form, and hands it to the online model through a versioned key-value cache. Here
the pre-trained model is MKT's MEM (:meth:`mkt_torchrec.models.mkt.MEM.knowledge_from`) and the kinds, vectors and
keys are :mod:`mkt_torchrec.cache.keys`'s. The snapshot's layout is :mod:`mkt_torchrec.cache.snapshot`'s.

How a build runs (every rank at once; no rank does long work while the others wait):

1. **Read.** Rank r reads its share of the target rows of ``cache.splits`` (:class:`ParquetReader`, evaluation
   order, ``cache.batch_size`` rows a batch). The MEM is the trainer's *sharded* one (:func:`assemble` +
   the checkpoint, DCP resharding to this world), so no rank holds a whole copy of the tables.
2. **Compute.** Each batch: the sharded lookup (``mem.sparse_arch``, a collective: every rank steps the same number
   of times, from the reader's schedule, a rank out of rows on a filler batch whose result it drops), then the
   target path (``knowledge_from``), eval mode, no gradient, fp32 (``train.precision`` bf16 runs are computed
   without autocast: the exact values, not a rounding of them). Keys come from the host batch's KJT.
3. **Aggregate.** Per kind and key, float64 sums and counts of the rank's rows, compacted as batches arrive
   (memory follows the distinct keys, not the rows), written as partial files bucketed by ``key % world``.
4. **Merge.** After a barrier rank r reads bucket r of every rank, sums, divides (the *mean* per key: exact for
   ``user`` and ``item``, whose rows of a key carry one and the same vector; KEEP's degeneration for
   ``user_category``) and writes ``<kind>/part-r.parquet`` sorted by key.
5. **Publish.** Rank 0 deletes the partial files and writes ``manifest.json`` last
   (:class:`mkt_torchrec.storage.StagedDirectory`): a build that fails or is killed part-way leaves no snapshot
   (locally its staging directory ``SNAPSHOT.tmp-PID`` at most; on an object store files no manifest names,
   deleted by the next build of that prefix).

Choices left open by KEEP, made here: the mean over the build rows is summed in float64 (the result does not
depend on how rows are split over ranks beyond float64 rounding, far below float32's); the default version name is
``mem-<step>-<8 hex>``, a hash of the MEM digest, schema digest, dataset, splits and key features, so the same
inputs give the same name and a load of it twice is a no-op; settings come from the MEM run's own config except
:data:`BUILD_KEYS` (the cache section, reader workers and threads), which the job's ``--config`` may change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from mkt_torchrec import faults, storage
from mkt_torchrec.cache import keys as cache_keys
from mkt_torchrec.cache.snapshot import FORMAT, FORMAT_VERSION, MANIFEST, parse_manifest, referenced_files
from mkt_torchrec.cache.store import check_name
from mkt_torchrec.config import Config

log = logging.getLogger("mkt.cache")

# What ``mkt cache build`` takes from the job's --config; the model, schema and data settings are the MEM run's.
BUILD_KEYS = ("cache", "data.num_workers", "train.threads")
COMPACT_ROWS = 1 << 20  # rows buffered per kind before they are folded into per-key sums
PARTIAL = "_partial"  # staging sub-directory of the per-rank partial sums, deleted before publishing
FAULT_POINT = "cache_build"  # MKT_FAULT=cache_build:RANK fails that rank after its partial files are written


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """Everything a rank needs, resolved once before the ranks start (picklable: it crosses the launcher).

    Attributes:
        cfg: the MEM run's config with the job's :data:`BUILD_KEYS`.
        mem_run: the MEM run directory; ``mem``: its final checkpoint's :func:`mem_record` (path, step, digest).
        data / out: the dataset read and the snapshot written (paths or URIs, absolute).
        version: the cache version the snapshot holds.
        overwrite: replace a snapshot at ``out`` (only one this tool wrote).
    """

    cfg: Config
    mem_run: str
    mem: Dict[str, Any]
    data: str
    out: str
    version: str
    overwrite: bool


def build_config(mem_run: str, job: Optional[Config]) -> Config:
    """The MEM run's own config (model, schema, data) with the job's :data:`BUILD_KEYS`; the plan is made afresh
    for this world size and dense layers run eagerly (``train.compile`` off: one pass, compiling would not pay).

    Raises:
        ValueError: ``mem_run`` is not a stage-mem run of MKT.
        FileNotFoundError: it is not a run directory.
    """
    from mkt_torchrec.rundir import RunDir

    run = RunDir(mem_run)
    if run.stage() != "mem":
        raise ValueError(f"{run.name}: is a stage {run.stage()!r} run; mkt cache build reads a stage 'mem' run's MEM")
    own = run.config()
    if own.model.name != "mkt":
        raise ValueError(f"{run.name}: is a model.name={own.model.name} run; the knowledge cache holds MKT's MEM "
                         "knowledge")
    settings: Dict[str, Any] = {"train.planner.plan_file": None, "train.compile": False}
    if job is not None:
        raw = job.to_dict()
        for key in BUILD_KEYS:
            section, _, name = key.partition(".")
            settings[key] = raw[section][name] if name else raw[section]
    cfg = own.with_settings(settings)
    cache_keys.key_spec(cfg.schema, cfg.cache.category_feature)  # a bad category feature fails here
    dense = cfg.schema.dense_of("user") + cfg.schema.dense_of("shared")
    if dense:  # v_u / v_shared then carry these values too, which no key holds: the mean over a key's rows
        log.warning("schema: the user / shared dense features %s are part of the MEM's user and item vectors but "
                    "not of their cache keys; each entry is the mean over its key's rows, not the exact vector",
                    dense)
    return cfg


def default_version(mem: Dict[str, Any], cfg: Config, data: str) -> str:
    """``mem-<step>-<8 hex>``: the same MEM checkpoint, schema, dataset, splits and key features give the same
    name (so loading a rebuilt snapshot twice is a no-op), any change another."""
    spec = cache_keys.key_spec(cfg.schema, cfg.cache.category_feature)
    blob = "|".join([mem["digest"], cfg.schema_digest(), storage.absolute(data), ",".join(cfg.cache.splits),
                     json.dumps(spec.to_dict(), sort_keys=True)])
    return f"mem-{mem['step']}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _check_output(out: str, overwrite: bool) -> None:
    """``out`` must be absent, or with ``overwrite`` a snapshot this tool wrote (or empty)."""
    if not storage.exists(out):
        return
    if not overwrite:
        raise FileExistsError(f"{storage.display(out)}: already exists (pass --overwrite to replace a snapshot)")
    marker = storage.join(out, MANIFEST)
    if storage.is_file(marker):
        try:
            found = json.loads(storage.read_bytes(marker)).get("format")
        except (ValueError, AttributeError):
            found = None
        if found != FORMAT:
            raise FileExistsError(f"{storage.display(out)}: holds a manifest.json that is not a knowledge-cache "
                                  f"snapshot's (format {found!r}); refusing to replace it: choose another --out")


def prepare(mem_run: str, data: str, out: str, job: Optional[Config] = None, version: Optional[str] = None,
            overwrite: bool = False) -> BuildPlan:
    """Resolve a build before any rank starts: config, MEM checkpoint and digest, version, output. Cheap, and
    every error is one line here rather than in N ranks."""
    from mkt_torchrec.data.dataset import check_split_readable, open_dataset
    from mkt_torchrec.training import checkpoint
    from mkt_torchrec.training.mem_transfer import mem_record

    cfg = build_config(mem_run, job)
    ckpt = checkpoint.final_checkpoint(mem_run)
    if ckpt is None:
        raise FileNotFoundError(f"{storage.display(mem_run)}: no complete checkpoint of the MEM to build a cache from")
    mem = mem_record(ckpt)
    data = storage.absolute(data)
    manifest = open_dataset(data, cfg.schema)  # a dataset of another schema fails here
    for split in cfg.cache.splits:
        check_split_readable(manifest, storage.display(data), split, cfg.data.validation_fraction)
    if sum(manifest.split_rows(s, "target", cfg.data.validation_fraction) for s in cfg.cache.splits) == 0:
        raise ValueError(f"{storage.display(data)}: the splits {cfg.cache.splits} (cache.splits) hold no target rows "
                         "to compute knowledge from")
    version = check_name("--version", version) if version is not None else default_version(mem, cfg, data)
    out = storage.absolute(out)
    _check_output(out, overwrite)
    return BuildPlan(cfg, storage.absolute(mem_run), mem, data, out, version, overwrite)


# ------------------------------------------------------------------------------------------------------------
# per-key sums
# ------------------------------------------------------------------------------------------------------------


def _group(keys: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with equal keys summed: (K,) sorted keys, (K, D) float64 sums, (K,) int64 counts. Within a key rows are
    added in the order given (a stable sort), so the result is deterministic."""
    if keys.size == 0:
        return keys, sums, counts
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    starts = np.flatnonzero(np.concatenate([[True], k[1:] != k[:-1]]))  # first row of each key
    return k[starts], np.add.reduceat(sums[order], starts, axis=0), np.add.reduceat(counts[order], starts)


class KeySums:
    """Float64 sums and counts of one kind's vectors per key; rows are folded in every :data:`COMPACT_ROWS`.

    Args:
        dim: the kind's vector width.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._parts: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending = 0

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """keys (N,) int64, vectors (N, dim) float32."""
        self._parts.append((keys.astype(np.int64, copy=False), vectors.astype(np.float64),
                            np.ones(keys.shape[0], np.int64)))
        self._pending += keys.shape[0]
        if self._pending >= COMPACT_ROWS:
            self._parts = [self.result()]
            self._pending = 0

    def add_sums(self, keys: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
        """Rows already summed per key, keys sorted and unique (a rank's partial file)."""
        self._parts.append((keys, sums, counts))

    def result(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(K,) sorted keys, (K, dim) float64 sums, (K,) counts."""
        if not self._parts:
            return np.zeros(0, np.int64), np.zeros((0, self.dim)), np.zeros(0, np.int64)
        if len(self._parts) == 1 and self._pending == 0:
            return self._parts[0]
        return _group(*(np.concatenate([p[i] for p in self._parts]) for i in range(3)))


# ------------------------------------------------------------------------------------------------------------
# Parquet files of the build
# ------------------------------------------------------------------------------------------------------------


def _list_column(values: np.ndarray, dim: int, dtype: Any) -> Any:
    import pyarrow as pa

    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), dtype), dim)  # (K * dim,) -> K x [dim]


def _write(staged: Any, rel: str, columns: Dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with staged.open_output(rel) as f:
        pq.write_table(pa.table(columns), f)


def _read_partial(staged: Any, rel: str, dim: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    location = staged.location(rel)
    fs, path = storage.filesystem(location)
    with fs.open_input_file(path) as f:
        t = pq.read_table(f)
    keys = t.column("key").to_numpy()
    sums = t.column("sum").combine_chunks().flatten().to_numpy().reshape(-1, dim)  # (K, dim)
    return keys, sums, t.column("count").to_numpy()


def _partial_name(kind: str, rank: int, bucket: int) -> str:
    return f"{PARTIAL}/{kind}/rank-{rank:05d}-bucket-{bucket:05d}.parquet"


def part_name(kind: str, rank: int) -> str:
    """A snapshot's part file of ``kind`` written by ``rank`` (before an object store's attempt token)."""
    return f"{kind}/part-{rank:05d}.parquet"


# ------------------------------------------------------------------------------------------------------------
# the ranks' work
# ------------------------------------------------------------------------------------------------------------


def _knowledge_rows(plan: BuildPlan, info: Any, manifest: Any, sums: Dict[str, KeySums], mem: Any) -> int:
    """Steps 1-2 (and 3's per-rank part): this rank's rows of every split through the sharded MEM into ``sums``.
    Returns the rows read."""
    import torch

    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.training.scoring import progress_bar

    cfg = plan.cfg
    spec = cache_keys.key_spec(cfg.schema, cfg.cache.category_feature)
    rows = 0
    for split in cfg.cache.splits:
        reader = ParquetReader(plan.data, split, cfg.schema, cfg.data, rank=info.rank, world_size=info.world_size,
                               training=False, entity="target", batch_size=cfg.cache.batch_size, manifest=manifest)
        steps = len(reader.step_rows())  # the same on every rank, from the layout alone: the sharded lookup is a
        mine = reader.batches_left()     # collective, so every rank calls it ``steps`` times
        batches = iter(reader)
        filler = None
        bar = progress_bar(steps, f"cache build {split}", 0, info.is_main)
        for step in range(steps):
            batch = next(batches) if step < mine else None
            if batch is None:  # this rank has read all its rows: step on a filler whose result is dropped
                batch = filler if filler is not None else reader.first_batch()
            filler = batch
            dev = batch.to(info.device)
            with torch.no_grad():
                k = mem.knowledge_from(mem.sparse_arch(dev.sparse_features), dev.dense_features)
                vec = torch.cat([k.user, k.shared, k.seq, k.cross], dim=-1).float().cpu().numpy()  # (B, Du+Di+Ds+Dc)
            bar.update(1)
            if step >= mine:
                continue
            key = cache_keys.keys_of(cache_keys.single_rows(batch.sparse_features, spec.features), spec)
            du, di = k.user.shape[1], k.shared.shape[1]
            sums["user"].add(key["user"], vec[:, :du])
            sums["item"].add(key["item"], vec[:, du:du + di])
            sums["user_category"].add(key["user_category"], vec[:, du + di:])  # [v_seq || g_com^t]
            rows += len(batch)
        bar.close()
        if next(batches, None) is not None:
            raise RuntimeError(f"the reader yielded more than the {mine} batches its schedule counts")
    return rows


def _sharded_mem(cfg: Config, info: Any, manifest: Any, ckpt: str) -> Any:
    """The trainer's sharded MEM (:func:`assemble` for this world, DCP resharding the checkpoint), eval mode."""
    from mkt_torchrec.training.assembly import assemble, train_state
    from mkt_torchrec.training.mem_transfer import load_run_checkpoint

    asm = assemble(cfg, "mem", info, manifest=manifest)
    load_run_checkpoint(ckpt, train_state(asm.model, None))
    asm.model.eval()
    return asm.model.module.model  # DMP -> MEMTrain -> MEM, its tables sharded over the ranks


def _write_partials(staged: Any, sums: Dict[str, KeySums], rank: int, world: int) -> None:
    """Step 3: this rank's per-key sums, one file per kind and merging rank (bucket ``key % world``); frees them."""
    import pyarrow as pa

    for kind, s in sums.items():
        keys, total, counts = s.result()
        bucket = np.mod(keys, world)  # in [0, world) for negative keys too
        for b in range(world):
            sel = bucket == b
            _write(staged, _partial_name(kind, rank, b), {
                "key": pa.array(keys[sel], pa.int64()), "sum": _list_column(total[sel], s.dim, pa.float64()),
                "count": pa.array(counts[sel], pa.int64())})
    sums.clear()


def _merge_bucket(staged: Any, dims: Dict[str, int], rank: int, world: int) -> Dict[str, Tuple[str, int]]:
    """Step 4: bucket ``rank`` of every rank's partial sums -> the mean per key -> the snapshot's part ``rank`` of
    each kind. Returns kind -> (the part's relative name, its entries)."""
    import pyarrow as pa

    out = {}
    for kind, dim in dims.items():
        merged = KeySums(dim)
        for r in range(world):
            merged.add_sums(*_read_partial(staged, _partial_name(kind, r, rank), dim))
        keys, total, counts = merged.result()
        mean = (total / counts[:, None]).astype(np.float32)  # (K, dim)
        rel = part_name(kind, rank)
        _write(staged, rel, {"key": pa.array(keys, pa.int64()), "vector": _list_column(mean, dim, pa.float32())})
        out[kind] = (staged.name(rel), int(keys.shape[0]))
    return out


def _manifest(plan: BuildPlan, dims: Dict[str, int], parts: List[Dict[str, Tuple[str, int]]], source_rows: int,
              ) -> Dict[str, Any]:
    """The snapshot's manifest (:mod:`mkt_torchrec.cache.snapshot` documents it); ``parts``: every rank's
    :func:`_merge_bucket`, in rank order."""
    cfg = plan.cfg
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "version": plan.version,
        "mem_run": plan.mem_run, "mem_checkpoint": plan.mem["path"], "mem_step": plan.mem["step"],
        "mem_digest": plan.mem["digest"], "schema_digest": cfg.schema_digest(), "dims": dims,
        "keys": cache_keys.key_spec(cfg.schema, cfg.cache.category_feature).to_dict(),
        "splits": list(cfg.cache.splits), "data": plan.data,
        "rows": {kind: sum(p[kind][1] for p in parts) for kind in dims},
        "files": {kind: [p[kind][0] for p in parts] for kind in dims},
        "config": {"model": dataclasses.asdict(cfg.model), "schema": dataclasses.asdict(cfg.schema),
                   "cache": {"category_feature": cfg.cache.category_feature, "batch_size": cfg.cache.batch_size}},
        "source_rows": source_rows, "ranks": len(parts),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _publish(staged: Any, plan: BuildPlan, manifest: Dict[str, Any]) -> None:
    """Step 5 (rank 0): delete the partial files, write the manifest last."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    parse_manifest(data, storage.join(plan.out, MANIFEST))  # what mkt cache load will accept
    storage.remove_tree(storage.join(staged.root, PARTIAL))
    staged.publish(data)


def build_rank(plan: BuildPlan) -> Dict[str, Any]:
    """One rank of the build: every rank runs it (collective throughout; the steps are the module docstring's)."""
    import torch
    import torch.distributed as dist

    from mkt_torchrec.collective import Collective
    from mkt_torchrec.data.dataset import open_dataset_shared
    from mkt_torchrec.models.mkt import knowledge_dims
    from mkt_torchrec.storage import StagedDirectory
    from mkt_torchrec.training.distributed import init_distributed

    started = time.perf_counter()
    info = init_distributed()
    torch.set_num_threads(plan.cfg.train.threads)
    group = Collective(info.device)  # each step a phase: an error on any rank reaches every rank
    manifest = open_dataset_shared(plan.data, plan.cfg.schema)
    staged = group.on_root(lambda: StagedDirectory(plan.out, MANIFEST, "a knowledge-cache snapshot",
                                                   overwrite=plan.overwrite, references=referenced_files))
    rank, world = info.rank, info.world_size
    try:
        mem = _sharded_mem(plan.cfg, info, manifest, plan.mem["path"])
        kd = knowledge_dims(mem)
        dims = cache_keys.kind_dims(kd.user, kd.seq, kd.shared, kd.cross)
        sums = {kind: KeySums(dim) for kind, dim in dims.items()}
        rows = _knowledge_rows(plan, info, manifest, sums, mem)  # steps 1-2

        def partials() -> None:  # step 3, then MKT_FAULT=cache_build:R fails rank R (the tests' killed build)
            _write_partials(staged, sums, rank, world)
            faults.fault_point(FAULT_POINT, rank)

        group.phase(partials)
        parts = group.phase(lambda: _merge_bucket(staged, dims, rank, world))
        source_rows = sum(group.phase(lambda: rows))
        snapshot = _manifest(plan, dims, parts, source_rows)
        group.on_root(lambda: _publish(staged, plan, snapshot))
    except BaseException:
        if info.is_main:  # (the other ranks stop with this rank: run_rank ends the world)
            with contextlib.suppress(Exception):  # the first error is the one to report
                staged.abort()
        raise
    dist.barrier()
    return {"snapshot": storage.display(plan.out), "version": plan.version, "rows": snapshot["rows"],
            "source_rows": source_rows, "mem_digest": plan.mem["digest"], "ranks": world,
            "seconds": round(time.perf_counter() - started, 1)}


def build_snapshot(plan: BuildPlan, nproc: int = 0) -> Dict[str, Any]:
    """Run the build of ``plan`` in ``nproc`` local processes (torch elastic), or, with 0, as this process's rank of
    the world its environment describes (torchrun / TorchX) or a world of one. Returns rank 0's summary."""
    from mkt_torchrec.training.distributed import launch, run_rank

    if nproc < 0:
        raise ValueError(f"--nproc must be >= 0, got {nproc}")
    return launch(nproc, build_rank, plan) if nproc > 0 else run_rank(build_rank, plan)
