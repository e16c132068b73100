"""TorchX components that launch the MKT workflows as ``nnodes x nproc_per_node`` torchrun jobs.

``mkt.py`` holds one component per workflow step: ``pretrain`` (stage 1, the MEM), ``finetune``
(stage 2, the TEM on a pretrained MEM) and ``evaluate``. They are plain functions over primitive
arguments, so the same definition runs on any TorchX scheduler (``local_cwd``, ``kubernetes``,
``slurm``, ...)::

    torchx run -s local_cwd torchx_components/mkt.py:pretrain --help
"""
