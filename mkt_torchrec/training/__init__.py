"""Distributed training: model assembly, the trainer, checkpoints, evaluation."""
