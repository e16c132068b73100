"""``MKT_DEVICE``: a job that expects CUDA and finds none stops at start with one line saying why; ``cpu`` forces
CPU; anything else is an error (issue 21: a GPU job must not train on CPU without a word)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from mkt_torchrec.training.distributed import init_distributed
from tests.conftest import QUICKSTART, REPO, SMALL, set_flags

NO_CUDA_BUILD = "this torch build has no CUDA"


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher or device variables from the calling shell."""
    for name in ("MKT_DEVICE", "MKT_EMULATE_ACCELERATOR", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
                 "SLURM_GPUS_ON_NODE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    yield monkeypatch
    if dist.is_initialized():
        dist.destroy_process_group()


def start_error() -> str:
    with pytest.raises(ValueError) as info:
        init_distributed()
    assert not dist.is_initialized()  # stopped before joining any world
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_mkt_device_cuda_without_cuda_fails_at_start_saying_why(clean_env):
    clean_env.setenv("MKT_DEVICE", "cuda")

    message = start_error()

    assert message.startswith("MKT_DEVICE=cuda but torch.cuda.is_available() is False: ")
    if torch.version.cuda is None:  # this machine: a CPU build of torch
        assert f"{NO_CUDA_BUILD} (torch {torch.__version__}, torch.version.cuda is None)" in message


@pytest.mark.parametrize("visible, reason", [
    (None, "no GPU visible (CUDA_VISIBLE_DEVICES unset; torch "),
    ("", "no GPU visible (CUDA_VISIBLE_DEVICES='' hides every GPU)"),
    ("-1", "no GPU visible (CUDA_VISIBLE_DEVICES='-1' hides every GPU)"),
    ("0,1", "no GPU visible (CUDA_VISIBLE_DEVICES='0,1'; torch "),
])
def test_a_cuda_build_that_sees_no_gpu_says_what_it_was_shown(clean_env, visible, reason):
    clean_env.setenv("MKT_DEVICE", "cuda")
    clean_env.setattr(torch.version, "cuda", "12.8")  # a CUDA build of torch ...
    clean_env.setattr(torch.cuda, "is_available", lambda: False)  # ... on a machine without a usable GPU
    if visible is not None:
        clean_env.setenv("CUDA_VISIBLE_DEVICES", visible)

    message = start_error()

    assert message.startswith("MKT_DEVICE=cuda but torch.cuda.is_available() is False: " + reason)
    assert NO_CUDA_BUILD not in message


def test_the_emulated_accelerator_does_not_satisfy_mkt_device_cuda(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    clean_env.setenv("MKT_DEVICE", "cuda")
    clean_env.setenv("MKT_EMULATE_ACCELERATOR", "1")

    assert start_error().startswith("MKT_DEVICE=cuda but torch.cuda.is_available() is False")


@pytest.mark.parametrize("value", ["gpu", "CUDA", "cuda:0", "nccl"])
def test_an_unknown_mkt_device_is_an_error(clean_env, value):
    clean_env.setenv("MKT_DEVICE", value)

    assert start_error() == f"MKT_DEVICE={value!r} is not one of auto, cpu, cuda (unset means auto)"


def test_mkt_device_cpu_forces_cpu_where_a_gpu_is_visible(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 8)
    clean_env.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) under MKT_DEVICE=cpu"))
    clean_env.setenv("MKT_DEVICE", "cpu")

    info = init_distributed()

    assert (info.device, info.backend) == (torch.device("cpu"), "gloo")


def test_a_local_rank_without_a_gpu_of_its_own_fails_at_start(clean_env):
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setattr(torch.cuda, "device_count", lambda: 2)
    clean_env.setenv("LOCAL_RANK", "3")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "4,5")

    assert start_error() == ("local rank 3 needs GPU 3 but only 2 are visible "
                                      "(CUDA_VISIBLE_DEVICES='4,5'): start at most 2 processes per node")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_auto_on_cpu_says_so_when_the_environment_names_gpus(clean_env):
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    records = Records()
    logger = logging.getLogger("mkt.distributed")  # the ``mkt`` logger does not propagate: listen here
    logger.addHandler(records)
    try:
        info = init_distributed()
    finally:
        logger.removeHandler(records)

    assert info.device == torch.device("cpu")
    assert len(records.messages) == 1
    assert records.messages[0].startswith("training on CPU: CUDA_VISIBLE_DEVICES=0,1 but torch.cuda.is_available() "
                                          "is False: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_mkt_train_nproc_2_with_mkt_device_cuda_stops_at_start_in_one_line(tmp_path):
    """Through the command line and ``launch``: every rank fails the same way; the user reads it once."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "MKT_DEVICE": "cuda", "MKT_PROGRESS": "0"}
    env.pop("MKT_EMULATE_ACCELERATOR", None)
    cmd = [sys.executable, "-m", "mkt_torchrec.cli", "train", "--config", QUICKSTART, *set_flags(*SMALL),
           "--stage", "mem", "--nproc", "2", "--data", str(tmp_path / "no-data-needed"), "--run-dir", str(run_dir)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    assert proc.returncode == 1, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "MKT_DEVICE" in line]
    assert len(said) == 1, proc.stderr[-3000:]
    assert said[0].startswith("mkt train: error: rank ")
    assert "MKT_DEVICE=cuda but torch.cuda.is_available() is False: " in said[0]
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists()  # stopped before the data was opened or the run directory made


def test_a_cuda_plan_or_compute_device_on_a_cpu_job_says_why_there_is_no_gpu(tmp_path):
    """A job given a plan file made for cuda (or ``train.planner.compute_device=cuda``) that runs on the CPU used to
    fail with "plan file ... is for compute device 'cuda', but this job runs on 'cpu'", not saying why."""
    import json as _json

    from mkt_torchrec.training.distributed import DistInfo
    from mkt_torchrec.training.assembly import _compute_device
    from tests.conftest import small_config

    info = DistInfo(0, 1, 0, 1, torch.device("cpu"), "gloo")
    plan = tmp_path / "plan.json"
    plan.write_text(_json.dumps({"compute_device": "cuda", "world_size": 1}))
    with pytest.raises(ValueError, match=r"plan file .*plan\.json is for cuda, but this job runs on cpu: this torch "
                                         r"build has no CUDA"):
        _compute_device(small_config(), info, str(plan))
    with pytest.raises(ValueError, match=r"train.planner.compute_device=cuda, but this job runs on cpu: .*no CUDA"):
        _compute_device(small_config("train.planner.compute_device=cuda"), info)
    assert _compute_device(small_config(), info) == "cpu"
