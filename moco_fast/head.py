"""MoCoHead: the contrastive part of a MoCo trainer in one module.

It replaces the official code's l_pos/l_neg einsums, torch.cat, division by T, cross_entropy with
zero labels and _dequeue_and_enqueue by one call::

    loss = head(q, k)            # q from the query encoder, k from the momentum encoder

The head L2-normalizes q and k, computes InfoNCE of q against [k; queue] with the queue as it was
before this batch, and then (in training mode) enqueues k. acc@1 / acc@5 come from the positive's
rank, so no logits are needed: ``head.last_stats`` or ``head(q, k, return_stats=True)``.

Gradient accumulation, exactly. The official code enqueues the keys of every forward, so N
micro-batches of one optimizer step see different queues and do not add up to one large batch.
Inside ``with head.accumulate():`` every forward contrasts against the queue as it was when the
block began, and the keys of all micro-batches are enqueued once when it ends, in the large batch's
order — so N micro-batches (each loss divided by N) give the loss, gradients and queue of one batch
N times larger. An exception inside the block enqueues nothing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .functional import InfoNCEStats, info_nce, stats_from_rank
from .queue import KeyQueue
from .validation import check_matrix, check_temperature


class MoCoHead(nn.Module):
    """InfoNCE against a queue of momentum keys, plus the queue update.

    Args:
        dim: feature dimension d of q and k.
        queue_size: K, negatives kept (65536 in MoCo).
        temperature: T (0.07 in MoCo v1, 0.2 in v2).
        queue_dtype: storage dtype of the queue (default fp32; bf16 halves its memory and traffic).
        symmetric: if True, ``head(q1, q2, k1, k2)`` with q_v, k_v the query / key encodings of view v:
            the loss averages InfoNCE(q1, k2) and InfoNCE(q2, k1) (the MoCo CIFAR demo pairs views
            this way; it sums them, we average), and both key batches are enqueued once, after both
            losses: k1, then k2 (under DDP: k1 of every rank, then k2 — as one process on the global batch).
        gather_distributed: all-gather keys across ranks before enqueueing (one shared queue).
        backend: "auto" | "cuda" | "triton" | "torch" | "reference".
        queue_init: "empty" or "random" (the official random unit keys).
        on_nonfinite: see :class:`KeyQueue` ("raise" or "skip").

    Forward returns the fp32 scalar loss, or (loss, InfoNCEStats) with ``return_stats=True``.
    """

    def __init__(
        self,
        dim: int = 128,
        queue_size: int = 65536,
        temperature: float = 0.07,
        *,
        queue_dtype: torch.dtype | None = None,
        symmetric: bool = False,
        gather_distributed: bool = True,
        backend: str = "auto",
        queue_init: str = "empty",
        on_nonfinite: str = "raise",
    ):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.symmetric = bool(symmetric)
        self.backend = backends.check_name(backend)
        self.queue = KeyQueue(
            queue_size,
            dim,
            dtype=queue_dtype or torch.float32,
            gather_distributed=gather_distributed,
            init=queue_init,
            on_nonfinite=on_nonfinite,
            backend=backend,
        )
        self.last_stats: InfoNCEStats | None = None
        # Inside accumulate(): the keys waiting to be enqueued, one list per key slot (k; or k1, k2).
        self._pending: list[list[Tensor]] | None = None

    @property
    def dim(self) -> int:
        return self.queue.dim

    def _pair(self, q: Tensor, k: Tensor, negatives: Tensor):
        return info_nce(q, k, negatives, self.temperature, backend=self.backend, return_stats=True)

    def _check(self, tensors: dict[str, Tensor]) -> None:
        first = None
        for name, t in tensors.items():
            check_matrix(t, name, self.dim)
            if first is None:
                first = (name, t)
            elif t.shape != first[1].shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but {first[0]} has {tuple(first[1].shape)}")
        name, t = first
        if t.device != self.queue.keys.device:
            raise ValueError(f"{name} is on {t.device} but the queue is on {self.queue.keys.device}; move the head")

    def forward(self, *tensors: Tensor, return_stats: bool = False):
        if self.symmetric:
            if len(tensors) != 4:
                raise TypeError(f"a symmetric MoCoHead takes (q1, q2, k1, k2), got {len(tensors)} tensors")
            names = ("q1", "q2", "k1", "k2")
        else:
            if len(tensors) != 2:
                raise TypeError(f"MoCoHead takes (q, k) (or symmetric=True for 4 tensors), got {len(tensors)} tensors")
            names = ("q", "k")
        self._check(dict(zip(names, tensors)))
        normed = [F.normalize(t, dim=1) for t in tensors]
        negatives = self.queue.negatives()  # the queue before this batch
        if self.symmetric:
            q1, q2, k1, k2 = normed
            loss12, s12 = self._pair(q1, k2, negatives)
            loss21, s21 = self._pair(q2, k1, negatives)
            loss = 0.5 * (loss12 + loss21)
            stats = stats_from_rank(torch.cat([s12.rank, s21.rank]), torch.cat([s12.lse, s21.lse]))
            new_keys = [k1.detach(), k2.detach()]
        else:
            q, k = normed
            loss, stats = self._pair(q, k, negatives)
            new_keys = [k.detach()]
        if self.training:
            if self._pending is None:
                self.queue.enqueue(torch.cat(new_keys), blocks=len(new_keys))
            else:
                self._defer(new_keys)
        self.last_stats = stats
        return (loss, stats) if return_stats else loss

    def _defer(self, new_keys: list[Tensor]) -> None:
        waiting = sum(k.shape[0] for slot in self._pending for k in slot) + sum(k.shape[0] for k in new_keys)
        if waiting > self.queue.size:
            raise ValueError(
                f"accumulate(): {waiting} keys of this step would not fit the queue of size {self.queue.size}"
            )
        for slot, k in zip(self._pending, new_keys):
            slot.append(k)

    @contextlib.contextmanager
    def accumulate(self):
        """One optimizer step of micro-batches: every forward inside sees the queue as it was at the start,
        and all their keys are enqueued once at the end (k1 of every micro-batch, then k2, when symmetric),
        exactly as one large batch would. Nothing is enqueued if the block raises."""
        if self._pending is not None:
            raise RuntimeError("MoCoHead.accumulate() blocks do not nest")
        self._pending = [[] for _ in range(2 if self.symmetric else 1)]
        try:
            yield self
            pending = [k for slot in self._pending for k in slot]
            blocks = len(self._pending)
        finally:
            self._pending = None
        if pending:
            self.queue.enqueue(torch.cat(pending), blocks=blocks)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, backend={self.backend!r}"
