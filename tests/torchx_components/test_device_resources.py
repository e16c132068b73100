"""The device a component asks for: the resources each replica requests and the ``MKT_DEVICE`` its workers get
(issue 21: a GPU job must not train on CPU without a word)."""

from __future__ import annotations

import copy
import os

import pytest
from torchx import specs
from torchx.runner import get_runner
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component

from tests.conftest import REPO
from mkt_torchrec import components as mkt

COMPONENT_FILE = os.path.join(REPO, "mkt_torchrec", "components.py")
COMPONENTS = ("pretrain", "finetune", "evaluate")
REQUIRED = {
    "pretrain": {"config": "c.yaml", "data": "d", "run_dir": "runs/mem"},
    "finetune": {"config": "c.yaml", "mem_run": "runs/mem", "data": "d", "run_dir": "runs/tem"},
    "evaluate": {"config": "c.yaml", "run_dir": "runs/tem", "data": "d"},
}
GIB = 1024


def build(component: str, **kwargs) -> specs.AppDef:
    return getattr(mkt, component)(**{**REQUIRED[component], **kwargs})


@pytest.mark.parametrize("component", COMPONENTS)
@pytest.mark.parametrize("device, nproc, expected", [
    # cpu: 4 CPUs and 12 GiB per worker; cuda: 1 GPU, 8 CPUs and 32 GiB per worker; plus 8 GiB per node
    ("cpu", 2, specs.Resource(cpu=8, gpu=0, memMB=2 * 12 * GIB + 8 * GIB)),
    ("cpu", 8, specs.Resource(cpu=32, gpu=0, memMB=8 * 12 * GIB + 8 * GIB)),
    ("cuda", 1, specs.Resource(cpu=8, gpu=1, memMB=32 * GIB + 8 * GIB)),
    ("cuda", 8, specs.Resource(cpu=64, gpu=8, memMB=8 * 32 * GIB + 8 * GIB)),
])
def test_each_replica_requests_resources_for_its_device_and_workers_get_mkt_device(component, device, nproc,
                                                                                    expected):
    (role,) = build(component, device=device, nnodes=2, nproc_per_node=nproc).roles

    assert role.num_replicas == 2
    assert role.resource == expected  # per replica (node)
    assert role.env["MKT_DEVICE"] == device


@pytest.mark.parametrize("component", COMPONENTS)
def test_cpu_and_memory_given_explicitly_win_and_a_named_resource_takes_precedence(component):
    role = build(component, device="cuda", nproc_per_node=8, cpu=96, memMB=480_000).roles[0]
    assert role.resource == specs.Resource(cpu=96, gpu=8, memMB=480_000)

    role = build(component, device="cuda", nproc_per_node=8, h="gpu.xlarge", cpu=1, gpu=1, memMB=1).roles[0]
    assert role.resource == specs.resource(h="gpu.xlarge")
    assert role.env["MKT_DEVICE"] == "cuda"


@pytest.mark.parametrize("component", COMPONENTS)
def test_torchx_command_line_device_cuda(component):
    fn = get_component(f"{COMPONENT_FILE}:{component}").fn
    args = [word for key, value in REQUIRED[component].items() for word in (f"--{key}", value)]
    app = materialize_appdef(fn, [*args, "--device", "cuda", "--nproc_per_node", "4", "--nnodes", "2"])

    role = app.roles[0]
    assert role.resource == specs.Resource(cpu=32, gpu=4, memMB=4 * 32 * GIB + 8 * GIB)
    assert role.env["MKT_DEVICE"] == "cuda"


@pytest.mark.parametrize("scheduler, wanted", [
    ("slurm", ("--gpus-per-task=4", "MKT_DEVICE=cuda")),
    ("kubernetes", ("nvidia.com/gpu: '4'", "name: MKT_DEVICE", "value: cuda")),
])
def test_schedulers_receive_the_gpu_request_and_mkt_device(scheduler, wanted):
    app = build("pretrain", device="cuda", nnodes=2, nproc_per_node=4, image="registry.example.com/mkt:1")
    with get_runner() as runner:
        request = runner.dryrun(app, scheduler, cfg={"queue": "default"} if scheduler == "kubernetes" else {})

    text = str(request)
    for fragment in wanted:
        assert fragment in text, fragment


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "device must be one of ['cpu', 'cuda'], got 'gpu'"),
    ({"device": "cuda", "nproc_per_node": 8, "gpu": 4}, "nproc_per_node=8 exceeds gpu=4"),
    ({"device": "cuda", "nproc_per_node": 2, "h": "gpu.small"}, "nproc_per_node=2 exceeds h='gpu.small' (1 GPU)"),
    ({"gpu": 8}, "gpu=8 with device='cpu'"),  # GPUs asked for, CPU training: the silent case, refused
    ({"h": "gpu.xlarge"}, "h='gpu.xlarge' (8 GPUs) with device='cpu'"),
    ({"h": "no.such.resource"}, "h='no.such.resource' is not a registered named resource"),
    ({"device": "cuda", "env": {"MKT_DEVICE": "cpu"}}, "env MKT_DEVICE='cpu' contradicts device='cuda'"),
    ({"cpu": -1}, "cpu must be >= 0"),
    ({"memMB": -1}, "memMB must be >= 0"),
    ({"gpu": -2}, "gpu must be >= -1"),
])
@pytest.mark.parametrize("component", COMPONENTS)
def test_device_requests_that_cannot_be_served_raise_one_line_value_errors(component, kwargs, message):
    with pytest.raises(ValueError) as info:
        build(component, **kwargs)

    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("component", COMPONENTS)
def test_device_cuda_mutates_no_argument(component):
    env = {"NCCL_DEBUG": "INFO"}
    before = copy.deepcopy(env)

    role = build(component, device="cuda", nproc_per_node=8, env=env).roles[0]

    assert env == before  # MKT_DEVICE goes to the AppDef's own dict
    assert role.env["MKT_DEVICE"] == "cuda" and role.env["NCCL_DEBUG"] == "INFO"
