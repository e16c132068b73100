"""GPU smoke test: a tiny synthetic job through the whole GPU path on one machine, step by step.

Run it first on a new GPU machine (one node, N GPUs)::

    python tools/gpu_smoke.py --nproc 8          # default --nproc: the visible GPUs (else 2, on CPU)
    python tools/gpu_smoke.py --device cpu --nproc 2 --emulate-accelerator   # the CPU half (CI, no GPU)

Every job it starts is the ``mkt`` command a user runs (``python -m mkt_torchrec.cli``, ``--nproc N``), on a
dataset of a few thousand rows it synthesises first; a training run is ``train.max_steps`` steps with a
checkpoint after every step. The steps:

1. ``mkt synth`` the dataset (configs/quickstart.yaml, small sizes; the global batch is 256 rows at any N).
2. Stage 1 (``--stage mem``) uninterrupted; the same run killed right after step 1 (the trainer's test hook
   ``MKT_FAIL_AT_STEP=mem:1``: the last rank exits once step 1's checkpoint is published), then ``--resume``;
   PASS when the resumed run's final checkpoint equals the uninterrupted one's bit for bit (every tensor:
   model, every optimizer's state).
3. Stage 2 (``--stage tem``) the same way: the uninterrupted run on the uninterrupted MEM, the killed and
   resumed run on the resumed MEM.
4. ``mkt evaluate --nproc N`` on both stage-2 runs: their ``metrics.json`` (less ``run_dir``) and predictions
   equal.
5. ``mkt export`` of the resumed stage-2 run: ``model.pt2`` loads (``torch.export.load``, tensors only) and its
   scores on rank 0's first test rows equal the evaluated predictions of those rows (on CPU to 1e-5; on CUDA to
   2e-3, as evaluation's dense layers run in TensorFloat-32 there: ``train.tf32``).
6. The device: every run's ``plan.json`` was made for the expected device (``cuda`` / ``cpu``). On ``--device
   cuda`` every job runs with ``MKT_DEVICE=cuda``, so a job that finds no GPU stops at start instead of training
   on the CPU, and a PASS means the jobs ran on CUDA (NCCL).

Output: one line per step (``PASS  name (12.3 s)``, ``FAIL  name (1.0 s): reason`` or ``SKIP  name: after
...`` when a step it needs failed), a summary line, and a JSON object on the last line (steps, pass / fail,
seconds, device, nproc, workdir). Exit status 0 when every step passed, 1 otherwise, 2 for bad arguments. Each
job's stdout / stderr is in WORKDIR/logs/; the work directory is kept when a step failed (or with ``--keep``)
and removed otherwise. The tool reads only what it wrote: ``--workdir`` must be new or empty.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

CONFIG = os.path.join(REPO, "configs", "quickstart.yaml")
STEPS = 3  # train.max_steps of every run; the killed runs die after step FAIL_AFTER
FAIL_AFTER = 1
GLOBAL_BATCH = 256  # rows of one step over all ranks: the per-rank batch is GLOBAL_BATCH // nproc
SERVED_ROWS = 16  # rank 0's first test rows scored by the exported model
TOLERANCE = {"cpu": 1e-5, "cuda": 2e-3}  # served vs evaluated scores (CUDA: TF32 in evaluation)

# tests/conftest.py's SMALL sizes: a dataset of about 6,000 source and 2,000 target rows that trains in seconds
SYNTH = ["synth.users=400", "synth.source_rows=6000", "synth.source_items=2000", "synth.target_items=600",
         "synth.row_group_rows=500", "synth.rows_per_file=2000", "data.validation_fraction=0.1",
         "schema.sequences.hist_source_items.max_len=50", "schema.sequences.hist_target_items.max_len=50"]
TRAIN = ["train.patience=0", f"train.max_steps={STEPS}", "train.checkpoint_every=1", "train.log_every=1"]
# variables of the environment that would change what a job does; the tool sets its own
TEST_HOOKS = ("MKT_FAIL_AT_STEP", "MKT_FAULT", "MKT_DEVICE", "MKT_EMULATE_ACCELERATOR")


class StepFailed(Exception):
    """A step's check did not hold; the message is the one-line reason."""


