"""SwAV: Sinkhorn-Knopp codes in the log domain, the swapped-prediction loss, prototypes and the queue.

* :func:`sinkhorn` — the equal-partition codes of SwAV. The official form exponentiates
  ``scores / epsilon`` and rescales rows and columns alternately; lightly and solo-learn do the same
  without subtracting a maximum, so ``exp`` overflows as soon as ``score/ε > 88`` in fp32 (ε = 0.01
  with scores near 1) or ``> 11`` in fp16, and the codes become inf/NaN (facebookresearch/swav#67,
  dinov2 PR #583). Here every rescaling is a log-sum-exp subtraction on ``L = scores/ε``: the same
  iterates (each normalization divides by a sum; in the log domain it subtracts its logarithm), so the
  same fixed point, finite for any ε > 0 and for bf16/fp16 scores (computed in fp32).
* :class:`SwaVLoss` — lightly's ``SwaVLoss`` (same arguments, same ``forward(high_resolution_outputs,
  low_resolution_outputs, queue_outputs=None)``, same value where lightly is finite), on :func:`sinkhorn`,
  with the cross entropies in fp32. It returns a 0-dim tensor (lightly's has shape (1,)).
* :class:`SwaVPrototypes` — the prototypes as a bias-free linear layer whose rows are kept on the unit
  sphere (:meth:`SwaVPrototypes.normalize`, once per step as in the official code), frozen (no gradient)
  for the first ``n_steps_frozen_prototypes`` steps.
* :class:`SwaVQueue` — one ring buffer of past projections per high-resolution crop (for small batches);
  its contents are scored against the current prototypes and join Sinkhorn once the queue is full, as in
  the official code. Built on :class:`moco_fast.KeyQueue`: persistent buffers (state_dict, checkpoints),
  no host sync, NaN/Inf batches refused.

Layouts: scores are (B, P) — rows the samples, columns the prototypes (lightly's layout; the official
code's Q is the transpose). Codes are (B, P), each row summing to 1.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import is_distributed
from .queue import KeyQueue
from .validation import (
    KERNEL_DTYPES,
    check_matrix,
    check_nonempty,
    check_positive_int,
    check_same_device,
    check_temperature,
    check_view_list,
    compute_dtype,
)

__all__ = ["SwaVLoss", "SwaVPrototypes", "SwaVQueue", "sinkhorn"]


def _check_iterations(iterations: object) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    return iterations


def _world(gather_distributed: bool) -> int:
    return dist.get_world_size() if gather_distributed and is_distributed() else 1


# exp(x) for x below this is a subnormal (or 0) in the dtype: clamping there changes a sum that holds a 1
# (the max-shifted term) by < P·1e-38 relative, and avoids x86's slow subnormal path (6-12x slower exp).
_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -708.0}


def _global_lse(L: Tensor, dim: int, world: int, buf: Tensor) -> Tensor:
    """logsumexp of ``L`` along ``dim`` over the rows of every rank (keepdim): one all_gather of (max, sum).

    Each rank sends its max and its max-shifted sum of exps; every rank merges them the same way, so
    the result is finite whatever the range of ``L`` (an all_reduce of plain sums of ``exp`` is not).
    ``buf`` is scratch of L's shape.
    """
    m = L.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf slice must not give NaN
    s = torch.sub(L, m, out=buf).clamp_(min=_EXP_FLOOR[L.dtype]).exp_().sum(dim=dim, keepdim=True)
    if world > 1:
        parts = [torch.empty((2, *m.shape), dtype=m.dtype, device=m.device) for _ in range(world)]
        dist.all_gather(parts, torch.stack([m, s]))
        stacked = torch.stack(parts)  # (world, 2, ...)
        ms, ss = stacked[:, 0], stacked[:, 1]
        m = ms.amax(dim=0)
        s = (ss * torch.exp(ms - m)).sum(dim=0)
    return s.log_().add_(m)


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int = 3, epsilon: float = 0.05, gather_distributed: bool = False) -> Tensor:
    """SwAV's Sinkhorn-Knopp codes, in the log domain (lightly's/the official algorithm, finite for any ε).

    Args:
        scores: (B, P) similarities of the features to the prototypes (fp32/bf16/fp16/fp64; computed in
            fp32, fp64 for fp64).
        iterations: Sinkhorn iterations (3 in SwAV); 0 returns ``B·softmax`` over the whole matrix, as
            the official code does.
        epsilon: the entropic regularization ε > 0 (0.05 in SwAV).
        gather_distributed: under torch.distributed, the per-prototype sums run over the samples of
            every rank (B is then the global batch): one all_gather of (P,) max/sum pairs per iteration.

    Returns the codes (B, P) in the compute dtype, each row summing to 1 (no gradient).

    Iteration (L = scores/ε, P prototypes, B samples): L[:, k] −= logsumexp_b L[b, k] + log P, then
    L[b, :] −= logsumexp_k L[b, k] + log B; codes = B·exp(L) — the official ``Q /= sum_of_rows; Q /= K;
    Q /= sum_of_cols; Q /= B`` with every division taken as a subtraction of logarithms. The official
    first normalization ``Q /= sum(Q)`` is a constant factor that the next row normalization cancels, so
    it is only applied when ``iterations == 0``.
    """
    check_matrix(scores, "scores")
    check_nonempty(scores, "scores")
    iterations = _check_iterations(iterations)
    epsilon = check_temperature(epsilon, "epsilon")
    world = _world(gather_distributed)
    ct = compute_dtype(scores)
    L = scores.to(ct) / epsilon  # (B, P), a fresh tensor: updated in place below
    # A NaN/Inf score makes every code NaN (on the device, no sync): a −inf would otherwise be taken as a
    # zero mass by the max-shifted sums below and could give finite codes from a poisoned input.
    L += torch.where(torch.isfinite(L).all(), 0.0, float("nan")).to(ct)
    buf = torch.empty_like(L)
    num_samples, num_prototypes = L.shape[0] * world, L.shape[1]
    log_b, log_p = math.log(num_samples), math.log(num_prototypes)
    if iterations == 0:
        total = _global_lse(L.reshape(1, -1), 1, world, buf.reshape(1, -1))  # the log of the global sum
        return L.sub_(total - log_b).clamp_(min=_EXP_FLOOR[ct]).exp_()
    for _ in range(iterations):
        L -= _global_lse(L, 0, world, buf).add_(log_p)  # each prototype's mass → 1/P (all ranks)
        L -= _global_lse(L, 1, 1, buf).add_(log_b)  # each sample's mass → 1/B (its own row)
    # Codes below the dtype's smallest normal (1.2e-38 in fp32) come out as ~1.6e-38 instead of a subnormal.
    return L.add_(log_b).clamp_(min=_EXP_FLOOR[ct]).exp_()


class SwaVLoss(nn.Module):
    """SwAV's swapped-prediction loss (lightly's ``SwaVLoss``, on the log-domain :func:`sinkhorn`).

    Args:
        temperature: τ of the prediction softmax (0.1).
        sinkhorn_iterations, sinkhorn_epsilon: of :func:`sinkhorn` (3, 0.05).
        sinkhorn_gather_distributed: the Sinkhorn sums run over every rank's samples.

    ``forward(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)``: lists of (B, P)
    prototype scores (z·Cᵀ, z unit rows) of the high-resolution (global) crops, which get codes, and of the
    low-resolution crops, which only predict; ``queue_outputs[i]`` (N, P) are the scores of queued
    features appended to crop i's Sinkhorn input. For each high-resolution crop i, the codes q_i predict
    every other crop v: loss = mean_i [ Σ_{v≠i} −mean_b Σ_k q_i·log_softmax(s_v/τ) / (n_crops − 1) ].
    Returns the fp32 scalar (0-dim). At least two crops in total.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_gather_distributed: bool = False,
    ):
        super().__init__()
        if sinkhorn_gather_distributed and not dist.is_available():
            raise ValueError("sinkhorn_gather_distributed is True but torch.distributed is not available")
        self.temperature = check_temperature(temperature)
        self.sinkhorn_iterations = _check_iterations(sinkhorn_iterations)
        self.sinkhorn_epsilon = check_temperature(sinkhorn_epsilon, "sinkhorn_epsilon")
        self.sinkhorn_gather_distributed = bool(sinkhorn_gather_distributed)

    def subloss(self, z: Tensor, q: Tensor) -> Tensor:
        """Cross entropy −mean_b Σ_k q_bk·log_softmax(z_b/τ)_k, in fp32 (fp64 for fp64)."""
        ct = compute_dtype(z, q)
        return -torch.mean(torch.sum(q.to(ct) * F.log_softmax(z.to(ct) / self.temperature, dim=1), dim=1))

    def _check(self, high, low, queue) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        high = check_view_list(high, "high_resolution_outputs")
        low = check_view_list(low, "low_resolution_outputs", allow_empty=True)
        first = high[0]
        for name, views in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
            for i, v in enumerate(views):
                if v.shape != first.shape:
                    raise ValueError(
                        f"{name}[{i}] has shape {tuple(v.shape)} but high_resolution_outputs[0] has "
                        f"{tuple(first.shape)}: every crop is the same batch scored against the same prototypes"
                    )
                check_same_device(("high_resolution_outputs[0]", first), (f"{name}[{i}]", v))
        if len(high) + len(low) < 2:
            raise ValueError("SwaVLoss needs at least two crops in total (one to code, one to predict it)")
        if queue is not None:
            queue = check_view_list(queue, "queue_outputs")
            if len(queue) != len(high):
                raise ValueError(
                    f"queue_outputs has {len(queue)} entries but there are {len(high)} high-resolution crops "
                    "(one queue per high-resolution crop)"
                )
            for i, v in enumerate(queue):
                if v.shape[1] != first.shape[1]:
                    raise ValueError(f"queue_outputs[{i}] has {v.shape[1]} prototypes, the crops {first.shape[1]}")
                check_same_device(("high_resolution_outputs[0]", first), (f"queue_outputs[{i}]", v))
        return high, low, queue

    def forward(
        self,
        high_resolution_outputs: Sequence[Tensor],
        low_resolution_outputs: Sequence[Tensor],
        queue_outputs: Sequence[Tensor] | None = None,
    ) -> Tensor:
        high, low, queue = self._check(high_resolution_outputs, low_resolution_outputs, queue_outputs)
        n_crops = len(high) + len(low)
        crops = high + low
        loss = None
        for i, scores in enumerate(high):
            with torch.no_grad():
                inputs = scores.detach()
                if queue is not None:
                    inputs = torch.cat((inputs, queue[i].detach().to(inputs.dtype)))
                q = sinkhorn(inputs, self.sinkhorn_iterations, self.sinkhorn_epsilon, self.sinkhorn_gather_distributed)
                q = q[: scores.shape[0]]  # the queue's rows only shape the partition
            subloss = sum(self.subloss(crops[v], q) for v in range(n_crops) if v != i)
            term = subloss / (n_crops - 1)
            loss = term if loss is None else loss + term
        return loss / len(high)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}, "
            f"sinkhorn_epsilon={self.sinkhorn_epsilon}"
        )


