"""TorchX components for the MKT workflows: ``pretrain``, ``finetune`` and ``evaluate``.

Each component returns a one-role :py:class:`torchx.specs.AppDef` built by
:py:func:`torchx.components.dist.ddp`: ``nnodes`` replicas, each running
``torchrun --nproc_per_node N -m mkt_torchrec.cli <command> ...``. The ``mkt`` commands join the
torchrun world themselves (gloo on CPU, nccl on CUDA), so nothing here depends on the scheduler.

The package registers them with torchx (``[torchx.components]`` in pyproject.toml) as ``mkt.pretrain``,
``mkt.finetune`` and ``mkt.evaluate``; ``torchx run mkt_torchrec/components.py:pretrain`` names the file instead.
Positional arguments after the named ones are config overrides, passed on as ``--set KEY=VALUE``::

    torchx run -s local_cwd mkt.pretrain \\
        --config configs/quickstart.yaml --data out/data --run_dir out/runs/mem \\
        train.max_steps=100 data.batch_size=256

The device is explicit: ``--device cpu`` (the default: gloo, no GPU requested) or ``--device cuda`` (nccl, one
GPU per worker process: ``gpu = nproc_per_node``). Every worker gets ``MKT_DEVICE=DEVICE``, and a ``cuda`` worker
that finds no usable GPU (a CPU build of torch in the image, no GPU given to the container) stops at start with one
line saying why instead of training on CPU. Unless ``--cpu`` / ``--memMB`` are given, a node requests, per worker:

* ``cuda``: 8 CPUs and 32 GiB of host memory, the per-GPU ratio of torchx's own ``gpu.small`` .. ``gpu.xlarge``
  named resources, which common 8-GPU nodes exceed (96+ vCPUs, 680+ GB). A GPU worker's host memory holds the
  trainer (torch, the CUDA context, fbgemm), its ``data.num_workers`` loader processes (2 in ``tenrec.yaml``, 4 in
  ``industrial.yaml``; each imports torch), pinned batches, and its checkpoint shards while DCP saves them;
* ``cpu``: 4 CPUs (``train.threads`` intra-op threads and ``data.num_workers`` loaders beside the trainer) and
  12 GiB. A quickstart-sized rank peaks at about 0.6 GB RSS, but on CPU the embedding shards and their optimizer
  state live in host memory too: raise ``--memMB`` for large tables;

plus 8 GiB per node for torchrun's agent and the page cache of the data files. So ``--nproc_per_node 8 --device
cuda`` requests 64 CPUs, 8 GPUs and 270336 MB; the default (2 cpu workers) requests 8 CPUs and 32768 MB (which
``local_cwd`` ignores). ``-h NAMED_RESOURCE`` takes precedence over all three; it must have one GPU per worker for
``cuda`` and none for ``cpu``.

Paths are passed through unchanged: relative ones resolve in the job's working directory (the current
directory for ``local_cwd``, the image's ``WORKDIR`` in a container). Boolean flags take a value on
the torchx command line: ``--resume True``.

Note: ``torchx run path/to/components.py:fn`` executes this file inside a torchx module, so it imports only
absolute names and keeps its helpers behind a ``_mkt`` prefix.
"""

import dataclasses
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components import dist

_MKT_CLI_MODULE = "mkt_torchrec.cli"
_MKT_PLAN_KEY = "train.planner.plan_file"
_MKT_DEVICE_ENV = "MKT_DEVICE"  # read by mkt_torchrec.training.distributed.init_distributed in every worker
# What one worker process needs, (cpus, memory MB), and what a node needs besides its workers (MB). Why these
# figures: see the module docstring.
_MKT_PER_WORKER = {"cpu": (4, 12288), "cuda": (8, 32768)}
_MKT_NODE_HEADROOM_MB = 8192