@dataclass
class StepResult:
    name: str
    status: str  # pass, fail, skip
    seconds: float
    detail: str = ""


@dataclass
class Smoke:
    """The run's settings and what its steps produced (WORK is the work directory)."""

    work: str
    nproc: int
    device: str  # cuda or cpu
    emulate: bool
    step_timeout: int
    results: List[StepResult] = field(default_factory=list)

    @property
    def data(self) -> str:
        return os.path.join(self.work, "data")

    def run_dir(self, variant: str, stage: str) -> str:
        return os.path.join(self.work, variant, stage)

    def batch_flags(self) -> List[str]:
        return ["--set", f"data.batch_size={max(1, GLOBAL_BATCH // self.nproc)}"]

    def env(self, **extra: str) -> Dict[str, str]:
        """The jobs' environment: the caller's, less the test hooks, plus the device choice."""
        env = {k: v for k, v in os.environ.items() if k not in TEST_HOOKS}
        env["MKT_PROGRESS"] = "0"
        if self.device == "cuda":
            env["MKT_DEVICE"] = "cuda"  # no GPU: the job stops at start, saying why
        elif self.emulate:  # MKT_DEVICE=cpu would switch the emulation off; hide any GPU instead
            env["MKT_EMULATE_ACCELERATOR"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""
        else:
            env["MKT_DEVICE"] = "cpu"
        env.update(extra)
        return env

    # ------------------------------------------------------------------------------------------------------
    # running steps
    # ------------------------------------------------------------------------------------------------------

    def step(self, name: str, check: Callable[[], str], needs: tuple = ()) -> bool:
        """Run ``check`` (its return value is a detail for the line; StepFailed or any error is a FAIL), print
        the step's line, record it. A step whose ``needs`` did not all pass is skipped."""
        failed = [n for n in needs if self.status(n) != "pass"]
        if failed:
            self._record(StepResult(name, "skip", 0.0, f"after {failed[0]!r} did not pass"))
            return False
        start = time.monotonic()
        try:
            result = StepResult(name, "pass", 0.0, check() or "")
        except StepFailed as e:
            result = StepResult(name, "fail", 0.0, str(e))
        except Exception as e:  # noqa: BLE001 - any error of a check is that step's FAIL, in one line
            result = StepResult(name, "fail", 0.0, _one_line(f"{type(e).__name__}: {e}"))
        result.seconds = round(time.monotonic() - start, 1)
        self._record(result)
        return result.status == "pass"

    def status(self, name: str) -> Optional[str]:
        return next((r.status for r in self.results if r.name == name), None)

    def _record(self, result: StepResult) -> None:
        self.results.append(result)
        label = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[result.status]
        timing = f" ({result.seconds:.1f} s)" if result.status != "skip" else ""
        detail = f": {result.detail}" if result.detail and result.status != "pass" else (
            f" [{result.detail}]" if result.detail else "")
        print(f"{label}  {result.name}{timing}{detail}", flush=True)

    def mkt(self, log_name: str, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """Run ``mkt ARGS`` (this Python, this repository) with its output in WORK/logs/LOG_NAME.log."""
        logs = os.path.join(self.work, "logs")
        os.makedirs(logs, exist_ok=True)
        cmd = [sys.executable, "-m", "mkt_torchrec.cli", *args]
        with open(os.path.join(logs, f"{len(self.results) + 1:02d}-{log_name}.log"), "w") as log:
            log.write(" ".join(cmd) + "\n\n")
            log.flush()
            # a session of its own: on a timeout the job's ranks (torch elastic's children) are stopped with it
            proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.env(), stdout=log, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
            try:
                _, stderr = proc.communicate(timeout=self.step_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise StepFailed(f"timed out after {self.step_timeout} s (--step-timeout)") from None
            log.write(stderr)
        return subprocess.CompletedProcess(cmd, proc.returncode, None, stderr)

    def mkt_ok(self, log_name: str, *args: str) -> None:
        proc = self.mkt(log_name, *args)
        if proc.returncode != 0:
            raise StepFailed(f"exit {proc.returncode}: {_last_line(proc.stderr)}")

    # ------------------------------------------------------------------------------------------------------
    # the steps' checks
    # ------------------------------------------------------------------------------------------------------

    def synth(self) -> str:
        self.mkt_ok("synth", "synth", "--config", CONFIG, *_sets(SYNTH), "--out", self.data)
        with open(os.path.join(self.data, "manifest.json"), encoding="utf-8") as f:
            rows = json.load(f)["rows"]
        return f"train rows {rows['train']}"

    def train_args(self, stage: str, variant: str, mem_variant: str) -> List[str]:
        args = ["train", "--config", CONFIG, *_sets(SYNTH + TRAIN), *self.batch_flags(), "--stage", stage,
                "--data", self.data, "--run-dir", self.run_dir(variant, stage), "--nproc", str(self.nproc)]
        return args + (["--mem-run", self.run_dir(mem_variant, "mem")] if stage == "tem" else [])

    def train(self, stage: str, variant: str, mem_variant: str) -> str:
        self.mkt_ok(f"train-{stage}-{variant}", *self.train_args(stage, variant, mem_variant))
        run = self.run_dir(variant, stage)
        step = _final_step(run)
        if step != STEPS:
            raise StepFailed(f"final checkpoint is at step {step}, not train.max_steps={STEPS}")
        if stage == "tem" and not os.path.isfile(os.path.join(run, "serving", "model.pt2")):
            raise StepFailed("the stage-2 run wrote no serving/model.pt2")
        return f"{STEPS} steps"

    def kill(self, stage: str) -> str:
        proc = self.mkt(f"kill-{stage}", *self.train_args(stage, "resumed", "resumed"),
                        env=self.env(MKT_FAIL_AT_STEP=f"{stage}:{FAIL_AFTER}"))
        if proc.returncode == 0:
            raise StepFailed(f"the run finished: MKT_FAIL_AT_STEP={stage}:{FAIL_AFTER} killed no rank")
        step = _final_step(self.run_dir("resumed", stage))
        if step != FAIL_AFTER:
            raise StepFailed(f"latest checkpoint at step {step}, not {FAIL_AFTER} "
                             f"(exit {proc.returncode}: {_last_line(proc.stderr)})")
        return f"exit {proc.returncode} after step {FAIL_AFTER}"

    def resume(self, stage: str) -> str:
        self.mkt_ok(f"resume-{stage}", *self.train_args(stage, "resumed", "resumed"), "--resume")
        run = self.run_dir("resumed", stage)
        step = _final_step(run)
        if step != STEPS:
            raise StepFailed(f"final checkpoint is at step {step}, not {STEPS}")
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
            logged = [r["step"] for r in map(json.loads, f) if "loss" in r]
        if logged != list(range(1, STEPS + 1)):
            raise StepFailed(f"metrics.jsonl logs steps {logged}, not 1..{STEPS} once each")
        return f"steps {FAIL_AFTER + 1}..{STEPS}"

    def bit_equal(self, stage: str) -> str:
        from mkt_torchrec.training import checkpoint

        a, b = (checkpoint.latest_checkpoint(self.run_dir(v, stage)) for v in ("straight", "resumed"))
        reason = compare_checkpoints(a, b)
        if reason:
            raise StepFailed(reason)
        return f"{len(_tensor_keys(a))} tensors"

    def evaluate(self, variant: str) -> str:
        run = self.run_dir(variant, "tem")
        self.mkt_ok(f"evaluate-{variant}", "evaluate", "--config", CONFIG, *self.batch_flags(), "--run-dir", run,
                    "--data", self.data, "--nproc", str(self.nproc))
        metrics = _read_json(os.path.join(run, "metrics.json"))
        if metrics.get("world_size") != self.nproc or not metrics.get("target", {}).get("rows"):
            raise StepFailed(f"metrics.json: world_size {metrics.get('world_size')}, target rows "
                             f"{metrics.get('target', {}).get('rows')}")
        return f"target AUC {metrics['target'].get('auc', float('nan')):.4f}"

    def metrics_equal(self) -> str:
        import pyarrow.parquet as pq

        a, b = (self.run_dir(v, "tem") for v in ("straight", "resumed"))
        ma, mb = ({k: v for k, v in _read_json(os.path.join(r, "metrics.json")).items() if k != "run_dir"}
                  for r in (a, b))
        if ma != mb:
            keys = sorted(k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k))
            raise StepFailed(f"metrics.json differ in {keys}")
        parts = [sorted(os.listdir(os.path.join(r, "predictions"))) for r in (a, b)]
        if parts[0] != parts[1] or len(parts[0]) != self.nproc:
            raise StepFailed(f"prediction files differ: {parts[0]} vs {parts[1]}")
        for name in parts[0]:
            if not pq.read_table(os.path.join(a, "predictions", name)).equals(
                    pq.read_table(os.path.join(b, "predictions", name))):
                raise StepFailed(f"predictions/{name} differ")
        return f"{len(parts[0])} prediction files equal"

    def export(self) -> str:
        from mkt_torchrec.models.serving import load_serving

        out = os.path.join(self.work, "export")
        self.mkt_ok("export", "export", "--run-dir", self.run_dir("resumed", "tem"), "--data", self.data,
                    "--out", out)
        path = os.path.join(out, "model.pt2")
        if not os.path.isfile(path):
            raise StepFailed(f"{path} is missing")
        load_serving(path)  # torch.export.load, every torch.load inside it weights_only
        return f"{os.path.getsize(path) // 1024} KiB"

    def served_scores(self) -> str:
        """The exported model's scores on rank 0's first test rows vs that rank's evaluated predictions (rank 0
        scores the rows its reader deals it, in order, and writes them to predictions/part-00000.parquet)."""
        import pyarrow.parquet as pq
        import torch

        from mkt_torchrec.data.reader import ParquetReader
        from mkt_torchrec.models.serving import load_serving, padded_ids, serving_keys
        from mkt_torchrec.rundir import RunDir

        run = self.run_dir("resumed", "tem")
        cfg = RunDir(run).config()
        reader = ParquetReader(self.data, "test", cfg.schema, cfg.data, rank=0, world_size=self.nproc,
                               training=False, entity="target")
        batch = next(iter(reader))
        rows = min(SERVED_ROWS, int(batch.labels.numel()))
        pred = pq.read_table(os.path.join(run, "predictions", "part-00000.parquet")).slice(0, rows).to_pydict()
        if pred["user_id"] != batch.user_id[:rows].tolist() or pred["label"] != batch.labels[:rows].tolist():
            raise StepFailed("rank 0's predictions are not its reader's first test rows: cannot pair the scores")
        model = load_serving(os.path.join(self.work, "export", "model.pt2"))
        with torch.no_grad():
            ids = padded_ids(batch.sparse_features, cfg.schema, serving_keys(cfg.schema))
            served = model(ids, batch.dense_features).reshape(-1)[:rows].double()
        diff = float((served - torch.tensor(pred["score"], dtype=torch.float64)).abs().max())
        tolerance = TOLERANCE[self.device]
        if not diff <= tolerance:
            raise StepFailed(f"served scores differ from the evaluated ones by up to {diff:.3g} (> {tolerance})")
        return f"{rows} rows, max |diff| {diff:.2g}"

    def device_used(self) -> str:
        """Every training run's plan was made for the expected device (cuda / cpu)."""
        want = self.device
        found = {}
        for variant in ("straight", "resumed"):
            for stage in ("mem", "tem"):
                plan = os.path.join(self.run_dir(variant, stage), "plan.json")
                if os.path.isfile(plan):
                    found[f"{variant}/{stage}"] = _read_json(plan).get("compute_device")
        if not found:
            raise StepFailed("no training run got as far as its plan")
        wrong = {k: v for k, v in found.items() if v != want}
        if wrong:
            raise StepFailed(f"plan.json compute_device {wrong}, expected {want!r}")
        how = "MKT_DEVICE=cuda" if want == "cuda" else (
            "MKT_EMULATE_ACCELERATOR=1" if self.emulate else "MKT_DEVICE=cpu")
        return f"{len(found)} runs planned for {want}, every job with {how}"


# ----------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------


def _tensor_keys(ckpt: str) -> List[str]:
    from mkt_torchrec.training import checkpoint

    md = checkpoint.SafeFileSystemReader(ckpt).read_metadata()
    return sorted(k for k, m in md.state_dict_metadata.items() if hasattr(m, "size"))


def read_tensors(ckpt: str) -> dict:
    """Every tensor of a DCP checkpoint, unsharded, read without a process group (as tests/training's ``_full``)."""
    import torch

    from mkt_torchrec.training import checkpoint

    md = checkpoint.SafeFileSystemReader(ckpt).read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
             if hasattr(m, "size")}
    checkpoint.load(ckpt, state, no_dist=True)
    return state


def _bits(t):
    """The tensor's bytes, so that equality is bit equality (NaN payloads, -0.0 vs 0.0 included)."""
    import torch

    return t.reshape(-1).contiguous().view(torch.uint8)


def compare_checkpoints(a: Optional[str], b: Optional[str]) -> Optional[str]:
    """None when checkpoints ``a`` and ``b`` are at the same step and hold the same tensors bit for bit (same keys,
    dtypes, shapes, bytes); else a one-line reason naming the first difference."""
    from mkt_torchrec.training import checkpoint

    if a is None or b is None:
        return f"no complete checkpoint in {'the first' if a is None else 'the second'} run"
    steps = [checkpoint.read_extra(c)["step"] for c in (a, b)]
    if steps[0] != steps[1]:
        return f"checkpoints at different steps: {steps[0]} vs {steps[1]}"
    ta, tb = read_tensors(a), read_tensors(b)
    if ta.keys() != tb.keys():
        only = sorted(ta.keys() ^ tb.keys())
        return f"{len(only)} tensor(s) in one checkpoint only, e.g. {only[0]}"
    differ = []
    for k in sorted(ta):
        x, y = ta[k], tb[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}"
        if not (_bits(x) == _bits(y)).all():
            differ.append(k)
    if not differ:
        return None
    k = differ[0]
    x, y = ta[k], tb[k]
    gap = f", max |diff| {float((x.double() - y.double()).abs().max()):.3g}" if x.is_floating_point() else ""
    return f"{len(differ)} of {len(ta)} tensors differ, first {k} ({int((x != y).sum())} of {x.numel()} values{gap})"


def _final_step(run: str) -> Optional[int]:
    from mkt_torchrec.training import checkpoint

    ckpt = checkpoint.latest_checkpoint(run) if os.path.isdir(run) else None
    return None if ckpt is None else int(checkpoint.read_extra(ckpt)["step"])


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------


def _sets(overrides: List[str]) -> List[str]:
    return [word for s in overrides for word in ("--set", s)]


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _remove(work: str, created: bool) -> None:
    """Remove the work directory (only its contents when it existed, empty, before the run)."""
    if created:
        shutil.rmtree(work)
    else:
        for name in os.listdir(work):
            shutil.rmtree(os.path.join(work, name))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:400]


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else "no message"


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_smoke.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__)
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks of every job (default: the visible GPUs with --device cuda, else 2)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda: every job runs with MKT_DEVICE=cuda (no GPU is a FAIL); cpu: on the CPU (gloo); "
                             "auto (default): cuda when torch sees a GPU, else cpu")
    parser.add_argument("--emulate-accelerator", action="store_true",
                        help="with --device cpu: MKT_EMULATE_ACCELERATOR=1, the CPU test mode that fails a "
                             "collective on a tensor a GPU job would hold on the host and places sharded state at "
                             "cuda devices (GPUs, if any, are hidden from the jobs)")
    parser.add_argument("--workdir", default=None,
                        help="new or empty directory for the dataset, runs and logs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory when every step passed")
    parser.add_argument("--step-timeout", type=int, default=600, help="seconds one job may take (default 600)")
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "auto":
        args.device = "cuda" if gpus else "cpu"
    if args.emulate_accelerator and args.device != "cpu":
        parser.error("--emulate-accelerator is a CPU mode: add --device cpu")
    if args.nproc is None:
        args.nproc = gpus if args.device == "cuda" and gpus else 2
    if args.nproc < 1 or args.nproc > GLOBAL_BATCH:
        parser.error(f"--nproc must be 1..{GLOBAL_BATCH}")
    if args.workdir and os.path.exists(args.workdir) and (not os.path.isdir(args.workdir) or os.listdir(args.workdir)):
        parser.error(f"--workdir {args.workdir}: exists and is not an empty directory (the tool reads only what it "
                     "writes)")
    return args


