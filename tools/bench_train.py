"""Benchmark: MEM training rows/s on 2 ranks, TorchRec (arm A) vs plain PyTorch (arm B), paired windows.

Both arms are built once in the same ranks of one launch (``mkt_torchrec.training.distributed.launch``, as
``mkt train --nproc``), kept warm, and timed in interleaved windows, so both see the same machine state.

Arm A, TorchRec, is exactly how ``mkt train`` steps: ``assembly.assemble(cfg, "mem", info)`` (meta-device build
-> fused embedding optimizer -> planner -> ``DistributedModelParallel`` -> ``CombinedOptimizer``), then
``feed.make_pipeline`` (``TrainPipelineSparseDist``) fed by the trainer's ``Feed`` (the ``ParquetReader``,
loss weights from ``_weighted``); one ``pipeline.progress`` is one step.

Arm B, plain PyTorch, is what a team without TorchRec writes: the same MEM dense modules (shared code) with the
sparse arch replaced by one ``nn.Embedding`` weight per table, replicated, and the whole model in
``DistributedDataParallel`` with the settings TorchRec's wrapper gives arm A's dense part
(``gradient_as_bucket_view=True, broadcast_buffers=False``). It reads the same KeyedJaggedTensor batches:
``F.embedding_bag(mode="sum")`` per single-valued feature (an empty bag pools to zeros, as in TorchRec) and, per
behaviour sequence, ``F.embedding`` of its jagged ids (the real ids only, as TorchRec's EmbeddingCollection)
scattered into the zero (B, L, D) padding. Same feed (``Feed`` over its own reader: the same batches in the same
order), batch size, loss weights, threads (``train.threads``) and initial values (dense parameters copied from arm
A, tables from the trainer's ``init_tables`` hash).

The same update rules. Arm A trains its sharded tables with fbgemm's fused EXACT_ROWWISE_ADAGRAD and its
data_parallel tables with ``torchrec.optim.RowWiseAdagrad``: per row with a gradient g (duplicate ids summed),
``m += mean_d(g**2)``, ``w -= lr * g / (sqrt(m) + eps)``, lr / eps from ``plan.embedding_optimizer_kwargs``; the
rest with ``train.dense_optimizer`` (Adam, ``train.dense_lr``), in torch's fused implementation (one kernel for all
parameters: ``assembly.dense_optimizer``). Arm B uses the same dense optimizer in torch's default implementation,
what a plain team writes (``--baseline-dense-optimizer fused`` gives it the fused one: the same update rule), and
:class:`RowwiseAdagrad` with the same lr / eps. ``torchrec.optim.RowWiseAdagrad`` refuses sparse
gradients, so a plain team writes that one; ours takes both kinds of gradient (``--baseline-grads``):

* ``dense`` (default): ``nn.Embedding(sparse=False)``; DDP all-reduces each table's whole gradient with the
  dense ones and the row-wise update runs over the whole table (rows without a gradient get ``m += 0, w -= 0``:
  the lazy rule's result, exactly). TorchRec does the same for its data_parallel tables. On the quickstart's
  small tables (item_id 50k x 8, user_id 40k x 8: 1.6 MB each) it is the faster plain implementation
  (``sparse`` measured about 20% slower here), so it is the fair baseline: the strongest simple one.
* ``sparse``: ``nn.Embedding(sparse=True)``; DDP all-reduces sparse gradients (gloo gathers indices and
  values), the optimizer coalesces them and updates the touched rows only (``index_add_``). The textbook
  choice for large tables.

Check that both arms do the same work: they start from the same values and read the same batches, so their
first warm-up losses agree (``warmup_loss_max_abs_diff``: 0.0 on CPU, both arms compute the same floats).

Timing. After ``--warmup`` steps of each arm, ``--windows`` pairs of windows run in the order A B A B ..., each
``--window-steps`` steps, timed on rank 0 between two ``dist.barrier()`` calls (a window ends when the slowest
rank is done). A window's rows/s is the global rows of its steps (all ranks; real rows, not a finished rank's
filler) over its wall seconds. Reported per arm: the median window and the min / max; ``ratio`` is the median
over pairs of (A rows/s / B rows/s) of each adjacent pair, which cancels drift of the machine's speed (other
processes, thermal state), and ``ratio_min`` / ``ratio_max`` its range. Both arms read through their own reader
inside the timed steps, as ``mkt train`` does (the data phase below shows it costs under 1% of a step).
``cpu_ratio`` is the same comparison in CPU time: rank 0's process CPU seconds per step (all its threads),
median over windows, B / A. It does not count waiting, but other processes on the machine barely move it: when
``loadavg_1m`` (the machine's 1-minute load before and after the run) is well above the rank count, trust
``cpu_ratio`` and the spread more than ``ratio``.

Breakdown (``breakdown``: per arm, ms per step, the median over the steps of one more window per arm, of
``--profile-steps`` steps, run under ``torch.profiler`` after the timed ones; the profiler slows every op, the
small ones of arm A most, so compare proportions). Measured on the main thread of rank 0 as exclusive time:
each microsecond of a step counts in one phase only, the first below that claims it; ``other`` is the rest of
the step (Python of the loop and the pipeline between labels, the profiler itself). On CPU the pipeline has no
side streams, so nothing on the main thread overlaps and the phases partition the step (with ``other``).

* ``communication``: time inside ``torch.distributed`` collectives the main thread issues or waits for (``c10d::``
  / ``gloo:`` ops, TorchRec's ``All2All_*`` autograd functions, its awaitables' ``wait()``, the pipeline's
  ``## start_sparse_data_dist N ##`` / ``## wait_sparse_data_dist N ##``), less the compute ops (``aten::`` /
  ``fbgemm::``) inside them, plus the time the main thread sits idle in backward while a gloo operation runs on
  a worker thread (DDP's asynchronous all-reduce);
* ``data``: the batch from the reader to the device (arm A: the pipeline's ``## copy_batch_to_gpu N ##``, which
  holds ``next(feed)``; arm B: ``next(feed)`` and ``batch.to(device)``);
* ``sparse_forward``: ``mkt.sparse_forward`` (``SparseArch.forward``; arm B's lookups carry the same label) and
  the compute of the input dist (bucketing and permuting ids): lookups, unpacking into padded tensors;
* ``dense_forward``: the rest of the forward (``## forward N ##`` / arm B's forward): the MEM's dense phase, the
  loss, the DMP / DDP forward wrappers;
* ``backward``: the rest of ``## backward N ##`` / ``loss.backward()``; in arm A it holds fbgemm's fused
  embedding update (the fused optimizer runs inside backward);
* ``optimizer``: ``## optimizer N ##`` and ``## zero_grad ##`` / arm B's optimizer steps and ``zero_grad``.

Settings. The project's defaults (``configs/quickstart.yaml``: 2 ranks, ``train.threads=1``, rowwise adagrad,
Adam, the plan TorchRec's planner makes for this world, reported as ``plan``) on a synthetic dataset of
``--rows`` source rows with ``--batch-size`` rows per rank. ``--set KEY=VALUE`` (repeatable) changes a config key
for both arms (e.g. ``--set train.planner.sharding_type=column_wise``); the JSON lists the overrides.

Prints one JSON object on the last line of stdout:

    {"rows_per_s": A median, "baseline_rows_per_s": B median, "ratio": ..., "ratio_min": ..., "ratio_max": ...,
     "cpu_ratio": ..., "rows_per_s_min" / "_max": ..., "baseline_rows_per_s_min" / "_max": ...,
     "breakdown": {"torchrec": {"data": ms, "sparse_forward": ..., "dense_forward": ..., "backward": ...,
                                "optimizer": ..., "communication": ..., "other": ..., "step": ...},
                   "plain": {...}},
     "warmup_loss_max_abs_diff": ..., "plan": {table: "sharding_type/kernel"}, "loadavg_1m": [...], ...}

Usage:
    python tools/bench_train.py                        # 1-2.5 minutes on 2 cores (idle / busy)
    python tools/bench_train.py --windows 40 --window-steps 10 --batch-size 2048
    python tools/bench_train.py --baseline-grads sparse --set train.planner.sharding_type=table_wise
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.profiler import record_function
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PHASES = ("data", "sparse_forward", "dense_forward", "backward", "optimizer", "communication")


def _overrides(args: argparse.Namespace) -> List[str]:
    return [f"synth.users={args.users}", f"synth.source_rows={args.rows}", "synth.row_group_rows=20000",
            "synth.rows_per_file=200000", f"data.batch_size={args.batch_size}", *args.set]


# --------------------------------------------------------------------------------------------------------
# Arm B: plain PyTorch tables and their row-wise adagrad
# --------------------------------------------------------------------------------------------------------


class PlainSparse(nn.Module):
    """Plain-PyTorch twin of ``SparseArch``: the same lookups, one replicated ``nn.Embedding`` per table.

    Args:
        schema: the feature schema.
        features: single-valued features (pooled: ``embedding_bag`` sum, (B, D)).
        sequences: behaviour sequences, with their side columns (their jagged ids looked up, padded to (B, L, D)
            with zeros).
        sparse_grad: ``sparse=True`` gradients (one sparse COO gradient per table) or dense ones.

    Example:
        >>> arch = PlainSparse(cfg.schema, list(cfg.schema.features), list(cfg.schema.sequences))  # doctest: +SKIP
        >>> arch(batch.sparse_features).sequences["hist_source_items"].shape  # (B, L, D)      # doctest: +SKIP
    """

    def __init__(self, schema: Any, features: List[str], sequences: List[str], sparse_grad: bool = False) -> None:
        super().__init__()
        sequences = sequences + schema.side_keys_of(sequences)  # the sequences' side columns are looked up alike
        self.table_of = {k: schema.table_of(k) for k in features + sequences}
        self.tables = nn.ModuleDict({  # sparse=: DDP reads it to expect sparse gradients
            t: nn.Embedding(schema.tables[t].rows, schema.tables[t].dim, sparse=sparse_grad)
            for t in sorted(set(self.table_of.values()))})
        self.max_len = {s: schema.max_len_of(s) for s in sequences}
        self.sparse_grad = sparse_grad

    def forward(self, kjt: Any) -> Any:
        """kjt: jagged, keys include features + sequences -> SparseFeatures: pooled (B, D), sequences (B, L, D),
        lengths (B,)."""
        from mkt_torchrec.modules.sparse import SparseFeatures

        with record_function("mkt.sparse_forward"):
            keys, values, lengths, b = kjt.keys(), kjt.values(), kjt.lengths(), kjt.stride()
            ends = lengths.view(len(keys), b).sum(1).cumsum(0).tolist()  # ids of keys 0..i, per i
            out = SparseFeatures(pooled={}, sequences={}, lengths={})
            for i, key in enumerate(keys):
                if key not in self.table_of:
                    continue
                ids = values[(ends[i - 1] if i else 0):ends[i]]  # (N_key,)
                lens = lengths[i * b:(i + 1) * b]  # (B,)
                weight = self.tables[self.table_of[key]].weight
                if key in self.max_len:
                    out.sequences[key] = self._padded(ids, lens, weight, self.max_len[key])  # (B, L, D)
                    out.lengths[key] = lens.long()
                else:
                    offsets = torch.zeros(b + 1, dtype=lens.dtype, device=lens.device)
                    torch.cumsum(lens, 0, out=offsets[1:])
                    out.pooled[key] = nn.functional.embedding_bag(  # (B, D), an empty bag -> zeros
                        ids, weight, offsets, mode="sum", sparse=self.sparse_grad, include_last_offset=True)
            return out

    def _padded(self, ids: torch.Tensor, lens: torch.Tensor, weight: torch.Tensor, max_len: int) -> torch.Tensor:
        b, d, n = lens.numel(), weight.shape[1], ids.numel()
        emb = nn.functional.embedding(ids, weight, sparse=self.sparse_grad)  # (N, D)
        row = torch.repeat_interleave(torch.arange(b, device=ids.device), lens, output_size=n)  # (N,)
        starts = torch.cumsum(lens, 0) - lens  # (B,)
        pos = torch.arange(n, device=ids.device) - starts[row]  # (N,) position in its row
        flat = emb.new_zeros(b * max_len, d).index_copy(0, row * max_len + pos, emb)  # (B * L, D)
        return flat.view(b, max_len, d)  # (B, L, D)


class RowwiseAdagrad(torch.optim.Optimizer):
    """fbgemm's EXACT_ROWWISE_ADAGRAD for plain tables, on dense or sparse gradients.

    Per row with a gradient g (duplicate ids summed): ``m += mean_d(g**2)``, ``w -= lr * g / (sqrt(m) + eps)``.
    A sparse gradient updates its rows only; a dense one updates every row, which leaves the rows whose gradient
    is zero unchanged (the result of the lazy rule).

    Args:
        params: 2-d tables (rows, D).
        lr: learning rate.
        eps: added to sqrt(m).

    Example:
        >>> opt = RowwiseAdagrad([emb.weight], lr=0.05, eps=1e-8); loss.backward(); opt.step()  # doctest: +SKIP
    """

    def __init__(self, params: Any, lr: float, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)  # (rows,)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, m = p.grad, self.state[p]["sum"]
                if g.is_sparse:
                    g = g.coalesce()
                    rows, vals = g.indices()[0], g.values()  # (n,), (n, D)
                    m.index_add_(0, rows, vals.pow(2).mean(1))
                    std = m.index_select(0, rows).sqrt_().add_(eps)  # (n,)
                    p.index_add_(0, rows, vals / std.unsqueeze(1), alpha=-lr)
                else:
                    m.add_(g.pow(2).mean(1))
                    p.addcdiv_(g, m.sqrt().add_(eps).unsqueeze(1), value=-lr)


class _PlainArm:
    """Arm B on this rank: the MEM with plain tables under DDP, its optimizers and its feed."""

    def __init__(self, cfg: Any, info: Any, manifest: Any, data_dir: str, sparse_grad: bool,
                 dense_init: Dict[str, Any], fused_dense: bool = False) -> None:
        from mkt_torchrec.data.reader import ParquetReader
        from mkt_torchrec.models.mkt import MEM
        from mkt_torchrec.models.losses import MEMTrain, pdl_gamma
        from mkt_torchrec.planning.embedding_optimizer import embedding_optimizer_kwargs
        from mkt_torchrec.training.assembly import _DENSE_OPTIMIZERS, _table_values, dense_optimizer
        from mkt_torchrec.training.feed import Feed

        if cfg.train.embedding_optimizer != "rowwise_adagrad" or cfg.train.embedding_precision != "fp32":
            raise ValueError(f"train.embedding_optimizer={cfg.train.embedding_optimizer}, train.embedding_precision="
                             f"{cfg.train.embedding_precision}: the plain baseline implements rowwise_adagrad on "
                             "fp32 tables only")
        mem = MEM(cfg.schema, cfg.model, device=torch.device("meta"))
        arch = mem.sparse_arch
        mem.sparse_arch = PlainSparse(cfg.schema, arch.features, arch.sequences, sparse_grad)
        if cfg.train.compile:  # --set train.compile=true compiles both arms' dense modules alike
            from mkt_torchrec.models.build import compile_dense

            compile_dense(mem)
        module = MEMTrain(mem, pdl_gamma(cfg.model)).to(info.device)
        module.autocast_device = info.device.type if cfg.train.precision == "bf16" else None  # as assemble does
        with torch.no_grad():
            for name, p in module.named_parameters():
                if ".sparse_arch.tables." in name:
                    table = name.split(".")[-2]
                    p.copy_(_table_values(cfg.train.seed, table, p.shape[0], 0, 0, tuple(p.shape), p.shape[1]))
                elif name in dense_init:
                    p.copy_(dense_init[name])
                else:
                    raise ValueError(f"arm B parameter {name} has no counterpart in arm A")
        self.device = info.device
        self.model = DDP(module, gradient_as_bucket_view=True, broadcast_buffers=False,
                         find_unused_parameters=False)
        tables = [p for n, p in self.model.named_parameters() if ".sparse_arch.tables." in n]
        dense = [p for n, p in self.model.named_parameters() if ".sparse_arch.tables." not in n]
        self.optimizers = [RowwiseAdagrad(tables, **embedding_optimizer_kwargs(cfg)),
                           dense_optimizer(cfg, dense, cfg.train.dense_lr) if fused_dense else
                           _DENSE_OPTIMIZERS[cfg.train.dense_optimizer](dense, lr=cfg.train.dense_lr)]
        reader = ParquetReader(data_dir, "train", cfg.schema, cfg.data, rank=info.rank,
                               world_size=info.world_size, manifest=manifest)
        self.feed = Feed(reader, info, epochs=1 << 30, steps=None)
        self.model.train()

    def step(self) -> Tuple[int, Any]:
        """One training step; returns (global rows of the step, its loss tensor)."""
        with record_function("bench.data"):
            batch = next(self.feed)
            fed = self.feed.handed.popleft()
            batch = batch.to(self.device)
        with record_function("bench.forward"):
            loss, out = self.model(batch)
        with record_function("bench.backward"):
            loss.backward()
        with record_function("bench.optimizer"):
            for o in self.optimizers:
                o.step()
            for o in self.optimizers:
                o.zero_grad()
        return fed.global_rows, out.loss


class _TorchRecArm:
    """Arm A on this rank: ``mkt train``'s assembly, pipeline and feed."""

    def __init__(self, cfg: Any, info: Any, manifest: Any, data_dir: str) -> None:
        from mkt_torchrec.data.reader import ParquetReader
        from mkt_torchrec.training.assembly import assemble
        from mkt_torchrec.training.feed import Feed, make_pipeline

        self.asm = assemble(cfg, "mem", info, manifest=manifest)
        self.asm.model.train()
        self.pipeline = make_pipeline(self.asm.model, self.asm.optimizer, info.device)
        reader = ParquetReader(data_dir, "train", cfg.schema, cfg.data, rank=info.rank,
                               world_size=info.world_size, manifest=manifest)
        self.feed = Feed(reader, info, epochs=1 << 30, steps=None)

    def dense_state(self) -> Dict[str, Any]:
        """Non-table parameters by name (the names a plain ``MEMTrain`` gives them)."""
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        return {k: v for k, v in self.asm.model.state_dict().items()
                if not isinstance(v, ShardedTensor) and ".sparse_arch." not in k}

    def step(self) -> Tuple[int, Any]:
        out = self.pipeline.progress(self.feed)
        fed = self.feed.handed.popleft()  # the batch this step trained
        return fed.global_rows, out.loss

    def plan(self) -> Dict[str, str]:
        """table -> "sharding_type/compute_kernel" of the plan arm A runs."""
        return {table: f"{ps.sharding_type}/{ps.compute_kernel}"
                for module_plan in self.asm.plan.plan.values() for table, ps in module_plan.items()}