class SwaVPrototypes(nn.Module):
    """P prototypes of dimension d: ``scores = x·Cᵀ`` with C (P, d) kept on the unit sphere.

    Args:
        input_dim: d (the projection dimension; 128 in SwAV).
        n_prototypes: P (3000 in SwAV).
        n_steps_frozen_prototypes: for steps < N the prototypes get no gradient (the official
            ``freeze_prototypes_niters``); ``forward`` then needs ``step``.

    The layer is a bias-free ``nn.Linear`` (``self.layer``; the official ``prototypes``; lightly's
    ``SwaVPrototypes`` adds a bias, which a normalized layer has no use for). Call :meth:`normalize` once
    per training step, before the forward (the official code normalizes the weight at every iteration).
    Freezing gives the weight an exact zero gradient inside ``forward`` instead of switching
    ``requires_grad``: the prototypes stay in an optimizer built at the start and in DDP's reduction (no
    unused parameter), and since only weight decay can then move them — a rescaling of each row — the
    per-step :meth:`normalize` undoes it.
    """

    def __init__(self, input_dim: int = 128, n_prototypes: int = 3000, n_steps_frozen_prototypes: int = 0):
        super().__init__()
        check_positive_int(input_dim, "input_dim")
        check_positive_int(n_prototypes, "n_prototypes")
        if isinstance(n_steps_frozen_prototypes, bool) or not isinstance(n_steps_frozen_prototypes, int):
            raise ValueError(f"n_steps_frozen_prototypes must be an int, got {n_steps_frozen_prototypes!r}")
        self.layer = nn.Linear(input_dim, n_prototypes, bias=False)
        self.n_steps_frozen_prototypes = n_steps_frozen_prototypes
        self.normalize()

    @property
    def weight(self) -> Tensor:
        """The prototypes C (P, d)."""
        return self.layer.weight

    def frozen(self, step: int | None) -> bool:
        if self.n_steps_frozen_prototypes > 0:
            if step is None:
                raise ValueError("n_steps_frozen_prototypes > 0: pass the current training step to forward()")
            return step < self.n_steps_frozen_prototypes
        return False

    def forward(self, x: Tensor, step: int | None = None) -> Tensor:
        """Scores (B, P) = x·Cᵀ for x (B, d) (normalize x first)."""
        weight = self.layer.weight
        if self.frozen(step):
            weight = weight.detach() + weight * 0.0  # in the graph, with a zero gradient
        return F.linear(x, weight)

    @torch.no_grad()
    def normalize(self) -> None:
        """Put every prototype back on the unit sphere (in place)."""
        w = self.layer.weight
        w.copy_(F.normalize(w.float(), dim=1).to(w.dtype))


