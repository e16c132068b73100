"""Memory at scale (issue 21, point 6): what a pass, a table initialisation and a stage-2 checkpoint hold.

- ``score_split`` keeps copies of the columns it writes, not views of the feed's batches (pinned host memory on
  CUDA): the batches of a pass are freed as it goes.
- ``init_tables`` hashes each shard on the shard's device, in chunks of rows: bounded temporaries, the same bits.
- A stage-2 checkpoint leaves the frozen MEM out and records the MEM checkpoint (path, step, digest); everything
  that reads it takes the MEM from there, and a resume whose MEM checkpoint changed is refused.
"""

import gc
import hashlib
import json
import math
import os
import shutil
import weakref
import zlib
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from mkt_torchrec.cli import main
from mkt_torchrec.data.reader import ParquetReader
from mkt_torchrec.training import assembly, checkpoint, mem_transfer, scoring
from mkt_torchrec.models.build import build_train_module
from mkt_torchrec.training.assembly import train_state
from mkt_torchrec.rundir import RunDir
from mkt_torchrec.training.mem_transfer import load_unsharded

from tests.conftest import QUICKSTART, SMALL, set_flags, small_config

MEM_KEYS = "model.model.mem."  # stage 2's frozen MEM in a stage-2 state dict
STEPS = ("train.checkpoint_every=1000", "data.batch_size=128")


@pytest.fixture
def world_of_one():
    from mkt_torchrec.training.distributed import init_distributed

    created = not dist.is_initialized()
    info = init_distributed()
    yield info
    if created:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# score_split
# ---------------------------------------------------------------------------------------------------------


def test_score_split_holds_no_batch_of_the_pass_it_has_scored(small_dataset, tmp_path, world_of_one):
    """On CUDA the feed pins every batch; a numpy view of a batch column keeps that batch's (pinned) buffer alive
    until the pass ends, so pinned memory grew with the pass. Emulated on the CPU: the pipeline moves each batch's
    columns into buffers it can watch (numpy arrays, which a tensor made with ``torch.from_numpy`` keeps alive as
    long as anything uses its memory) and counts, at every step, the earlier batches whose buffers are still
    alive; with copies only the few in flight are."""
    cfg = small_config("data.batch_size=32")
    reader = ParquetReader(small_dataset, "test", cfg.schema, cfg.data, training=False)
    buffers, most_alive = [], 0
    columns = ("user_id", "entity", "labels", "activity", "true_prob")

    class Pipeline:  # the eval pipeline's contract: pull one batch, return its StepOutput
        def progress(self, feed):
            nonlocal most_alive
            gc.collect()
            most_alive = max(most_alive, sum(any(ref() is not None for ref in refs) for refs in buffers))
            batch = next(feed)  # the very object score_split reads back from feed.handed
            refs = []
            for name in columns:
                value = getattr(batch, name)
                if value is not None:
                    buffer = value.numpy().copy()  # stands for the pinned buffer the feed made
                    refs.append(weakref.ref(buffer))
                    setattr(batch, name, torch.from_numpy(buffer))
            buffers.append(refs)
            return SimpleNamespace(logits=torch.zeros(len(batch)), hfa=None, entity=batch.entity)

    scoring.score_split(Pipeline(), reader, world_of_one, str(tmp_path / "pred"), "test")
    scored = pq.read_table(tmp_path / "pred" / "part-00000.parquet")
    assert scored.num_rows == reader.num_rows() and len(buffers) >= 20
    assert scored.column("user_id").to_pylist()[:5] == next(iter(reader)).user_id[:5].tolist()
    assert most_alive <= 3, f"{most_alive} of {len(buffers)} batches' buffers still alive during the pass"


# ---------------------------------------------------------------------------------------------------------
# init_tables
# ---------------------------------------------------------------------------------------------------------


