"""tools/gpu_smoke.py: the whole GPU path's smoke test, run here on CPU, and its failures reported honestly."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tests.conftest import REPO

SCRIPT = os.path.join(REPO, "tools", "gpu_smoke.py")
STEPS = ["synth tiny dataset",
         "train stage mem uninterrupted", "kill stage mem after step 1", "resume stage mem",
         "resume stage mem bit-equal",
         "train stage tem uninterrupted", "kill stage tem after step 1", "resume stage tem",
         "resume stage tem bit-equal",
         "evaluate uninterrupted stage tem", "evaluate resumed stage tem", "evaluate metrics equal",
         "export serving model loads", "served scores match evaluation", "device cpu"]


def _smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_smoke", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=900):
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if not k.startswith("MKT_")})
    lines = proc.stdout.strip().splitlines()
    return proc, lines, json.loads(lines[-1])


def test_every_step_passes_on_cpu_under_the_accelerator_emulation(tmp_path):
    work = tmp_path / "work"
    proc, lines, result = _run("--device", "cpu", "--nproc", "2", "--emulate-accelerator", "--workdir", str(work))
    report = proc.stdout + proc.stderr[-2000:]
    assert [s["name"] for s in result["steps"]] == STEPS, report
    assert [s["name"] for s in result["steps"] if s["status"] != "pass"] == [], report
    for step in result["steps"]:  # one printed line per step, as the JSON says
        assert any(line.startswith(f"PASS  {step['name']} (") for line in lines), report
    assert (result["device"], result["nproc"], result["emulate_accelerator"]) == ("cpu", 2, True)
    assert result["passed"] is True and proc.returncode == 0 and lines[-2].startswith("gpu_smoke: PASS: 15 of 15")
    assert not work.exists()  # removed after a pass (kept when a step fails)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_device_cuda_without_a_gpu_fails_instead_of_training_on_cpu(tmp_path):
    work = tmp_path / "work"
    proc, lines, result = _run("--device", "cuda", "--nproc", "1", "--workdir", str(work))  # one rank says it
    status = {s["name"]: s for s in result["steps"]}
    assert proc.returncode == 1 and result["passed"] is False
    train = status["train stage mem uninterrupted"]
    assert train["status"] == "fail" and "MKT_DEVICE=cuda" in train["detail"], proc.stdout
    assert status["resume stage mem bit-equal"]["status"] == "skip"
    assert status["device cuda"]["status"] == "fail"
    assert any(line.startswith("FAIL  train stage mem uninterrupted (") for line in lines)
    assert lines[-2].startswith("gpu_smoke: FAIL:") and os.listdir(work / "logs")  # logs kept


def _checkpoint(path, tensors, step=3):
    dcp.save(tensors, checkpoint_id=str(path), no_dist=True)
    with open(path / "extra.json", "w") as f:
        json.dump({"step": step, "epoch": 0, "readers": []}, f)
    return str(path)


def test_checkpoint_comparison_reports_any_bit_that_differs(tmp_path):
    compare = _smoke_module().compare_checkpoints
    weight, state = torch.randn(6, 4), torch.tensor([0.0, 1.0, 2.0])
    base = _checkpoint(tmp_path / "base", {"w": weight, "s": state})
    assert compare(base, _checkpoint(tmp_path / "same", {"w": weight.clone(), "s": state.clone()})) is None

    nudged = weight.clone()
    nudged[2, 1] = torch.nextafter(nudged[2, 1], torch.tensor(float("inf")))  # one ulp
    reason = compare(base, _checkpoint(tmp_path / "ulp", {"w": nudged, "s": state}))
    assert reason.startswith("1 of 2 tensors differ, first w (1 of 24 values")

    signed = state.clone()
    signed[0] = -0.0  # equal as numbers, not bit for bit
    assert "first s (" in compare(base, _checkpoint(tmp_path / "signed", {"w": weight, "s": signed}))
    assert "different steps: 3 vs 4" in compare(base, _checkpoint(tmp_path / "later", {"w": weight, "s": state}, 4))
    assert "in one checkpoint only, e.g. s" in compare(base, _checkpoint(tmp_path / "fewer", {"w": weight}))
    assert "float64" in compare(base, _checkpoint(tmp_path / "dtype", {"w": weight.double(), "s": state}))
    assert compare(None, base) == "no complete checkpoint in the first run"
