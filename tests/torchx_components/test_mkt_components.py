"""The TorchX components: the AppDef each one builds, how torchx validates and parses them, and a real
2-process job through the ``local_cwd`` scheduler (pretrain -> finetune -> evaluate)."""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys

import pytest
from torchx import specs
from torchx.runner import get_runner
from torchx.specs import file_linter
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component

from tests.conftest import QUICKSTART, REPO, SMALL
from mkt_torchrec import components as mkt

COMPONENT_FILE = os.path.join(REPO, "mkt_torchrec", "components.py")
COMPONENTS = ("pretrain", "finetune", "evaluate")

# The required arguments of each component; all paths relative so nothing gets resolved against a cwd.
REQUIRED = {
    "pretrain": {"config": "configs/c.yaml", "data": "data/d", "run_dir": "runs/mem"},
    "finetune": {"config": "configs/c.yaml", "mem_run": "runs/mem", "data": "data/d", "run_dir": "runs/tem"},
    "evaluate": {"config": "configs/c.yaml", "run_dir": "runs/tem", "data": "data/d"},
}
# The ``mkt`` command line each component should run with REQUIRED.
EXPECTED_CLI = {
    "pretrain": ["train", "--config", "configs/c.yaml", "--stage", "mem", "--data", "data/d", "--run-dir", "runs/mem"],
    "finetune": ["train", "--config", "configs/c.yaml", "--stage", "tem", "--mem-run", "runs/mem",
                 "--data", "data/d", "--run-dir", "runs/tem"],
    "evaluate": ["evaluate", "--config", "configs/c.yaml", "--run-dir", "runs/tem", "--data", "data/d"],
}


def build(component: str, *overrides: str, **kwargs) -> specs.AppDef:
    return getattr(mkt, component)(*overrides, **{**REQUIRED[component], **kwargs})


def torchrun_argv(role: specs.Role) -> list[str]:
    """The torchrun command inside the role's ``bash -c '...'``."""
    assert role.entrypoint == "bash" and role.args[0] == "-c" and len(role.args) == 2, role.args
    argv = shlex.split(role.args[1])
    assert argv[0] == "torchrun", argv
    return argv


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def mkt_argv(role: specs.Role) -> list[str]:
    """What follows ``-m mkt_torchrec.cli``."""
    argv = torchrun_argv(role)
    i = argv.index("-m")
    assert argv[i + 1] == "mkt_torchrec.cli"
    return argv[i + 2:]


# --------------------------------------------------------------------------------------------------------
# The AppDef
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component, app_name, role_name", [
    ("pretrain", "mkt-pretrain", "trainer"), ("finetune", "mkt-finetune", "trainer"),
    ("evaluate", "mkt-evaluate", "evaluator"),
])
def test_default_app_is_one_node_of_two_workers_running_the_mkt_command(component, app_name, role_name):
    app = build(component)

    assert app.name == app_name
    (role,) = app.roles
    assert role.name == role_name
    assert role.num_replicas == 1 and role.min_replicas == 1
    argv = torchrun_argv(role)
    assert flag(argv, "--nnodes") == "1"
    assert flag(argv, "--nproc_per_node") == "2"
    assert flag(argv, "--rdzv_endpoint") == "localhost:0"  # single node: torchrun picks a free port
    assert mkt_argv(role) == EXPECTED_CLI[component]
    assert role.resource == specs.Resource(cpu=8, gpu=0, memMB=32768)
    assert role.max_retries == 0
    assert role.env["LOGLEVEL"] == "WARNING"
    assert role.mounts == []


@pytest.mark.parametrize("component", ["pretrain", "finetune"])
def test_resume_adds_the_flag_only_when_asked(component):
    assert "--resume" not in mkt_argv(build(component).roles[0])
    assert mkt_argv(build(component, resume=True).roles[0]) == EXPECTED_CLI[component] + ["--resume"]