def _whole_table_reference(seed, table, rows, dim):
    """The hash as it was before chunking (one call for the whole table, on the CPU): the values to reproduce."""
    salt = (zlib.crc32(table.encode()) << 20) ^ (seed * 0x9E3779B9)
    r = torch.arange(0, rows, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(0, dim, dtype=torch.int64).unsqueeze(0)
    h = assembly._mix(r * dim + c + salt)
    unit = ((h >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
    return ((unit * 2.0 - 1.0) * (1.0 / math.sqrt(rows))).float()


class _Tables:
    """What init_tables reads of a model: a state dict of table weights."""

    def __init__(self, **weights):
        self.weights = weights

    def state_dict(self):
        return self.weights


def _spy_table_values(monkeypatch, compute=True):
    calls = []
    real = assembly._table_values

    def spy(seed, table, rows, row0, col0, shape, dim, device=None):
        calls.append({"table": table, "row0": row0, "col0": col0, "shape": tuple(shape), "device": device})
        if not compute:
            return torch.empty(shape, device="meta")
        return real(seed, table, rows, row0, col0, shape, dim, **({} if device is None else {"device": device}))

    monkeypatch.setattr(assembly, "_table_values", spy)
    return calls


def test_init_tables_hashes_every_shard_in_small_chunks_to_the_same_bits(monkeypatch, world_of_one):
    """Chunks forced to 10 entries: a plain table and a ShardedTensor of three row / column shards get exactly the
    values of the whole-table hash, each call on the shard's device and at most 10 entries (or one row)."""
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardMetadata

    monkeypatch.setattr(assembly, "_INIT_CHUNK_ELEMENTS", 10, raising=False)
    calls = _spy_table_values(monkeypatch)
    pieces = [((0, 0), (7, 5)), ((0, 5), (7, 7)), ((7, 0), (13, 12))]  # (offsets, sizes) of a 20 x 12 table
    shards = [Shard(torch.zeros(size), ShardMetadata(list(off), list(size), "rank:0/cpu")) for off, size in pieces]
    sharded = ShardedTensor._init_from_local_shards(shards, 20, 12)
    plain = torch.zeros(33, 4)
    assembly.init_tables(_Tables(**{"sparse.ebc.embedding_bags.user_id.weight": sharded,
                                   "sparse.ec.embeddings.item_id.weight": plain}), seed=7)

    whole = _whole_table_reference(7, "user_id", 20, 12)
    for (r0, c0), (h, w) in pieces:
        local = next(s.tensor for s in sharded.local_shards() if list(s.metadata.shard_offsets) == [r0, c0])
        assert torch.equal(local, whole[r0:r0 + h, c0:c0 + w]), (r0, c0)
    assert torch.equal(plain, _whole_table_reference(7, "item_id", 33, 4))
    assert all(c["shape"][0] * c["shape"][1] <= 10 or c["shape"][0] == 1 for c in calls), calls
    assert {c["device"] for c in calls} == {torch.device("cpu")}
    assert len([c for c in calls if c["table"] == "item_id"]) == math.ceil(33 / (10 // 4))


def test_init_tables_of_an_industrial_user_id_shard_keeps_every_chunk_small(monkeypatch):
    """A 150M x 8 user_id table (about 5 GB of values, 30 GB of int64 / float64 temporaries in one piece), on the
    ``meta`` device so nothing is allocated: every hash call is on the table's device and at most
    ``_INIT_CHUNK_ELEMENTS`` (4M) entries, and the calls cover every row once, in order."""
    calls = _spy_table_values(monkeypatch, compute=False)
    rows = 150_000_000
    assembly.init_tables(_Tables(**{"model.sparse_arch.ebc.embedding_bags.user_id.weight":
                                   torch.empty(rows, 8, device="meta")}), seed=0)
    assert calls and max(c["shape"][0] * c["shape"][1] for c in calls) <= 1 << 22
    assert {c["device"] for c in calls} == {torch.device("meta")}
    starts = [c["row0"] for c in calls]
    assert starts[0] == 0 and all(b - a == c["shape"][0] for a, b, c in zip(starts, starts[1:], calls))
    assert starts[-1] + calls[-1]["shape"][0] == rows


# ---------------------------------------------------------------------------------------------------------
# Stage-2 checkpoints without the frozen MEM
# ---------------------------------------------------------------------------------------------------------


def _train(stage, data, run, *extra_args, sets=()):
    args = ["train", "--config", QUICKSTART, *set_flags(*SMALL, *STEPS, *sets), "--stage", stage, "--data", data,
            "--run-dir", run, *extra_args]
    return main(args)  # in this process, a world of one


@pytest.fixture(scope="module")
def runs(small_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_runs")
    mem, tem = str(root / "mem"), str(root / "tem")
    assert _train("mem", small_dataset, mem, sets=("train.max_steps=3",)) == 0
    assert _train("tem", small_dataset, tem, "--mem-run", mem, sets=("train.max_steps=4",)) == 0
    return {"mem": mem, "tem": tem}


def _keys(ckpt):
    return set(checkpoint.SafeFileSystemReader(ckpt).read_metadata().state_dict_metadata)


def test_a_stage2_checkpoint_holds_no_mem_and_records_the_mem_checkpoint(runs):
    tem_ckpt, mem_ckpt = checkpoint.latest_checkpoint(runs["tem"]), checkpoint.final_checkpoint(runs["mem"])
    keys = _keys(tem_ckpt)
    assert any(k.startswith("model.model.tem.") for k in keys)
    assert not [k for k in keys if k.startswith(MEM_KEYS)], "the frozen MEM was saved again"
    digest = hashlib.sha256(open(os.path.join(mem_ckpt, ".metadata"), "rb").read()).hexdigest()
    assert checkpoint.read_extra(tem_ckpt)[mem_transfer.MEM_RECORD] == {
        "path": os.path.abspath(mem_ckpt), "step": 3, "digest": f"sha256:{digest}"}
    # what the MEM checkpoint holds of the MEM is everything stage 2's MEM has
    mem_state = load_unsharded(RunDir(runs["tem"]).config(), "tem", tem_ckpt).state_dict()
    frozen = {k[len("model.mem."):] for k in mem_state if k.startswith("model.mem.")}
    assert frozen and {"model.model." + k for k in frozen} <= _keys(mem_ckpt)


def _reference_scores(tem_run, mem_run, cfg, data):
    """Stage 2's click probabilities on the target test rows, its model put together by hand: the MEM's tensors
    read from the MEM run's checkpoint, everything else from the stage-2 checkpoint (no trainer loader)."""
    module = build_train_module(RunDir(tem_run).config(), "tem", device=torch.device("cpu"))
    state = train_state(module, None)
    mem = {"model.model." + k[len(MEM_KEYS):]: v for k, v in state.items() if k.startswith(MEM_KEYS)}
    checkpoint.load(checkpoint.final_checkpoint(mem_run), mem, no_dist=True)
    checkpoint.load(checkpoint.final_checkpoint(tem_run), {k: v for k, v in state.items()
                                                           if not k.startswith(MEM_KEYS)}, no_dist=True)
    module.load_state_dict({k[len("model."):]: v for k, v in state.items()})
    model = module.model.eval()
    scores, users = [], []
    with torch.no_grad():
        for b in ParquetReader(data, "test", cfg.schema, cfg.data, training=False, entity="target"):
            scores.append(torch.sigmoid(model(b.sparse_features, b.dense_features)))
            users.append(b.user_id)
    return torch.cat(scores), torch.cat(users)


def test_evaluate_and_export_of_stage2_use_the_mem_of_the_mem_run(runs, small_dataset):
    from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
    from mkt_torchrec.training.export import export_run

    assert main(["evaluate", "--config", QUICKSTART, *set_flags("data.batch_size=128"), "--run-dir", runs["tem"],
                 "--data", small_dataset]) == 0
    cfg = small_config("data.batch_size=128")
    ref, users = _reference_scores(runs["tem"], runs["mem"], cfg, small_dataset)
    predicted = pq.read_table(os.path.join(runs["tem"], "predictions", "part-00000.parquet")).to_pydict()
    assert predicted["user_id"] == users.tolist()
    torch.testing.assert_close(torch.tensor(predicted["score"]), ref, rtol=0, atol=1e-6)

    served = load_serving(export_run(runs["tem"], small_dataset))
    batch = next(iter(ParquetReader(small_dataset, "test", cfg.schema, cfg.data, training=False, entity="target")))
    ids = padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema))
    torch.testing.assert_close(served(ids, batch.dense_features), ref[:len(batch)], rtol=0, atol=1e-6)


def test_stage2_resumes_with_the_recorded_mem_and_refuses_a_changed_one(runs, small_dataset, tmp_path, capsys):
    """A resumed stage 2 reloads the MEM checkpoint its checkpoint records and trains to the same parameters as the
    straight run; once that MEM checkpoint was re-trained (same step, another seed) the resume is refused with one
    line naming the stage-2 checkpoint and the MEM checkpoint."""
    mem = str(tmp_path / "mem")
    shutil.copytree(runs["mem"], mem)  # the module's MEM run stays untouched for the other tests
    tem = str(tmp_path / "tem")
    assert _train("tem", small_dataset, tem, "--mem-run", mem, sets=("train.max_steps=2",)) == 0
    assert _train("tem", small_dataset, tem, "--mem-run", mem, "--resume", sets=("train.max_steps=4",)) == 0
    cfg = RunDir(tem).config()
    a = load_unsharded(cfg, "tem", checkpoint.latest_checkpoint(runs["tem"])).state_dict()
    b = load_unsharded(cfg, "tem", checkpoint.latest_checkpoint(tem)).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    other = str(tmp_path / "mem-seed1")
    assert _train("mem", small_dataset, other, sets=("train.max_steps=3", "train.seed=1")) == 0
    mem_ckpt = checkpoint.final_checkpoint(mem)
    shutil.rmtree(mem_ckpt)
    shutil.copytree(checkpoint.final_checkpoint(other), mem_ckpt)  # the MEM run was trained again
    tem_ckpt = checkpoint.latest_checkpoint(tem)
    capsys.readouterr()
    assert _train("tem", small_dataset, tem, "--mem-run", mem, "--resume", sets=("train.max_steps=6",)) == 1
    err = capsys.readouterr().err
    line = next((x for x in err.splitlines() if "frozen MEM" in x), "")
    assert tem_ckpt in line and mem_ckpt in line and "changed" in line, err
    assert checkpoint.latest_checkpoint(tem) == tem_ckpt  # nothing trained or saved
    with pytest.raises(ValueError, match="has changed since"):  # readers refuse it too
        load_unsharded(cfg, "tem", tem_ckpt)


def test_checkpoint_sizes_tool_counts_the_bytes_the_checkpoints_hold(runs, tmp_path):
    """tools/checkpoint_sizes.py, on the runs' own config: stage 1 and stage 2 (new) equal the tensor bytes of the
    runs' checkpoints; stage 2 (old) adds the MEM's model tensors, what stage-2 checkpoints held before."""
    import subprocess
    import sys

    import yaml

    from tests.conftest import REPO

    def tensor_bytes(ckpt, prefix=""):
        md = checkpoint.SafeFileSystemReader(ckpt).read_metadata().state_dict_metadata
        return sum(m.size.numel() * torch.empty(0, dtype=m.properties.dtype).element_size()
                   for k, m in md.items() if k.startswith(prefix))

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(RunDir(runs["tem"]).config().to_dict()))
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "checkpoint_sizes.py"), "--config",
                           str(config)], capture_output=True, text=True, check=True)
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    mem_ckpt, tem_ckpt = checkpoint.final_checkpoint(runs["mem"]), checkpoint.latest_checkpoint(runs["tem"])
    assert sizes["stage1_bytes"] == tensor_bytes(mem_ckpt)
    assert sizes["stage2_new_bytes"] == tensor_bytes(tem_ckpt)
    assert sizes["stage2_old_bytes"] == tensor_bytes(tem_ckpt) + tensor_bytes(mem_ckpt, "model.")