def pretrain(
    *overrides: str,
    config: str,
    data: str,
    run_dir: str,
    resume: bool = False,
    plan: Optional[str] = None,
    image: str = ".",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    device: str = "cpu",
    cpu: int = 0,
    gpu: int = -1,
    memMB: int = 0,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    Stage 1 of MKT: pretrain the multi-entity model (MEM) on source and target entity data
    (runs ``mkt train --stage mem`` on nnodes x nproc_per_node workers).

    Args:
        overrides: config overrides as KEY=VALUE (e.g. train.max_steps=100), each passed as ``--set KEY=VALUE``
        config: YAML config file (e.g. configs/quickstart.yaml), as seen by the job
        data: dataset directory written by ``mkt synth`` or ``mkt tenrec``
        run_dir: run directory for checkpoints, metrics.jsonl and logs (shared by all nodes)
        resume: continue from the latest checkpoint in run_dir (``--resume True``)
        plan: sharding plan file written by ``mkt plan`` (sets train.planner.plan_file)
        image: image holding the installed package: a container image for kubernetes/docker,
            a directory for the ``local`` scheduler; ignored by ``local_cwd`` (which uses the current directory)
        nnodes: number of nodes (scheduler replicas)
        nproc_per_node: worker processes per node (with device cuda: one GPU each)
        device: cpu or cuda (one GPU per worker); every worker gets MKT_DEVICE=DEVICE, and a cuda worker that
            finds no GPU stops at start instead of training on CPU
        cpu: cpus per node; 0: 4 per worker with device cpu, 8 with cuda (ignored when h is given)
        gpu: gpus per node; -1: nproc_per_node with device cuda, 0 with cpu (ignored when h is given)
        memMB: memory per node in MB; 0: 12 GiB per worker with device cpu, 32 GiB with cuda, plus 8 GiB
            (ignored when h is given)
        h: a registered named resource (e.g. gpu.xlarge); takes precedence over cpu, gpu and memMB
        env: extra environment variables for every worker (e.g. NCCL_DEBUG=INFO,LOGLEVEL=INFO)
        max_retries: how many times the scheduler may restart the job (use with resume True)
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        rdzv_port: port on the rank 0 host for the rendezvous store (multi-node only)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data[,readonly])
        debug: turn on torch's distributed debug flags (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)
    """
    command = ["train", "--config", config, "--stage", "mem", "--data", data, "--run-dir", run_dir]
    if resume:
        command.append("--resume")
    return _mkt_app(
        "mkt-pretrain", "trainer", command, overrides, plan=plan, image=image, nnodes=nnodes,
        nproc_per_node=nproc_per_node, device=device, cpu=cpu, gpu=gpu, memMB=memMB, h=h, env=env,
        max_retries=max_retries,
        rdzv_backend=rdzv_backend, rdzv_port=rdzv_port, mounts=mounts, debug=debug,
    )


def finetune(
    *overrides: str,
    config: str,
    mem_run: str,
    data: str,
    run_dir: str,
    resume: bool = False,
    plan: Optional[str] = None,
    image: str = ".",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    device: str = "cpu",
    cpu: int = 0,
    gpu: int = -1,
    memMB: int = 0,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    Stage 2 of MKT: fine-tune the target entity model (TEM) with knowledge from a pretrained, frozen MEM
    (runs ``mkt train --stage tem`` on nnodes x nproc_per_node workers).

    Args:
        overrides: config overrides as KEY=VALUE (e.g. train.max_steps=100), each passed as ``--set KEY=VALUE``
        config: YAML config file (e.g. configs/quickstart.yaml), as seen by the job
        mem_run: run directory of the finished pretrain job (its checkpoint provides the MEM)
        data: dataset directory written by ``mkt synth`` or ``mkt tenrec``
        run_dir: run directory for checkpoints, metrics.jsonl and logs (shared by all nodes)
        resume: continue from the latest checkpoint in run_dir (``--resume True``)
        plan: sharding plan file written by ``mkt plan`` (sets train.planner.plan_file)
        image: image holding the installed package: a container image for kubernetes/docker,
            a directory for the ``local`` scheduler; ignored by ``local_cwd`` (which uses the current directory)
        nnodes: number of nodes (scheduler replicas)
        nproc_per_node: worker processes per node (with device cuda: one GPU each)
        device: cpu or cuda (one GPU per worker); every worker gets MKT_DEVICE=DEVICE, and a cuda worker that
            finds no GPU stops at start instead of training on CPU
        cpu: cpus per node; 0: 4 per worker with device cpu, 8 with cuda (ignored when h is given)
        gpu: gpus per node; -1: nproc_per_node with device cuda, 0 with cpu (ignored when h is given)
        memMB: memory per node in MB; 0: 12 GiB per worker with device cpu, 32 GiB with cuda, plus 8 GiB
            (ignored when h is given)
        h: a registered named resource (e.g. gpu.xlarge); takes precedence over cpu, gpu and memMB
        env: extra environment variables for every worker (e.g. NCCL_DEBUG=INFO,LOGLEVEL=INFO)
        max_retries: how many times the scheduler may restart the job (use with resume True)
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        rdzv_port: port on the rank 0 host for the rendezvous store (multi-node only)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data[,readonly])
        debug: turn on torch's distributed debug flags (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)
    """
    command = [
        "train", "--config", config, "--stage", "tem", "--mem-run", mem_run, "--data", data, "--run-dir", run_dir,
    ]
    if resume:
        command.append("--resume")
    return _mkt_app(
        "mkt-finetune", "trainer", command, overrides, plan=plan, image=image, nnodes=nnodes,
        nproc_per_node=nproc_per_node, device=device, cpu=cpu, gpu=gpu, memMB=memMB, h=h, env=env,
        max_retries=max_retries,
        rdzv_backend=rdzv_backend, rdzv_port=rdzv_port, mounts=mounts, debug=debug,
    )