def run_steps(smoke: Smoke) -> None:
    """The smoke test's steps in order (each line printed as it ends)."""
    s = smoke.step
    s("synth tiny dataset", smoke.synth)
    for stage in ("mem", "tem"):
        straight_mem = ("train stage mem uninterrupted",) if stage == "tem" else ()  # stage 2 loads that MEM
        resumed_mem = ("resume stage mem",) if stage == "tem" else ()
        killed = f"kill stage {stage} after step {FAIL_AFTER}"
        s(f"train stage {stage} uninterrupted", partial(smoke.train, stage, "straight", "straight"),
          needs=("synth tiny dataset", *straight_mem))
        s(killed, partial(smoke.kill, stage), needs=("synth tiny dataset", *resumed_mem))
        s(f"resume stage {stage}", partial(smoke.resume, stage), needs=(killed,))
        s(f"resume stage {stage} bit-equal", partial(smoke.bit_equal, stage),
          needs=(f"train stage {stage} uninterrupted", f"resume stage {stage}"))
    s("evaluate uninterrupted stage tem", partial(smoke.evaluate, "straight"), needs=("train stage tem uninterrupted",))
    s("evaluate resumed stage tem", partial(smoke.evaluate, "resumed"), needs=("resume stage tem",))
    s("evaluate metrics equal", smoke.metrics_equal,
      needs=("evaluate uninterrupted stage tem", "evaluate resumed stage tem"))
    s("export serving model loads", smoke.export, needs=("resume stage tem",))
    s("served scores match evaluation", smoke.served_scores,
      needs=("export serving model loads", "evaluate resumed stage tem"))
    s(f"device {smoke.device}", smoke.device_used, needs=("synth tiny dataset",))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    created = args.workdir is None or not os.path.exists(args.workdir)
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="mkt-gpu-smoke-"))
    os.makedirs(work, exist_ok=True)
    device = args.device + (" (emulated accelerator)" if args.emulate_accelerator else "")
    print(f"gpu_smoke: device {device}, nproc {args.nproc}, workdir {work}", flush=True)
    start = time.monotonic()
    smoke = Smoke(work, args.nproc, args.device, args.emulate_accelerator, args.step_timeout)
    run_steps(smoke)
    seconds = round(time.monotonic() - start, 1)
    passed = all(r.status == "pass" for r in smoke.results)
    counts = {k: sum(r.status == k for r in smoke.results) for k in ("pass", "fail", "skip")}
    kept = not passed or args.keep
    if not kept:
        _remove(work, created)
    tally = f"{counts['pass']} of {len(smoke.results)} steps passed"
    if not passed:
        tally += f", {counts['fail']} failed, {counts['skip']} skipped"
    where = f"logs and runs kept in {work}" if kept else "work directory removed"
    print(f"gpu_smoke: {'PASS' if passed else 'FAIL'}: {tally} in {seconds:.1f} s (device {device}, nproc "
          f"{args.nproc}); {where}", flush=True)
    print(json.dumps({"passed": passed, "seconds": seconds, "device": args.device,
                      "emulate_accelerator": args.emulate_accelerator, "nproc": args.nproc,
                      "workdir": work if kept else None, "steps": [asdict(r) for r in smoke.results]}), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
