"""The README's cluster commands, as written, are accepted by ``torchx run --dryrun`` (kubernetes and slurm).

The commands are read from README.md between the ``readme-cluster-commands`` marker comments, so the test checks
what the README says. Only the executable is made local: ``torchx`` becomes this venv's ``torchx``, and
``--dryrun`` is added after ``run``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO

BEGIN, END = "<!-- readme-cluster-commands:begin", "<!-- readme-cluster-commands:end -->"
TORCHX = os.path.join(os.path.dirname(sys.executable), "torchx")


def readme_cluster_commands() -> list[list[str]]:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, "README.md lost its cluster-command markers"
    block = text[text.index(BEGIN):text.index(END)]
    lines = [line for line in block.splitlines() if not line.startswith(("<!--", "```", "#"))]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))  # shell line continuations
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


COMMANDS = readme_cluster_commands()


def scheduler(argv: list[str]) -> str:
    return argv[argv.index("-s") + 1]


def test_readme_has_one_cuda_command_for_each_cluster_scheduler():
    assert sorted(scheduler(argv) for argv in COMMANDS) == ["kubernetes", "slurm"]
    for argv in COMMANDS:
        assert argv[:2] == ["torchx", "run"], argv
        assert argv[argv.index("--device") + 1] == "cuda", argv


@pytest.mark.parametrize("argv", COMMANDS, ids=scheduler)
def test_readme_cluster_command_is_accepted_by_torchx_dryrun(argv):
    cmd = [TORCHX, "run", "--dryrun", *argv[2:]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)

    assert proc.returncode == 0, f"{shlex.join(cmd)}\n--- stderr ---\n{proc.stderr[-4000:]}"
    out = proc.stdout
    nnodes = int(argv[argv.index("--nnodes") + 1])
    if scheduler(argv) == "kubernetes":
        assert "kind: Job" in out and "schedulerName: volcano" in out
        assert out.count("nvidia.com/gpu: '8'") == 2 * nnodes  # limits and requests of every replica
        assert "name: MKT_DEVICE" in out and "value: cuda" in out
    else:
        assert out.count("--gpus-per-task=8") == nnodes
        assert out.count("MKT_DEVICE=cuda") == nnodes