# --------------------------------------------------------------------------------------------------------
# Timing and profiling
# --------------------------------------------------------------------------------------------------------


class _Timed(NamedTuple):
    rows_per_s: float  # global rows of the window's steps / its wall seconds
    cpu_ms_per_step: float  # this process's CPU time (all its threads) per step
    losses: List[Any]  # the steps' loss tensors


def _window(step: Callable[[], Tuple[int, Any]], steps: int) -> _Timed:
    """Run ``steps`` steps between two barriers."""
    losses = []
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    rows = 0
    for _ in range(steps):
        n, loss = step()
        rows += n
        losses.append(loss)
    dist.barrier()
    return _Timed(rows / (time.perf_counter() - start), (time.process_time() - cpu) * 1e3 / steps, losses)


def _profiled(step: Callable[[], Tuple[int, Any]], steps: int) -> Dict[str, float]:
    """One window under torch.profiler: the median over its steps of each phase's ms (module docstring)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            with record_function("bench.step"):
                step()
    if os.environ.get("MKT_BENCH_PROFILE_TABLE") and dist.get_rank() == 0:  # the top ops, for a closer look
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    return _phases(prof.events())


_Spans = List[Tuple[float, float]]

# Names of profiler events (see the module docstring); the pipeline's labels end in the batch index
_LABELS = {
    "data": re.compile(r"^## (load[ _]batch.*|(inplace_)?copy_batch_to_gpu( \d+)?) ##$|^bench\.data$"),
    "sparse_forward": re.compile(r"^mkt\.sparse_forward$|^## (start|wait)_sparse_data_dist( \d+)? ##$"),
    "dense_forward": re.compile(r"^## forward( \d+)? ##$|^bench\.forward$"),
    "backward": re.compile(r"^## backward( \d+)? ##$|^bench\.backward$"),
    "optimizer": re.compile(r"^## optimizer( \d+)? ##$|^## zero_grad ##$|^bench\.optimizer$"),
}
# collectives the main thread issues or waits for: c10d ops, TorchRec's all-to-all autograd functions and their
# awaitables' waits, the pipeline's input-dist sections (their compute is taken out again: _COMPUTE)
_COMM = re.compile(r"^c10d::|^gloo:|^nccl:|^record_param_comms|^All2All_|^AllNAll|^ReduceScatter_|^AllGather_|"
                   r"wait\(\) ##$|_wait\]|^## (start|wait)_sparse_data_dist( \d+)? ##$")
_COMPUTE = re.compile(r"^(aten|fbgemm|prims|quantized)::")
_GLOO = re.compile(r"^(gloo|nccl):")


def _union(spans: _Spans) -> _Spans:
    out: _Spans = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _minus(a: _Spans, b: _Spans) -> _Spans:
    """Merged spans ``a`` without merged spans ``b``."""
    out: _Spans = []
    j = 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s = max(s, b[k][1])
            k += 1
        if s < e:
            out.append((s, e))
    return out


def _intersect(a: _Spans, b: _Spans) -> _Spans:
    return _minus(a, _minus(a, b))


def _length(spans: _Spans) -> float:
    return sum(e - s for s, e in spans)


def _phases(events: Any) -> Dict[str, float]:
    """Median over the profiled steps (``bench.step`` spans) of each phase's exclusive ms (module docstring)."""
    events = list(events)
    main = next((e.thread for e in events if e.name == "bench.step"), None)
    mine = [e for e in events if e.thread == main]
    if main is None or not any(_LABELS["dense_forward"].match(e.name) for e in mine):
        raise RuntimeError("the profiled window has no step or forward label: did the pipeline's labels change?")
    spans = lambda pattern, evs=mine: _union([(e.time_range.start, e.time_range.end)  # noqa: E731
                                              for e in evs if pattern.search(e.name)])
    labelled = {phase: spans(pattern) for phase, pattern in _LABELS.items()}
    # the main thread idle inside backward while a collective runs on a gloo thread: DDP's all-reduce wait
    top = _LABELS.values()
    busy = _union([(e.time_range.start, e.time_range.end) for e in mine if e.name != "bench.step" and (
        e.cpu_parent is not None and e.cpu_parent.name != "bench.step" or not any(p.match(e.name) for p in top))])
    gloo = spans(_GLOO, [e for e in events if e.thread != main])
    waiting = _intersect(_minus(labelled["backward"], busy), gloo)
    comm = _minus(_union(spans(_COMM) + waiting), spans(_COMPUTE))
    claimed, exclusive = comm, {"communication": comm}
    for phase in ("data", "sparse_forward", "dense_forward", "backward", "optimizer"):
        exclusive[phase] = _minus(labelled[phase], claimed)
        claimed = _union(claimed + exclusive[phase])
    per_step: Dict[str, List[float]] = {k: [] for k in (*PHASES, "other", "step")}
    for e in mine:
        if e.name == "bench.step":
            whole = [(e.time_range.start, e.time_range.end)]
            ms = {phase: _length(_intersect(exclusive[phase], whole)) / 1e3 for phase in PHASES}
            ms["step"] = _length(whole) / 1e3
            ms["other"] = ms["step"] - sum(ms[phase] for phase in PHASES)
            for k, v in ms.items():
                per_step[k].append(v)
    return {k: round(statistics.median(v), 2) for k, v in per_step.items()}


