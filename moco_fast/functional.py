"""The public functional API: validate, pick the backend, run the op.

Nothing here knows a backend's internals: :func:`moco_fast.backends.select` names the backend from
its declared support, and the op (``moco_fast.ops``) or the backend's contract function runs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, ops
from .distributed import all_gather_with_grad, concat_all_gather, rank_and_world
from .validation import (
    as_tensor_list,
    check_indices,
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


def nonfinite_rows(loss: Tensor, rows: Tensor) -> Tensor:
    """``loss`` (B,) with NaN where row i of ``rows`` (B, d) — the forward's delta / dloss_dq — is not finite.

    A key with a NaN/Inf component whose logit is −inf (the sign of q's component) has probability 0: the
    loss would be finite while delta = Σ p_j·(n_j − k) holds 0·inf = NaN. This makes such a poisoned input
    show in the loss itself (on the device, O(B·d), no sync); the loss's gradient is unchanged.
    """
    return nan_unless(torch.isfinite(rows).all(dim=1), loss)


def nan_unless(ok: Tensor, loss: Tensor) -> Tensor:
    """``loss`` where ``ok`` (a bool tensor broadcasting to it), NaN elsewhere: on the device, no sync."""
    return torch.where(ok, loss, torch.full_like(loss, float("nan")))


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
    loss, lse, delta, rank = ops.info_nce_forward(q, k, negatives, 1.0 / temperature, impl, return_stats)
    loss = reduce(nonfinite_rows(loss, delta), reduction)
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
# --- NT-Xent / MoCo v3 / CMC / memory bank: one fused core, the contrastive cross-entropy
# ------------------------------------------------------------------------------------------------


def contrast(
    q: Tensor, keys: Tensor, target: Tensor, exclude: Tensor | None, temperature: float, backend: str, need_rank: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The core op on validated inputs: (per-row loss, lse, rank). Callers build target/exclude themselves."""
    impl = backends.select("contrast", backend, q.device, (q.dtype, keys.dtype), q.shape[1])
    loss, lse, dloss_dq, rank = ops.contrast_forward(q, keys, target, exclude, 1.0 / temperature, impl, need_rank)
    return nonfinite_rows(loss, dloss_dq), lse, rank


def _finish(loss: Tensor, lse: Tensor, rank: Tensor, reduction: str, return_stats: bool):
    loss = reduce(loss, reduction)
    return (loss, stats_from_rank(rank, lse)) if return_stats else loss


def contrastive_cross_entropy(
    q: Tensor,
    keys: Tensor,
    target: Tensor,
    temperature: float = 0.1,
    *,
    exclude: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
):
    """Cross-entropy of each query against a shared key set, without materializing the logits.

    Row i's logits are q_i·k_j / temperature over every key j except ``exclude[i]``; its target is
    column ``target[i]``: loss_i = logsumexp_{j ≠ exclude_i}(q_i·k_j/T) − q_i·k_{target_i}/T. Inputs
    are used as given (normalize them first). Gradients flow to q and to keys (when they require grad).
    NT-Xent, MoCo v3, CMC and the memory bank's exact softmax are this op with particular key sets.

    Args:
        q: (M, d) queries, fp32/bf16/fp16 (fp64 on the "torch"/"reference" backends).
        keys: (N, d) keys, any of those dtypes. Unless they require grad they are not read by the
            backward, so they may be overwritten after the call (a memory bank update).
        target: (M,) int64 column of each row's positive, in [0, N).
        exclude: optional (M,) int64 column removed from each row's softmax, in [-1, N) (-1: none),
            never equal to the target.
        temperature, reduction, backend, return_stats: as :func:`info_nce` (stats: rank_i = keys other
            than the target, not excluded, whose logit beats the target's).
    """
    check_matrix(q, "q")
    check_matrix(keys, "keys")
    check_nonempty(q, "q")
    check_nonempty(keys, "keys")
    if keys.shape[1] != q.shape[1]:
        raise ValueError(f"keys have dim {keys.shape[1]} but q has dim {q.shape[1]}")
    check_same_device(("q", q), ("keys", keys))
    target = check_indices(target, "target", keys.shape[0], q, "q")
    if exclude is not None:
        exclude = check_indices(exclude, "exclude", keys.shape[0], q, "q", lower=-1)
        if bool((exclude == target).any()):
            raise ValueError("exclude must differ from target in every row (a row cannot exclude its positive)")
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    loss, lse, rank = contrast(q, keys, target, exclude, temperature, backend, return_stats)
    return _finish(loss, lse, rank, reduction, return_stats)


def nt_xent(
    z0: Tensor,
    z1: Tensor,
    temperature: float = 0.5,
    *,
    reduction: str = "mean",
    gather_distributed: bool = False,
    backend: str = "auto",
    return_stats: bool = False,
):
    """SimCLR's NT-Xent over the 2N rows z = [z0; z1], without the (2N)² logits.

    Row a's logits are z_a·z_b/T over every b ≠ a; its positive is the other view of the same sample
    (a ± N); loss_a = lse_{b≠a} − z_a·z_pos(a)/T, and the result reduces over the 2N rows. Inputs are
    used as given (normalize first; :class:`moco_fast.NTXentLoss` does). Gradients flow to both views.
    Extra memory O(N·d) whatever N is.

    With ``gather_distributed`` under torch.distributed, each rank's 2N rows are contrasted against the
    rows of every rank (its own included) and the gather carries the gradients back to each row's rank
    (summed over ranks), so DDP trains exactly like one process on the global batch. Ranks pass equal N.

    Args:
        z0, z1: (N, d) the two views' embeddings, fp32/bf16/fp16 (fp64 on "torch"/"reference"); a mix of
            dtypes computes in their promotion.
        reduction: "mean" | "sum" | "none" ((2N,) per-row losses, z0's rows first).
        return_stats: also return :class:`InfoNCEStats` over the 2N rows (rank among the 2N·world − 2 negatives).
    """
    check_matrix(z0, "z0")
    check_matrix(z1, "z1")
    if z1.shape != z0.shape:
        raise ValueError(
            f"z0 and z1 must have the same shape (one row per sample and view), got {tuple(z0.shape)} and "
            f"{tuple(z1.shape)}"
        )
    check_same_device(("z0", z0), ("z1", z1))
    if z0.shape[0] == 0:
        raise ValueError("nt_xent needs at least 2 rows in total (z0 and z1 have 0 rows)")
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    dtype = torch.promote_types(z0.dtype, z1.dtype)
    z = torch.cat([z0.to(dtype), z1.to(dtype)])
    rows = z.shape[0]
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    keys = all_gather_with_grad(z) if world > 1 else z  # rank r's rows are [r·2N, (r+1)·2N)
    local = torch.arange(rows, device=z.device)
    offset = rank * rows
    target = offset + (local + rows // 2) % rows
    loss, lse, rank_ = contrast(z, keys, target, offset + local, temperature, backend, return_stats)
    return _finish(loss, lse, rank_, reduction, return_stats)


def mocov3_loss(
    q: Tensor,
    k: Tensor,
    temperature: float = 0.2,
    *,
    gather_distributed: bool = True,
    backend: str = "auto",
    return_stats: bool = False,
):
    """MoCo v3's ``contrastive_loss`` (Chen, Xie & He 2021), fused: the B×(B·world) logits never exist.

    q and k are L2-normalized here; logits q·all_gather(k)ᵀ/T with labels arange(B) + B·rank;
    cross-entropy (mean) × 2T. k carries no gradient (the momentum encoder's output). The paper's
    symmetric loss is ``mocov3_loss(q1, k2) + mocov3_loss(q2, k1)``.
    """
    check_matrix(q, "q")
    check_matrix(k, "k")
    check_nonempty(q, "q")
    check_same_shape(k, "k", q, "q")
    check_same_device(("q", q), ("k", k))
    temperature = check_temperature(temperature)
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    keys = concat_all_gather(k) if world > 1 else k
    target = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank
    loss, lse, rank_ = contrast(q, keys, target, None, temperature, backend, return_stats)
    loss = loss.mean() * (2.0 * temperature)
    return (loss, stats_from_rank(rank_, lse)) if return_stats else loss


def cmc_pairs(num_views: int) -> list[tuple[int, int]]:
    """The ordered view pairs (anchor view i, key view j), i ≠ j, in the order :func:`cmc_loss` reports them."""
    return [(i, j) for i in range(num_views) for j in range(num_views) if i != j]


def cmc_loss(
    views: Sequence[Tensor],
    temperature: float = 0.07,
    *,
    reduction: str = "mean",
    gather_distributed: bool = False,
    backend: str = "auto",
):
    """CMC's "full graph" objective (Tian, Krishnan & Isola 2019, §3.2) over V ≥ 2 views, fused.

    For every ordered pair of views (i, j), i ≠ j, and every sample a: anchor v_i[a], positive v_j[a],
    negatives the other samples of view j:
        ℓ_ij(a) = logsumexp_b(v_i[a]·v_j[b]/T) − v_i[a]·v_j[a]/T.
    CMC's L_full = Σ_{i<j} (L^{V_i,V_j} + L^{V_j,V_i}) with L^{V_i,V_j} = mean_a ℓ_ij(a) (in-batch
    negatives here, where CMC used a memory bank with NCE) equals V·(V−1)·(the "mean" result).
    One fused call per key view j (queries: every other view), so no B×B logits are materialized;
    gradients flow to every view. Inputs used as given (normalize first).

    Args:
        views: a sequence of V tensors (B, d), one per view, rows aligned by sample.
        reduction: "mean" over the V(V−1)B terms | "sum" | "none": (V(V−1), B) in :func:`cmc_pairs` order.
        gather_distributed: keys from every rank (with gradient back to the owner), labels offset by rank.
    """
    if isinstance(views, Tensor) or not isinstance(views, Sequence):
        raise TypeError(f"views must be a sequence of (B, d) tensors, got {type(views).__name__}")
    views = list(views)
    if len(views) < 2:
        raise ValueError(f"views must hold at least 2 views, got {len(views)}")
    for i, v in enumerate(views):
        check_matrix(v, f"views[{i}]")
        check_same_shape(v, f"views[{i}]", views[0], "views[0]")
        check_same_device(("views[0]", views[0]), (f"views[{i}]", v))
    check_nonempty(views[0], "views[0]")
    temperature = check_temperature(temperature)
    check_reduction(reduction)
    num, batch = len(views), views[0].shape[0]
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in views))
    views = [v.to(dtype) for v in views]
    rank, world = rank_and_world() if gather_distributed else (0, 1)
    target = (torch.arange(batch, device=views[0].device) + batch * rank).repeat(num - 1)
    per_pair: dict[tuple[int, int], Tensor] = {}
    for j in range(num):
        keys = all_gather_with_grad(views[j]) if world > 1 else views[j]
        anchors = [i for i in range(num) if i != j]
        loss, _, _ = contrast(torch.cat([views[i] for i in anchors]), keys, target, None, temperature, backend, False)
        for i, row in zip(anchors, loss.view(num - 1, batch)):
            per_pair[(i, j)] = row
    losses = torch.stack([per_pair[p] for p in cmc_pairs(num)])
    return reduce(losses, reduction)


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
    separate_teacher = teacher_prototypes is not None
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
    # The teacher's prototypes and the center enter only the teacher logits: a +inf center entry (or a W_t
    # row whose logit is −inf) gives that prototype probability 0 and a finite loss. Show it (no sync).
    ok = torch.isfinite(center).all()
    if separate_teacher:
        ok = ok & torch.isfinite(teacher_prototypes).all()
    return nan_unless(ok, loss)