def evaluate(
    *overrides: str,
    config: str,
    run_dir: str,
    data: str,
    image: str = ".",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    device: str = "cpu",
    cpu: int = 0,
    gpu: int = -1,
    memMB: int = 0,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    debug: bool = False,
) -> specs.AppDef:
    """
    Evaluate the latest checkpoint of a pretrain or finetune run on the test split (AUC, GAUC)
    (runs ``mkt evaluate`` on nnodes x nproc_per_node workers).

    Args:
        overrides: evaluation settings as KEY=VALUE, each passed as ``--set KEY=VALUE``: only eval.*,
            data.batch_size, data.num_workers and train.threads apply (the model and its plan come from the run;
            evaluate re-plans for its own world size), others are refused
        config: YAML config file the run was trained with, as seen by the job
        run_dir: run directory of the pretrain or finetune job to evaluate
        data: dataset directory written by ``mkt synth`` or ``mkt tenrec``
        image: image holding the installed package: a container image for kubernetes/docker,
            a directory for the ``local`` scheduler; ignored by ``local_cwd`` (which uses the current directory)
        nnodes: number of nodes (scheduler replicas)
        nproc_per_node: worker processes per node (with device cuda: one GPU each)
        device: cpu or cuda (one GPU per worker); every worker gets MKT_DEVICE=DEVICE, and a cuda worker that
            finds no GPU stops at start instead of training on CPU
        cpu: cpus per node; 0: 4 per worker with device cpu, 8 with cuda (ignored when h is given)
        gpu: gpus per node; -1: nproc_per_node with device cuda, 0 with cpu (ignored when h is given)
        memMB: memory per node in MB; 0: 12 GiB per worker with device cpu, 32 GiB with cuda, plus 8 GiB
            (ignored when h is given)
        h: a registered named resource (e.g. gpu.xlarge); takes precedence over cpu, gpu and memMB
        env: extra environment variables for every worker (e.g. NCCL_DEBUG=INFO,LOGLEVEL=INFO)
        max_retries: how many times the scheduler may restart the job
        rdzv_backend: torchrun rendezvous backend (multi-node only)
        rdzv_port: port on the rank 0 host for the rendezvous store (multi-node only)
        mounts: mounts for container schedulers (e.g. type=bind,src=/data,dst=/data[,readonly])
        debug: turn on torch's distributed debug flags (TORCH_DISTRIBUTED_DEBUG=DETAIL, ...)
    """
    command = ["evaluate", "--config", config, "--run-dir", run_dir, "--data", data]
    return _mkt_app(
        "mkt-evaluate", "evaluator", command, overrides, plan=None, image=image, nnodes=nnodes,
        nproc_per_node=nproc_per_node, device=device, cpu=cpu, gpu=gpu, memMB=memMB, h=h, env=env,
        max_retries=max_retries,
        rdzv_backend=rdzv_backend, rdzv_port=rdzv_port, mounts=mounts, debug=debug,
    )