def _worker(config: str, overrides: List[str], data_dir: str, opts: Dict[str, Any]) -> Dict[str, Any]:
    from mkt_torchrec.config import load_config
    from mkt_torchrec.data.dataset import open_dataset_shared
    from mkt_torchrec.training.distributed import init_distributed

    os.environ["MKT_PROGRESS"] = "0"
    info = init_distributed()
    cfg = load_config(config, overrides)
    torch.set_num_threads(cfg.train.threads)
    manifest = open_dataset_shared(data_dir, cfg.schema)
    arm_a = _TorchRecArm(cfg, info, manifest, data_dir)
    arm_b = _PlainArm(cfg, info, manifest, data_dir, opts["baseline_grads"] == "sparse", arm_a.dense_state(),
                      opts["baseline_dense_optimizer"] == "fused")
    arms = {"torchrec": arm_a.step, "plain": arm_b.step}

    warm = {name: _window(step, opts["warmup"]).losses for name, step in arms.items()}
    first = min(opts["warmup"], 3)
    loss_diff = max(abs(float(a) - float(b)) for a, b in zip(warm["torchrec"][:first], warm["plain"][:first]))
    timed: Dict[str, List[_Timed]] = {name: [] for name in arms}
    for _ in range(opts["windows"]):
        for name, step in arms.items():
            timed[name].append(_window(step, opts["window_steps"]))
    breakdown = {name: _profiled(step, opts["profile_steps"]) for name, step in arms.items()} \
        if opts["profile_steps"] else {}
    return {"rates": {name: [t.rows_per_s for t in ts] for name, ts in timed.items()},
            "cpu_ms": {name: statistics.median(t.cpu_ms_per_step for t in ts) for name, ts in timed.items()},
            "breakdown": breakdown, "warmup_loss_max_abs_diff": loss_diff, "plan": arm_a.plan(),
            "world_size": info.world_size, "threads": cfg.train.threads}


