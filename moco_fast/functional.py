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
    check_view_list,
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


# ------------------------------------------------------------------------------------------------
# --- BYOL / SwAV / DINO: the DINO loss without the (rows, P) logits
# ------------------------------------------------------------------------------------------------


def check_dino_inputs(student, teacher, prototypes, center, teacher_prototypes) -> tuple[list, list, Tensor, Tensor]:
    """Validate dino_loss's arguments; returns (student list, teacher list, teacher_prototypes, center (P,))."""
    student = check_view_list(student, "student")
    teacher = check_view_list(teacher, "teacher")
    first = student[0]
    for name, views in (("student", student), ("teacher", teacher)):
        for i, v in enumerate(views):
            if v.shape != first.shape:
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(v.shape)} but student[0] has {tuple(first.shape)}: every view "
                    "is the same batch of (B, b) bottleneck features"
                )
    dim = first.shape[1]
    check_matrix(prototypes, "prototypes")
    if prototypes.shape[1] != dim:
        raise ValueError(
            f"prototypes have dim {prototypes.shape[1]} but the features have dim {dim} (prototypes: (P, b))"
        )
    check_nonempty(prototypes, "prototypes")
    num_prototypes = prototypes.shape[0]
    if teacher_prototypes is None:
        teacher_prototypes = prototypes.detach()
    else:
        check_matrix(teacher_prototypes, "teacher_prototypes")
        check_same_shape(teacher_prototypes, "teacher_prototypes", prototypes, "prototypes")
    if not isinstance(center, Tensor) or not center.is_floating_point():
        raise TypeError(f"center must be a floating tensor of shape (P,), got {type(center).__name__}")
    if tuple(center.shape) not in ((num_prototypes,), (1, 1, num_prototypes)):
        raise ValueError(
            f"center must have shape ({num_prototypes},) (P) or (1, 1, {num_prototypes}), got {tuple(center.shape)}"
        )
    if len(student) * len(teacher) - min(len(student), len(teacher)) == 0:
        raise ValueError(
            f"the DINO loss needs a pair of different views: {len(teacher)} teacher and {len(student)} student view(s) "
            "leave none (teacher view u and student view u are the same view)"
        )
    named = [(f"student[{i}]", v) for i, v in enumerate(student)] + [
        (f"teacher[{i}]", v) for i, v in enumerate(teacher)
    ]
    named += [("prototypes", prototypes), ("teacher_prototypes", teacher_prototypes), ("center", center)]
    check_same_device(*named)
    return student, teacher, teacher_prototypes, center.reshape(num_prototypes)


def dino_loss(
    student: Sequence[Tensor],
    teacher: Sequence[Tensor],
    prototypes: Tensor,
    center: Tensor,
    *,
    teacher_prototypes: Tensor | None = None,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
    backend: str = "auto",
) -> Tensor:
    """DINO's cross-entropy from the bottleneck features and the last layer, never forming (B, P) logits.

    With s = h_s·Wᵀ (student logits) and t = h_t·W_tᵀ (teacher logits), the loss is lightly's / DINO's
    mean over (teacher view u, student view v ≠ u) and batch rows of −Σ_k softmax((t − c)/T_t)_k ·
    log_softmax(s/T_s)_k — computed from two softmax-weighted sweeps over the P prototypes and a blockwise
    recomputation for the prototypes' gradient (docs/design.md, "Op contracts"). Extra memory
    O((B·views)·b) plus a bounded tile, whatever P is.

    Args:
        student: list of (B, b) student bottleneck features, one per crop (global crops first; the DINO
            head's L2-normalized bottleneck, :meth:`moco_fast.DINOHead.bottleneck`). Gradient flows to them.
        teacher: list of (B, b) teacher features of the global crops (teacher view u = student view u).
            No gradient.
        prototypes: (P, b) the student's last layer as it multiplies the features: for DINO's
            weight-normalized layer, the effective weight g·V/‖V‖ (:attr:`moco_fast.DINOHead.prototypes`).
            Gradient flows to it.
        center: (P,) (or lightly's (1, 1, P)) the teacher center, subtracted from the teacher logits. Not updated
            here (see :meth:`moco_fast.DINOLoss.forward_fused`). No gradient.
        teacher_prototypes: (P, b) the teacher's last layer (the momentum copy); None: ``prototypes``, detached.
            No gradient.
        student_temp, teacher_temp: T_s, T_t > 0.
        backend: "auto" | "triton" | "torch" | "reference".

    Returns the fp32 scalar loss (fp64 for fp64 inputs).
    """
    student, teacher, teacher_prototypes, center = check_dino_inputs(
        student, teacher, prototypes, center, teacher_prototypes
    )
    s_temp = check_temperature(student_temp, "student_temp")
    t_temp = check_temperature(teacher_temp, "teacher_temp")
    dtypes = {v.dtype for v in student + teacher} | {prototypes.dtype, teacher_prototypes.dtype}
    impl = backends.select("dino_loss", backend, prototypes.device, tuple(sorted(dtypes, key=str)), prototypes.shape[1])
    ct = torch.float64 if torch.float64 in dtypes else torch.float32
    h_s = torch.cat(student) if len(student) > 1 else student[0]
    h_t = (torch.cat(teacher) if len(teacher) > 1 else teacher[0]).detach()
    loss, *_ = ops.dino_loss_forward(
        h_s,
        h_t,
        prototypes,
        teacher_prototypes.detach(),
        center.detach().to(ct, copy=True),  # a copy: the caller may update its center before the backward
        len(student),
        len(teacher),
        1.0 / s_temp,
        1.0 / t_temp,
        impl,
    )
    return loss