class SwaVQueue(nn.Module):
    """One queue of past (normalized) projections per high-resolution crop, for small batches.

    Args:
        num_queues: the number of high-resolution crops that get codes (2).
        size: rows per queue (3840 in SwAV's small-batch setting; a multiple of the batch is not needed).
        dim: the projection dimension d.
        gather_distributed: all-gather the projections of every rank into one shared queue (default False:
            as in the official code each rank keeps its own queue and Sinkhorn's sums join them).
        on_nonfinite, dtype, backend: see :class:`moco_fast.KeyQueue`.

    :meth:`outputs` scores the queued rows against the current prototypes once every queue is full (the
    official rule) and returns None before; :meth:`enqueue` appends a step's projections (after the loss).

    ``with queue.accumulate():`` — one optimizer step as micro-batches: :meth:`outputs` sees the queues as
    they were when the block began and the projections of every :meth:`enqueue` inside are appended once
    when it ends, in batch order (the queues a large batch leaves). Nothing is enqueued if the block raises;
    blocks do not nest. The loss itself is not additive over micro-batches: Sinkhorn's equal partition
    runs over each call's rows (plus the queue's), so N micro-batches are not one batch N times larger.
    """

    def __init__(
        self,
        num_queues: int,
        size: int,
        dim: int,
        *,
        gather_distributed: bool = False,
        dtype: torch.dtype = torch.float32,
        on_nonfinite: str = "raise",
        backend: str = "auto",
    ):
        super().__init__()
        check_positive_int(num_queues, "num_queues")
        if dtype not in KERNEL_DTYPES:
            raise TypeError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        self.queues = nn.ModuleList(
            KeyQueue(size, dim, dtype, gather_distributed, on_nonfinite=on_nonfinite, backend=backend)
            for _ in range(num_queues)
        )
        # Inside accumulate(): the projections waiting to be enqueued, one list per queue.
        self._pending: list[list[Tensor]] | None = None

    @property
    def is_full(self) -> bool:
        return all(q.is_full for q in self.queues)

    def outputs(self, prototypes: nn.Module) -> list[Tensor] | None:
        """``[prototypes(queue_i)]`` (each (size, P), no gradient) once every queue is full, else None."""
        if not self.is_full:
            return None
        with torch.no_grad():
            weight = prototypes.weight if isinstance(prototypes, SwaVPrototypes) else None
            if weight is not None:
                return [F.linear(q.negatives().to(weight.dtype), weight) for q in self.queues]
            return [prototypes(q.negatives()) for q in self.queues]

    @torch.no_grad()
    def enqueue(self, projections: Sequence[Tensor]) -> None:
        """Append crop i's (B, d) projections to queue i (shapes checked for every crop before any write)."""
        projections = list(projections)
        if len(projections) != len(self.queues):
            raise ValueError(f"got {len(projections)} projection batches for {len(self.queues)} queues")
        for i, (q, z) in enumerate(zip(self.queues, projections)):
            check_matrix(z, f"projections[{i}]", q.dim)
        if self._pending is not None:
            waiting = sum(z.shape[0] for z in self._pending[0]) + projections[0].shape[0]
            if waiting > self.queues[0].size:
                raise ValueError(
                    f"accumulate(): {waiting} projections of this step would not fit a queue of size "
                    f"{self.queues[0].size}"
                )
            for slot, z in zip(self._pending, projections):
                slot.append(z.detach().clone())
            return
        self._enqueue_all_or_nothing([z.detach() for z in projections])

    def _enqueue_all_or_nothing(self, batches: list) -> None:
        # A NaN/Inf in any crop poisons every crop's batch (× NaN instead of × 1, on the device, no sync),
        # so every queue refuses its write — not only the queues from the bad crop on.
        ok = torch.stack([torch.isfinite(z).all() for z in batches]).all()
        factor = torch.where(ok, 1.0, float("nan"))
        for q, z in zip(self.queues, batches):
            q.enqueue(z * factor.to(z.dtype))

    @contextlib.contextmanager
    def accumulate(self):
        """One optimizer step of micro-batches: the queues do not change inside the block; every
        :meth:`enqueue` inside is appended once, in order, when it ends (all or nothing across the crops,
        as one enqueue). Nothing is enqueued if it raises."""
        if self._pending is not None:
            raise RuntimeError("SwaVQueue.accumulate() blocks do not nest")
        self._pending = [[] for _ in self.queues]
        try:
            yield self
            pending = self._pending
        finally:
            self._pending = None
        if pending[0]:
            self._enqueue_all_or_nothing([torch.cat(slot) for slot in pending])