@pytest.mark.parametrize("component", ("pretrain", "finetune"))
def test_plan_and_overrides_become_set_flags_in_order(component):
    role = build(component, "train.max_steps=10", "model.tower=[16, 1]", "data.batch_size=64",
                 plan="plans/16x8.json").roles[0]

    assert mkt_argv(role) == EXPECTED_CLI[component] + [
        "--set", "train.planner.plan_file=plans/16x8.json",  # first, so an explicit override wins
        "--set", "train.max_steps=10",
        "--set", "model.tower=[16, 1]",  # commas and spaces survive the bash -c quoting
        "--set", "data.batch_size=64",
    ]


@pytest.mark.parametrize("component", COMPONENTS)
def test_multi_node_job_rendezvous_on_rank0_host(component):
    role = build(component, nnodes=16, nproc_per_node=8, device="cuda", gpu=8, cpu=96, memMB=1_000_000,
                 rdzv_port=29501, rdzv_backend="c10d", max_retries=3).roles[0]

    assert role.num_replicas == 16 and role.min_replicas == 16
    # what a scheduler runs: it fills the macros in, naming the variable that holds rank 0's host
    scheduled = specs.macros.Values(img_root="", app_id="mkt-pretrain-x1", replica_id="3",
                                    rank0_env="RANK0_HOST").apply(role)
    argv = torchrun_argv(scheduled)
    assert flag(argv, "--nnodes") == "16"
    assert flag(argv, "--nproc_per_node") == "8"
    assert flag(argv, "--rdzv_backend") == "c10d"
    assert flag(argv, "--rdzv_id") == "mkt-pretrain-x1"
    assert flag(argv, "--rdzv_endpoint") == "${RANK0_HOST:=localhost}:29501"  # expanded by bash on each node
    assert role.port_map == {"c10d": 29501}
    assert role.resource == specs.Resource(cpu=96, gpu=8, memMB=1_000_000)
    assert role.max_retries == 3


def test_named_resource_takes_precedence_over_cpu_gpu_mem():
    role = build("pretrain", h="gpu.xlarge", device="cuda", nproc_per_node=8, cpu=1, memMB=1).roles[0]

    assert role.resource == specs.resource(h="gpu.xlarge")
    assert role.resource.gpu == 8


def test_env_is_passed_to_workers_and_debug_adds_torch_flags():
    role = build("finetune", env={"NCCL_DEBUG": "INFO", "LOGLEVEL": "INFO"}, debug=True).roles[0]

    assert role.env["NCCL_DEBUG"] == "INFO"
    assert role.env["LOGLEVEL"] == "INFO"  # the caller's choice beats the default
    assert role.env["TORCH_DISTRIBUTED_DEBUG"] == "DETAIL"
    assert role.env["TORCHX_TRACKING_EXPERIMENT_NAME"] == "mkt"


def test_mounts_are_parsed():
    role = build("pretrain", mounts=["type=bind", "src=/mnt/data", "dst=/data", "readonly"]).roles[0]

    assert role.mounts == [specs.BindMount(src_path="/mnt/data", dst_path="/data", read_only=True)]


@pytest.mark.parametrize("component", COMPONENTS)
def test_arguments_are_not_mutated(component):
    env = {"NCCL_DEBUG": "INFO"}
    overrides = ["train.max_steps=10", "data.batch_size=64"]
    mounts = ["type=bind", "src=/mnt/data", "dst=/data"]
    before = copy.deepcopy((env, overrides, mounts))

    app = build(component, *overrides, env=env, mounts=mounts, **({} if component == "evaluate" else {"plan": "p.json"}))

    assert (env, overrides, mounts) == before
    assert app.roles[0].env is not env
    app.roles[0].env["EXTRA"] = "1"  # and the AppDef shares nothing with the caller
    assert "EXTRA" not in env


def test_evaluate_takes_no_plan():
    with pytest.raises(TypeError):
        build("evaluate", plan="p.json")


