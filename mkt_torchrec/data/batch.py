"""The training / evaluation batch: what the reader yields and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One batch of B impressions.

    Attributes:
        sparse_features: KeyedJaggedTensor with keys ``schema.sparse_keys`` (every categorical feature, then
            every behaviour sequence). Values are table rows. A single-valued feature has length 1, or 0 when
            null (an entity-specific feature on a row of the other entity); a sequence has its true length
            (at most its ``max_len``, the most recent elements kept, oldest first). With
            ``data.related_items.key`` set, that key comes last: the related source items of a target row's item
            (``mkt_torchrec.data.relations``; empty on source rows).
        dense_features: (B, F_dense) float32, null read as 0 (F_dense may be 0).
        labels: (B,) float32 in {0, 1}.
        entity: (B,) int64, 0 = source, 1 = target.
        user_id: (B,) int64 raw user ids (for per-user metrics).
        true_prob: (B,) float32 true click probability, synthetic data only.
        activity: (B,) int64 the user's number of past behaviours, if the dataset has it.
        weights: (B,) float32 loss weight of each row, set by the trainer (``1 / rows in the global step`` for
            real rows, 0 for a finished rank's filler rows); None: the loss is the mean over the batch.
    """

    sparse_features: KeyedJaggedTensor
    dense_features: torch.Tensor
    labels: torch.Tensor
    entity: torch.Tensor
    user_id: torch.Tensor
    true_prob: Optional[torch.Tensor] = None
    activity: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        def mv(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device=device, non_blocking=non_blocking)

        return Batch(
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            dense_features=mv(self.dense_features),  # type: ignore[arg-type]
            labels=mv(self.labels),  # type: ignore[arg-type]
            entity=mv(self.entity),  # type: ignore[arg-type]
            user_id=mv(self.user_id),  # type: ignore[arg-type]
            true_prob=mv(self.true_prob),
            activity=mv(self.activity),
            weights=mv(self.weights),
        )

    def record_stream(self, stream: torch.Stream) -> None:
        self.sparse_features.record_stream(stream)
        for t in (self.dense_features, self.labels, self.entity, self.user_id, self.true_prob, self.activity,
                  self.weights):
            if t is not None:
                t.record_stream(stream)  # type: ignore[arg-type]

    def pin_memory(self) -> "Batch":
        def pin(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.pin_memory()

        return Batch(
            sparse_features=self.sparse_features.pin_memory(),
            dense_features=pin(self.dense_features),  # type: ignore[arg-type]
            labels=pin(self.labels),  # type: ignore[arg-type]
            entity=pin(self.entity),  # type: ignore[arg-type]
            user_id=pin(self.user_id),  # type: ignore[arg-type]
            true_prob=pin(self.true_prob),
            activity=pin(self.activity),
            weights=pin(self.weights),
        )