def _summary(out: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    a, b = out["rates"]["torchrec"], out["rates"]["plain"]
    ratios = [x / y for x, y in zip(a, b)]
    return {
        "bench": "train_mem",
        "rows_per_s": round(statistics.median(a)), "baseline_rows_per_s": round(statistics.median(b)),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
        "rows_per_s_min": round(min(a)), "rows_per_s_max": round(max(a)),
        "baseline_rows_per_s_min": round(min(b)), "baseline_rows_per_s_max": round(max(b)),
        "windows_rows_per_s": [round(x) for x in a], "windows_baseline_rows_per_s": [round(x) for x in b],
        "cpu_ratio": round(out["cpu_ms"]["plain"] / out["cpu_ms"]["torchrec"], 3),
        "cpu_ms_per_step_rank0": {k: round(v, 1) for k, v in out["cpu_ms"].items()},
        "breakdown": out["breakdown"],
        "warmup_loss_max_abs_diff": out["warmup_loss_max_abs_diff"],
        "plan": out["plan"], "baseline_grads": args.baseline_grads,
        "dense_optimizer": {"torchrec": "fused (mkt train)", "plain": args.baseline_dense_optimizer},
        "world_size": out["world_size"], "threads_per_rank": out["threads"],
        "batch_size_per_rank": args.batch_size, "windows": args.windows, "window_steps": args.window_steps,
        "warmup": args.warmup, "overrides": list(args.set), "config": os.path.relpath(args.config, REPO),
        "cpu_count": os.cpu_count(), "loadavg_1m": [round(x, 2) for x in out["loadavg"]],
    }


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_Formatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.yaml"),
                   help="the config both arms use")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both arms, repeatable (e.g. train.planner.sharding_type=table_wise)")
    p.add_argument("--rows", type=int, default=150_000, help="source rows of the synthetic dataset")
    p.add_argument("--users", type=int, default=10_000, help="users of the synthetic dataset")
    p.add_argument("--batch-size", type=int, default=1024, help="rows per rank per step")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps of each arm before the windows")
    p.add_argument("--windows", type=int, default=20, help="timed window pairs (A then B)")
    p.add_argument("--window-steps", type=int, default=8, help="steps per timed window")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="steps of the profiled window per arm that gives the breakdown (0: no breakdown)")
    p.add_argument("--baseline-grads", choices=("dense", "sparse"), default="dense",
                   help="arm B's table gradients (see the description above)")
    p.add_argument("--baseline-dense-optimizer", choices=("default", "fused"), default="default",
                   help="arm B's dense optimizer: torch's default implementation (what a plain team writes) or the "
                        "fused one mkt train uses")
    p.add_argument("--nproc", type=int, default=2, help="ranks")
    args = p.parse_args(argv)
    if min(args.warmup, args.windows, args.window_steps) < 1:
        p.error("--warmup, --windows and --window-steps must be at least 1")

    from mkt_torchrec.config import load_config
    from mkt_torchrec.data.synth import generate
    from mkt_torchrec.training.distributed import launch

    load_before = os.getloadavg()[0]
    tmp = tempfile.mkdtemp(prefix="mkt-bench-train-")
    try:
        data_dir = os.path.join(tmp, "data")
        overrides = _overrides(args)
        print(f"generating data in {data_dir} ...", file=sys.stderr, flush=True)
        generate(load_config(args.config, overrides), data_dir)
        opts = {"warmup": args.warmup, "windows": args.windows, "window_steps": args.window_steps,
                "profile_steps": args.profile_steps, "baseline_grads": args.baseline_grads,
                "baseline_dense_optimizer": args.baseline_dense_optimizer}
        out = launch(args.nproc, _worker, args.config, overrides, data_dir, opts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg"] = (load_before, os.getloadavg()[0])
    print(json.dumps(_summary(out, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