@pytest.mark.parametrize("component", COMPONENTS)
def test_app_depends_on_arguments_only(component, monkeypatch):
    def no_cwd():
        raise AssertionError("a component must not read the current directory")

    with monkeypatch.context() as m:
        m.delenv("USER", raising=False)
        m.setenv("LOGLEVEL", "DEBUG")
        m.setattr(os, "getcwd", no_cwd)
        plan = {} if component == "evaluate" else {"plan": "p.json"}
        first = build(component, "a.b=1", **plan)
        second = build(component, "a.b=1", **plan)

    assert first == second
    assert first.roles[0].env["LOGLEVEL"] == "WARNING"
    assert "data/d" in mkt_argv(first.roles[0])  # relative paths are passed through, not resolved


@pytest.mark.parametrize("kwargs, overrides, message", [
    ({"nnodes": 0}, (), "nnodes"),
    ({"nproc_per_node": 0}, (), "nproc_per_node"),
    ({"device": "cuda", "gpu": 4, "nproc_per_node": 8}, (), "exceeds gpu=4"),
    ({"max_retries": -1}, (), "max_retries"),
    ({}, ("train.max_steps",), "not KEY=VALUE"),
    ({}, ("=10",), "not KEY=VALUE"),
])
@pytest.mark.parametrize("component", COMPONENTS)
def test_bad_arguments_raise_value_error(component, kwargs, overrides, message):
    with pytest.raises(ValueError, match=message):
        build(component, *overrides, **kwargs)


# --------------------------------------------------------------------------------------------------------
# What torchx makes of the file: linting, --help, command-line parsing, scheduler requests
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("component", COMPONENTS)
def test_torchx_accepts_the_component(component):
    assert file_linter.validate(COMPONENT_FILE, component) == []
    found = get_component(f"{COMPONENT_FILE}:{component}")  # what `torchx run FILE:FN` loads
    assert found.validation_errors == []


def test_the_installed_package_names_its_components_and_keeps_torchx_builtins():
    """pyproject.toml's ``[torchx.components]``: ``mkt.pretrain`` etc. resolve to this file's functions, and
    registering them did not hide torchx's own components (it does unless they are registered too)."""
    import torchx.specs.finder as finder

    finder._components = None  # torchx caches what it found
    for component in COMPONENTS:
        found = get_component(f"mkt.{component}")
        assert found.fn is getattr(mkt, component) and found.validation_errors == []
    assert get_component("dist.ddp").validation_errors == [] and get_component("utils.echo")


@pytest.mark.parametrize("component", COMPONENTS)
def test_help_documents_every_argument(component):
    fn = getattr(mkt, component)
    description, args = file_linter.get_fn_docstring(fn)

    assert "mkt " in description
    undocumented = [name for name, text in args.items() if not text.strip()]
    assert undocumented == []


def test_torchx_command_line_is_parsed_into_the_app():
    fn = get_component(f"{COMPONENT_FILE}:finetune").fn
    app = materialize_appdef(fn, [
        "--config", "c.yaml", "--mem_run", "runs/mem", "--data", "d", "--run_dir", "runs/tem",
        "--resume", "True", "--plan", "p.json", "--nnodes", "2", "--nproc_per_node", "4",
        "--env", "NCCL_DEBUG=INFO,FOO=bar", "--max_retries", "2",
        "train.max_steps=10", "model.tower=[16,1]",
    ])

    role = app.roles[0]
    argv = torchrun_argv(role)
    assert (flag(argv, "--nnodes"), flag(argv, "--nproc_per_node")) == ("2", "4")
    assert mkt_argv(role) == [
        "train", "--config", "c.yaml", "--stage", "tem", "--mem-run", "runs/mem", "--data", "d",
        "--run-dir", "runs/tem", "--resume", "--set", "train.planner.plan_file=p.json",
        "--set", "train.max_steps=10", "--set", "model.tower=[16,1]",  # not split at the comma
    ]
    assert role.env["NCCL_DEBUG"] == "INFO" and role.env["FOO"] == "bar"
    assert role.max_retries == 2


