"""The public functional API: validate, pick the backend, run the op.

Nothing here knows a backend's internals: :func:`moco_fast.backends.select` names the backend from
its declared support, and the op (``moco_fast.ops``) or the backend's contract function runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends, ops
from .validation import (
    as_tensor_list,
    check_matrix,
    check_momentum,
    check_nonempty,
    check_reduction,
    check_same_device,
    check_same_shape,
    check_temperature,
    group_pairs,
    reduce,
)


class InfoNCEStats(NamedTuple):
    """Instance-discrimination statistics computed without logits.

    acc1, acc5: 0-dim fp32 tensors, the fraction of rows whose positive is the top-1 / in the top-5
    of its K+1 logits (``rank < 1`` / ``rank < 5``). rank: (B,) int64, negatives beating the
    positive. lse: (B,) fp32 logsumexp of each row's logits.
    """

    acc1: Tensor
    acc5: Tensor
    rank: Tensor
    lse: Tensor


def stats_from_rank(rank: Tensor, lse: Tensor) -> InfoNCEStats:
    """acc@1 and acc@5 from the positive's rank (no logits needed)."""
    return InfoNCEStats(acc1=(rank < 1).float().mean(), acc5=(rank < 5).float().mean(), rank=rank, lse=lse.detach())


def check_info_nce_inputs(q: object, k: object, negatives: object) -> None:
    """q, k (B, d) and negatives (K, d): floating, 2-D, B ≥ 1, one device; else an error naming the argument."""
    check_matrix(q, "q")
    check_matrix(k, "k")
    check_matrix(negatives, "negatives")
    check_nonempty(q, "q")
    check_same_shape(k, "k", q, "q")
    if negatives.shape[1] != q.shape[1]:
        raise ValueError(f"negatives have dim {negatives.shape[1]} but q has dim {q.shape[1]}")
    check_same_device(("q", q), ("k", k), ("negatives", negatives))


def info_nce(
    q: Tensor,
    k: Tensor,
    negatives: Tensor,
    temperature: float = 0.07,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
):
    """InfoNCE of each query against its positive key and a shared set of negatives.

    Row i's logits are [q_i·k_i, q_i·n_0, …, q_i·n_{K−1}] / temperature with target index 0, and
    loss_i = logsumexp(row_i) − row_i[0]. Inputs are used as given (normalize them first).
    The B×(K+1) logits are never materialized (except by backend="reference").

    Args:
        q: (B, d) queries, fp32/bf16/fp16 (fp64 on the "torch"/"reference" backends).
        k: (B, d) positive keys, any of those dtypes.
        negatives: (K, d) negative keys (K may be 0); usually a queue without grad. It is not read
            again by the backward unless it requires grad, so it may be overwritten after the call.
        temperature: T > 0.
        reduction: "mean" | "sum" | "none" (per-row (B,) losses).
        backend: "auto" | "cuda" | "triton" | "torch" | "reference" (env MOCO_FAST_BACKEND overrides "auto").
        return_stats: also return an :class:`InfoNCEStats` (acc@1, acc@5, rank, lse).

    Returns:
        The fp32 loss (fp64 for fp64 inputs), or ``(loss, stats)`` when ``return_stats``.
    """
    check_info_nce_inputs(q, k, negatives)
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    impl = backends.select("info_nce", backend, q.device, (q.dtype, k.dtype, negatives.dtype), q.shape[1])
    loss, lse, _, rank = ops.info_nce_forward(q, k, negatives, 1.0 / temperature, impl, return_stats)
    loss = reduce(loss, reduction)
    if not return_stats:
        return loss
    return loss, stats_from_rank(rank, lse)


# ------------------------------------------------------------------------------------------------
# Momentum (EMA) update
# ------------------------------------------------------------------------------------------------

#: One step of a momentum plan: (backend function, targets, sources), called as fn(targets, sources, m, exact).
MomentumStep = tuple[Callable[..., None], list[Tensor], list[Tensor]]


def momentum_plan(
    targets: Sequence[Tensor], sources: Sequence[Tensor], backend: str, exact: bool
) -> list[MomentumStep]:
    """Validate target/source pairs once and group them into one backend call per (device, dtype).

    Raises (before anything is written) for mismatched pairs, a bad backend name, or an explicitly
    requested backend that cannot serve a group. Reusable for as long as the tensors are the same.
    """
    mode = "exact" if exact else "lerp"
    plan = []
    for (device, dtype, contiguous), (tgt, src) in group_pairs(targets, sources).items():
        impl = backends.select("momentum_update", backend, device, (dtype,), contiguous=contiguous, mode=mode)
        plan.append((backends.module(impl).momentum_update_, tgt, src))
    return plan


def run_momentum_plan(plan: list[MomentumStep], momentum: float, exact: bool) -> None:
    for fn, tgt, src in plan:
        fn(tgt, src, momentum, exact)


@torch.no_grad()
def momentum_update(
    target: torch.nn.Module | Sequence[Tensor],
    source: torch.nn.Module | Sequence[Tensor],
    momentum: float,
    *,
    exact: bool = False,
    backend: str = "auto",
) -> None:
    """In place: target ← target + (1 − momentum)·(source − target), for every parameter pair.

    ``target`` and ``source`` are two nn.Modules (their parameters, in order; buffers are left alone,
    as in MoCo) or two matching sequences of tensors. Everything is checked before anything is
    written, and each (device, dtype) group is updated by one fused call. The default arithmetic is
    one pass (a lerp, one rounding in half precision); ``exact=True`` reproduces the official
    ``target·m + source·(1 − m)`` bit for bit (two roundings; only the "torch" and "reference" backends).
    """
    momentum = check_momentum(momentum)
    plan = momentum_plan(as_tensor_list(target, "target"), as_tensor_list(source, "source"), backend, bool(exact))
    run_momentum_plan(plan, momentum, bool(exact))
