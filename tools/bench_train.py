"""Benchmark: MEM training rows/s with 2 ranks, TorchRec (DMP) vs plain PyTorch (nn.EmbeddingBag + DDP).

Both runs train the same architecture (the MEM's dense modules are shared code) on the same synthetic
dataset, in the same launch, for the same number of steps; the first ``--warmup`` steps are not timed.
The baseline replaces the TorchRec sparse arch with ``nn.EmbeddingBag`` (pooled features) and
``nn.Embedding`` (padded sequences) tables and wraps the whole model in DistributedDataParallel, with Adagrad
on the tables and Adam on the rest. Prints one JSON object on the last line:

    {"rows_per_s": ..., "baseline_rows_per_s": ..., "ratio": ..., ...}

Usage:
    python tools/bench_train.py                    # defaults finish in under a minute on 2 cores
    python tools/bench_train.py --steps 300 --batch-size 2048
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _overrides(args: argparse.Namespace) -> list[str]:
    return [f"synth.users={args.users}", f"synth.source_rows={args.rows}", "synth.row_group_rows=20000",
            "synth.rows_per_file=200000", f"data.batch_size={args.batch_size}", "train.log_every=1000000",
            "train.checkpoint_every=0", "train.threads=1"]


def _plain_sparse(schema, arch):
    """nn.EmbeddingBag / nn.Embedding twins of a SparseArch, trainable, fed from the same KJT."""
    import torch
    from torch import nn

    from mkt_torchrec.modules.sparse import SparseFeatures

    class PlainSparse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tables = nn.ModuleDict({
                t: nn.Embedding(schema.tables[t].rows, schema.tables[t].dim)
                for t in sorted({schema.table_of(k) for k in arch.features + arch.sequences})})
            self.table_of = {k: schema.table_of(k) for k in arch.features + arch.sequences}
            self.features, self.sequences = arch.features, arch.sequences
            self.max_len = arch.max_len

        def forward(self, kjt):
            jts = kjt.to_dict()
            pooled = {}
            for f in self.features:
                jt = jts[f]
                w = self.tables[self.table_of[f]].weight
                # (B, D); an empty bag (null feature) pools to zeros, as in TorchRec's EBC
                pooled[f] = nn.functional.embedding_bag(jt.values(), w, jt.offsets(), mode="sum",
                                                        include_last_offset=True)
            seqs, lens = {}, {}
            for s in self.sequences:
                ids = jts[s].to_padded_dense(self.max_len[s], padding_value=-1)  # (B, L)
                emb = self.tables[self.table_of[s]](ids.clamp(min=0))  # (B, L, D)
                seqs[s] = emb * (ids >= 0).unsqueeze(-1)
                lens[s] = (ids >= 0).sum(1)
            return SparseFeatures(pooled=pooled, sequences=seqs, lengths=lens)

    return PlainSparse()


def _baseline(cfg, data_dir: str, steps: int, warmup: int) -> float:
    """Plain PyTorch MEM under DDP on this rank; returns global rows/s over the timed steps."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mkt_torchrec.data.reader import ParquetReader
    from mkt_torchrec.models.mkt import MEM
    from mkt_torchrec.models.train import MEMTrain, pdl_gamma
    from mkt_torchrec.training.distributed import all_sum, init_distributed

    torch.manual_seed(0)
    mem = MEM(cfg.schema, cfg.model, device=torch.device("meta"))
    mem.sparse_arch = _plain_sparse(cfg.schema, mem.sparse_arch)
    device = init_distributed().device  # the world is already up: this returns its device
    model = DDP(MEMTrain(mem, pdl_gamma(cfg.model)).to(device), find_unused_parameters=True)
    tables = [p for n, p in model.named_parameters() if "sparse_arch.tables" in n]
    dense = [p for n, p in model.named_parameters() if "sparse_arch.tables" not in n]
    opts = [torch.optim.Adagrad(tables, lr=cfg.train.embedding_lr), torch.optim.Adam(dense, lr=cfg.train.dense_lr)]
    reader = ParquetReader(data_dir, "train", cfg.schema, cfg.data, rank=dist.get_rank(),
                           world_size=dist.get_world_size())
    it = iter(reader)
    rows = 0
    start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            dist.barrier()
            start = time.perf_counter()
        batch = next(it)
        loss, _ = model(batch.to(device))
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
        if i >= warmup:
            rows += len(batch)
    dist.barrier()
    seconds = time.perf_counter() - start
    return all_sum([rows], device)[0] / seconds  # on the group's device: NCCL serves CUDA tensors only


def _worker(config: str, overrides: list[str], data_dir: str, run_dir: str, steps: int, warmup: int) -> dict:
    import torch
    import torch.distributed as dist

    from mkt_torchrec.config import load_config
    from mkt_torchrec.training.trainer import train

    os.environ["MKT_PROGRESS"] = "0"
    cfg = load_config(config, overrides + [f"train.max_steps={warmup}"])
    # Time the TorchRec run from the metrics log: one record after warm-up, one at the end.
    cfg.train.log_every = warmup
    train(cfg, "mem", data_dir, run_dir)
    cfg2 = load_config(config, overrides + [f"train.max_steps={warmup + steps}"])
    cfg2.train.log_every = steps
    train(cfg2, "mem", data_dir, run_dir, resume=True)
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    torchrec_rows_per_s = records[-1]["rows_per_s"]
    torch.set_num_threads(1)
    baseline = _baseline(cfg2, data_dir, steps, warmup)
    out = {"rows_per_s": torchrec_rows_per_s, "baseline_rows_per_s": baseline}
    out["world_size"] = dist.get_world_size()
    return out  # launch() leaves the process group


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.yaml"))
    p.add_argument("--rows", type=int, default=150_000, help="source rows of the synthetic dataset")
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=1024, help="rows per rank per step")
    p.add_argument("--steps", type=int, default=40, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    args = p.parse_args(argv)

    from mkt_torchrec.config import load_config
    from mkt_torchrec.data.synth import generate
    from mkt_torchrec.training.distributed import launch

    tmp = tempfile.mkdtemp(prefix="mkt-bench-train-")
    data_dir = os.path.join(tmp, "data")
    overrides = _overrides(args)
    print(f"generating data in {data_dir} ...", file=sys.stderr, flush=True)
    generate(load_config(args.config, overrides), data_dir)
    result = launch(args.nproc, _worker, args.config, overrides, data_dir, os.path.join(tmp, "run"), args.steps,
                    args.warmup)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    result.update({
        "bench": "train_mem", "ratio": round(result["rows_per_s"] / result["baseline_rows_per_s"], 3),
        "rows_per_s": round(result["rows_per_s"]), "baseline_rows_per_s": round(result["baseline_rows_per_s"]),
        "batch_size_per_rank": args.batch_size, "steps": args.steps, "cpu_count": os.cpu_count(),
    })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