def _mkt_resources(device: str, nproc_per_node: int, cpu: int, gpu: int, memMB: int,
                   h: Optional[str]) -> Tuple[int, int, int]:
    """(cpu, gpu, memMB) per node: the given ones, the unset ones (cpu 0, gpu -1, memMB 0) sized for
    ``nproc_per_node`` workers on ``device``; checked against the named resource ``h`` when one is given (it then
    takes precedence in ``dist.ddp``). torchx 0.7 hands ``Optional[int]`` arguments over as strings, hence the
    sentinels."""
    if device not in _MKT_PER_WORKER:
        raise ValueError(f"device must be one of {sorted(_MKT_PER_WORKER)}, got {device!r}")
    for name, value, unset in (("cpu", cpu, 0), ("gpu", gpu, -1), ("memMB", memMB, 0)):
        if value < unset:
            raise ValueError(f"{name} must be >= {unset} ({unset}: sized for the workers), got {value}")
    worker_cpu, worker_mb = _MKT_PER_WORKER[device]
    cpu = cpu or worker_cpu * nproc_per_node
    gpu = gpu if gpu != -1 else (nproc_per_node if device == "cuda" else 0)
    memMB = memMB or worker_mb * nproc_per_node + _MKT_NODE_HEADROOM_MB
    if h is not None:
        try:
            gpus = specs.resource(h=h).gpu
        except KeyError:
            raise ValueError(f"h={h!r} is not a registered named resource (see torchx.specs.named_resources)") from None
        which = f"h={h!r} ({gpus} GPU{'' if gpus == 1 else 's'})"
    else:
        gpus, which = gpu, f"gpu={gpu}"
    if device == "cuda" and gpus < nproc_per_node:
        raise ValueError(f"nproc_per_node={nproc_per_node} exceeds {which}: a cuda job needs one GPU per worker")
    if device == "cpu" and gpus > 0:
        raise ValueError(f"{which} with device='cpu' would leave the GPUs idle: pass --device cuda to train on them")
    return cpu, gpu, memMB


def _mkt_app(
    app_name: str,
    role_name: str,
    command: List[str],
    overrides: Tuple[str, ...],
    *,
    plan: Optional[str],
    image: str,
    nnodes: int,
    nproc_per_node: int,
    device: str,
    cpu: int,
    gpu: int,
    memMB: int,
    h: Optional[str],
    env: Optional[Dict[str, str]],
    max_retries: int,
    rdzv_backend: str,
    rdzv_port: int,
    mounts: Optional[List[str]],
    debug: bool,
) -> specs.AppDef:
    """Validate the shared arguments and build the torchrun job with ``dist.ddp``; copies every container."""
    if nnodes < 1:
        raise ValueError(f"nnodes must be >= 1, got {nnodes}")
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    cpu, gpu, memMB = _mkt_resources(device, nproc_per_node, cpu, gpu, memMB, h)
    asked = (env or {}).get(_MKT_DEVICE_ENV, device)
    if asked != device:
        raise ValueError(f"env {_MKT_DEVICE_ENV}={asked!r} contradicts device={device!r}")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    for override in overrides:
        if "=" not in override or override.startswith("="):
            raise ValueError(f"config override {override!r} is not KEY=VALUE (e.g. train.max_steps=100)")

    cli_args = list(command)
    if plan:
        cli_args += ["--set", f"{_MKT_PLAN_KEY}={plan}"]
    for override in overrides:  # after the plan, so an explicit override wins
        cli_args += ["--set", override]

    # A fresh dict: ddp writes into the env it is given. A fixed LOGLEVEL default keeps the AppDef a
    # function of the arguments alone (ddp would otherwise copy the caller's $LOGLEVEL).
    job_env = {"LOGLEVEL": "WARNING", **(env or {}), _MKT_DEVICE_ENV: device}
    app = dist.ddp(
        *cli_args,
        m=_MKT_CLI_MODULE,
        image=image,
        name=f"mkt/{app_name}",
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=job_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
        mounts=list(mounts) if mounts else None,
        debug=debug,
    )
    # ddp names the role after the module ("cli"); name it after what it does.
    (role,) = app.roles
    return dataclasses.replace(app, roles=[dataclasses.replace(role, name=role_name)])