def test_torchx_command_line_without_overrides():
    fn = get_component(f"{COMPONENT_FILE}:evaluate").fn
    app = materialize_appdef(fn, ["--config", "c.yaml", "--run_dir", "r", "--data", "d"])

    assert mkt_argv(app.roles[0]) == ["evaluate", "--config", "c.yaml", "--run-dir", "r", "--data", "d"]


def test_same_app_dry_runs_on_local_cwd_and_slurm():
    app = build("pretrain", "train.max_steps=10", nnodes=2, nproc_per_node=8, device="cuda", gpu=8)
    with get_runner() as runner:
        local = runner.dryrun(app, "local_cwd", cfg={})
        slurm = runner.dryrun(app, "slurm", cfg={})

    replicas = local.request.role_params["trainer"]
    assert len(replicas) == 2 and all("-m mkt_torchrec.cli train" in r.args[-1] for r in replicas)
    script = slurm.request.materialize()
    assert script.count("-m mkt_torchrec.cli train --config configs/c.yaml --stage mem") == 2  # one per node
    assert "--gpus-per-task=8" in script


# --------------------------------------------------------------------------------------------------------
# End to end: real 2-process jobs through `torchx run -s local_cwd`
# --------------------------------------------------------------------------------------------------------

E2E_OVERRIDES = [*SMALL, "train.max_steps=4", "train.log_every=1"]


def torchx_run(component: str, log_dir: str, *args: str) -> None:
    """``torchx run -s local_cwd mkt.COMPONENT ARGS`` (the installed package's components), from the repository
    root."""
    env = dict(os.environ)
    # the job's `bash -c "torchrun ..."` must find this interpreter's torchrun
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "torchx.cli.main", "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}",
           f"mkt.{component}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (
        f"{shlex.join(cmd)} exited with {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )


def assert_trained(run_dir: str) -> None:
    latest = os.path.join(run_dir, "checkpoints", "latest")
    assert os.path.exists(latest), os.listdir(run_dir)
    with open(latest, encoding="utf-8") as f:
        assert os.path.isdir(os.path.join(run_dir, "checkpoints", f.read().strip()))
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert records, "metrics.jsonl is empty"
    with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
        assert json.load(f)["world_size"] == 2  # one node x two workers joined one world


@pytest.fixture(scope="module")
def e2e_runs(small_dataset, tmp_path_factory) -> dict[str, str]:
    """Pretrain, then fine-tune on the pretrained MEM, each a 1x2 job under local_cwd."""
    root = tmp_path_factory.mktemp("torchx_e2e")
    logs, mem_run, tem_run = str(root / "torchx_logs"), str(root / "mem"), str(root / "tem")
    common = ["--config", QUICKSTART, "--data", small_dataset, "--nnodes", "1", "--nproc_per_node", "2"]
    torchx_run("pretrain", logs, *common, "--run_dir", mem_run, *E2E_OVERRIDES)
    torchx_run("finetune", logs, *common, "--run_dir", tem_run, "--mem_run", mem_run, *E2E_OVERRIDES)
    return {"logs": logs, "data": small_dataset, "mem": mem_run, "tem": tem_run}


def test_pretrain_job_through_local_cwd_writes_checkpoint_and_metrics(e2e_runs):
    assert_trained(e2e_runs["mem"])


def test_finetune_job_through_local_cwd_writes_checkpoint_and_metrics(e2e_runs):
    assert_trained(e2e_runs["tem"])


def test_evaluate_job_through_local_cwd_writes_metrics(e2e_runs):
    torchx_run("evaluate", e2e_runs["logs"], "--config", QUICKSTART, "--data", e2e_runs["data"],
               "--run_dir", e2e_runs["tem"], "--nproc_per_node", "2", "data.batch_size=128")

    with open(os.path.join(e2e_runs["tem"], "metrics.json"), encoding="utf-8") as f:
        assert json.load(f), "metrics.json is empty"
