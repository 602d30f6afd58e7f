"""torch.library registration of the fused ops, and their autograd.

Each op is one custom op whose string argument ``impl`` names the concrete backend that runs it
(chosen by :func:`moco_fast.backends.select` before the call), so torch.compile and opcheck see one
op whatever runs inside, and every backend — the "reference" too — goes through the same autograd.

InfoNCE: ``moco_fast::info_nce_forward`` returns (loss, lse, delta, rank) per row (delta = O − k); its
backward is ``moco_fast::info_nce_backward`` (dq, dk from the saved loss and delta: O(B·d), the
negatives are never read again) and, only when the negatives require grad,
``moco_fast::info_nce_backward_negatives`` (from the saved lse).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends, dino_pairs
from .validation import compute_dtype


@torch.library.custom_op("moco_fast::info_nce_forward", mutates_args=())
def info_nce_forward(
    q: Tensor, k: Tensor, negatives: Tensor, scale: float, impl: str, need_rank: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss (B,), lse (B,), delta = O − k (B, d) and rank (B,) int64 of InfoNCE; see moco_fast.backends.

    With ``need_rank=False`` a backend may skip the rank and return -1s.
    """
    module = backends.module(impl)
    return module.infonce_forward(q.contiguous(), k.contiguous(), negatives.contiguous(), scale, need_rank=need_rank)


def _fake_row_outputs(q: Tensor, ct: torch.dtype):
    """Meta outputs of a forward with one (loss, lse, row vector, rank) per query row."""
    rows = q.shape[0]
    new = q.new_empty
    return (
        new((rows,), dtype=ct),
        new((rows,), dtype=ct),
        new((rows, q.shape[1]), dtype=ct),
        new((rows,), dtype=torch.int64),
    )


@info_nce_forward.register_fake
def _(q, k, negatives, scale, impl, need_rank=True):
    return _fake_row_outputs(q, compute_dtype(q, k, negatives))


@torch.library.custom_op("moco_fast::info_nce_backward", mutates_args=())
def info_nce_backward(
    grad: Tensor, q: Tensor, k: Tensor, loss: Tensor, delta: Tensor, scale: float, impl: str
) -> tuple[Tensor, Tensor]:
    """(dq, dk) from the saved per-row loss and delta: dq = g/T·delta, dk = g/T·expm1(−loss)·q."""
    module = backends.module(impl)
    return module.infonce_backward(grad.contiguous(), q.contiguous(), k.contiguous(), loss, delta, scale)


@info_nce_backward.register_fake
def _(grad, q, k, loss, delta, scale, impl):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("moco_fast::info_nce_backward_negatives", mutates_args=())
def info_nce_backward_negatives(
    grad: Tensor, q: Tensor, negatives: Tensor, lse: Tensor, scale: float, impl: str
) -> Tensor:
    """dn (K, d): recomputes the logits blockwise; only runs when the negatives require grad."""
    module = backends.module(impl)
    return module.infonce_backward_negatives(grad.contiguous(), q.contiguous(), negatives.contiguous(), lse, scale)


@info_nce_backward_negatives.register_fake
def _(grad, q, negatives, lse, scale, impl):
    return torch.empty_like(negatives)


def _setup_context(ctx, inputs, output):
    q, k, negatives, scale, impl, _ = inputs
    loss, lse, delta, rank = output
    ctx.scale, ctx.impl = scale, impl
    ctx.negatives_need_grad = negatives.requires_grad
    # The negatives (and lse) are saved only when they need a gradient: the fast path never reads them
    # again, so the queue may be overwritten right after the forward. The loss is returned to the caller,
    # who may scale it in place (reduction="none"): the backward keeps its own copy (B floats).
    need = negatives.requires_grad
    ctx.save_for_backward(q, k, loss.detach().clone(), delta, lse if need else None, negatives if need else None)
    ctx.mark_non_differentiable(lse, delta, rank)


def _backward(ctx, grad_loss, grad_lse, grad_delta, grad_rank):
    q, k, loss, delta, lse, negatives = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(loss)
    dq, dk = info_nce_backward(grad_loss, q, k, loss, delta, ctx.scale, ctx.impl)
    dn = None
    if ctx.negatives_need_grad:
        dn = info_nce_backward_negatives(grad_loss, q, negatives, lse, ctx.scale, ctx.impl)
    return dq, dk, dn, None, None, None


info_nce_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# --- NT-Xent / MoCo v3 / CMC / memory bank: the contrastive cross-entropy core
#
# ``moco_fast::contrast_forward`` returns (loss, lse, dloss_dq, rank) per query row. dloss_dq is the
# whole gradient of the queries (dq = g·dloss_dq), so the keys are never read by the backward unless
# they require grad (a memory bank may be updated right after the forward); then
# ``moco_fast::contrast_backward_keys`` recomputes the softmax blockwise from lse. When the same
# tensor is both q and keys (NT-Xent), autograd sums the two gradients.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("moco_fast::contrast_forward", mutates_args=())
def contrast_forward(
    q: Tensor, keys: Tensor, target: Tensor, exclude: Tensor | None, scale: float, impl: str, need_rank: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss (M,), lse (M,), dloss_dq (M, d) and rank (M,) int64; see moco_fast.backends."""
    module = backends.module(impl)
    exclude = None if exclude is None else exclude.contiguous()
    return module.contrast_forward(
        q.contiguous(), keys.contiguous(), target.contiguous(), exclude, scale, need_rank=need_rank
    )


@contrast_forward.register_fake
def _(q, keys, target, exclude, scale, impl, need_rank=True):
    return _fake_row_outputs(q, compute_dtype(q, keys))


@torch.library.custom_op("moco_fast::contrast_backward_keys", mutates_args=())
def contrast_backward_keys(
    grad: Tensor, q: Tensor, keys: Tensor, target: Tensor, exclude: Tensor | None, lse: Tensor, scale: float, impl: str
) -> Tensor:
    """dkeys (N, d) = s·Σ_i g_i (P_ij − [j = t_i]) q_i, recomputing P blockwise from lse."""
    module = backends.module(impl)
    exclude = None if exclude is None else exclude.contiguous()
    return module.contrast_backward_keys(
        grad.contiguous(), q.contiguous(), keys.contiguous(), target.contiguous(), exclude, lse.contiguous(), scale
    )


@contrast_backward_keys.register_fake
def _(grad, q, keys, target, exclude, lse, scale, impl):
    return torch.empty_like(keys)


def _contrast_setup_context(ctx, inputs, output):
    q, keys, target, exclude, scale, impl, _ = inputs
    _, lse, dloss_dq, rank = output
    ctx.scale, ctx.impl = scale, impl
    ctx.q_needs_grad, ctx.keys_need_grad, ctx.q_dtype = q.requires_grad, keys.requires_grad, q.dtype
    # The keys (and q) are saved only for the column pass: a stop-gradient key set is never read again.
    saved = (q, keys, target, exclude) if keys.requires_grad else (None, None, None, None)
    ctx.save_for_backward(lse, dloss_dq, *saved)
    ctx.mark_non_differentiable(lse, dloss_dq, rank)


def _contrast_backward(ctx, grad_loss, grad_lse, grad_dloss_dq, grad_rank):
    lse, dloss_dq, q, keys, target, exclude = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dq = dkeys = None
    if ctx.q_needs_grad:
        dq = (grad_loss.to(dloss_dq.dtype)[:, None] * dloss_dq).to(ctx.q_dtype)
    if ctx.keys_need_grad:
        dkeys = contrast_backward_keys(grad_loss, q, keys, target, exclude, lse, ctx.scale, ctx.impl)
    return dq, dkeys, None, None, None, None, None


contrast_forward.register_autograd(_contrast_backward, setup_context=_contrast_setup_context)
# --- BYOL / SwAV / DINO: the DINO loss without the (rows, P) logits
# ------------------------------------------------------------------------------------------------
# student (S·B, b) and teacher (T·B, b) are the views stacked view-major (moco_fast/dino_pairs.py). With
# u_t = Σ_k P_t(k)·W_k and the student's lse_s, O_s = Σ_k P_s(k)·W_k (two backend passes), in O(rows·b):
#   loss  = (Σ_v n_v Σ_i lse_s[v,i] − Σ_u Σ_i u[u,i]·(H[i] − [u<S]·h[u,i]) / T_s) / (pairs·B),  H = Σ_v h[v]
#   dh[v] = (n_v·O_s[v] − (U − [v<T]·u[v])) / (T_s·pairs·B),                                    U = Σ_u u[u]
#   dW    = (Σ_v n_v·P_s[v]ᵀ h[v] + Σ_u P_t[u]ᵀ ([u<S]·h[u] − H)) / (T_s·pairs·B)   (backend, blockwise over P)


def _dino_views(student: Tensor, num_views: int, num_teacher_views: int, dtype: torch.dtype):
    h = student.to(dtype).view(num_views, -1, student.shape[1])
    counts, pairs = dino_pairs.partners(num_views, num_teacher_views)
    return h, torch.tensor(counts, dtype=dtype, device=student.device), pairs


@torch.library.custom_op("moco_fast::dino_loss_forward", mutates_args=())
def dino_loss_forward(
    student: Tensor,
    teacher: Tensor,
    prototypes: Tensor,
    teacher_prototypes: Tensor,
    center: Tensor,
    num_views: int,
    num_teacher_views: int,
    student_scale: float,
    teacher_scale: float,
    impl: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss 0-dim, lse_s (S·B,), O_s (S·B, b), lse_t (T·B,), u_t (T·B, b)); see the block comment above."""
    module = backends.module(impl)
    student, teacher = student.contiguous(), teacher.contiguous()
    prototypes, teacher_prototypes = prototypes.contiguous(), teacher_prototypes.contiguous()
    lse_t, u = module.dino_softmax_pass(teacher, teacher_prototypes, prototypes, center.contiguous(), teacher_scale)
    lse_s, out_s = module.dino_softmax_pass(student, prototypes, prototypes, None, student_scale)
    h, n_v, pairs = _dino_views(student, num_views, num_teacher_views, lse_s.dtype)
    rows = h.shape[1]
    lse_term = (n_v[:, None] * lse_s.view(num_views, rows)).sum()
    total = h.sum(dim=0)
    uv = u.view(num_teacher_views, rows, -1)
    cross = sum((uv[t] * (total - h[t] if t < num_views else total)).sum() for t in range(num_teacher_views))
    loss = (lse_term - student_scale * cross) / (pairs * rows)
    return loss, lse_s, out_s, lse_t, u


@dino_loss_forward.register_fake
def _(student, teacher, prototypes, teacher_prototypes, center, num_views, num_teacher_views, s_scale, t_scale, impl):
    ct = compute_dtype(student, teacher, prototypes, teacher_prototypes)
    rs, rt, d = student.shape[0], teacher.shape[0], student.shape[1]
    new = student.new_empty
    return new((), dtype=ct), new((rs,), dtype=ct), new((rs, d), dtype=ct), new((rt,), dtype=ct), new((rt, d), dtype=ct)


@torch.library.custom_op("moco_fast::dino_prototype_grad", mutates_args=())
def dino_prototype_grad(
    student: Tensor,
    teacher: Tensor,
    prototypes: Tensor,
    teacher_prototypes: Tensor,
    center: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    num_views: int,
    num_teacher_views: int,
    student_scale: float,
    teacher_scale: float,
    grad_scale: float,
    impl: str,
) -> Tensor:
    """dW (P, b) = grad_scale·(Σ_v n_v·P_s[v]ᵀ h[v] + Σ_u P_t[u]ᵀ([u<S]·h[u] − H)), recomputed blockwise over P."""
    c = Tensor.contiguous
    return backends.module(impl).dino_prototype_grad(
        c(student), c(teacher), c(prototypes), c(teacher_prototypes), c(center), c(lse_s), c(lse_t),
        num_views, num_teacher_views, student_scale, teacher_scale, grad_scale,
    )  # fmt: skip


@dino_prototype_grad.register_fake
def _(student, teacher, prototypes, teacher_prototypes, center, lse_s, lse_t, S, T, s_scale, t_scale, g_scale, impl):
    return torch.empty_like(prototypes)


def _dino_setup_context(ctx, inputs, output):
    student, teacher, prototypes, teacher_prototypes, center, num_views, num_teacher_views, s_scale, t_scale, impl = (
        inputs
    )
    _, lse_s, out_s, lse_t, u = output
    ctx.num_views, ctx.num_teacher_views = num_views, num_teacher_views
    ctx.s_scale, ctx.t_scale, ctx.impl = s_scale, t_scale, impl
    ctx.save_for_backward(student, teacher, prototypes, teacher_prototypes, center, lse_s, out_s, lse_t, u)
    ctx.mark_non_differentiable(lse_s, out_s, lse_t, u)


def _dino_backward(ctx, grad_loss, grad_lse_s, grad_out_s, grad_lse_t, grad_u):
    student, teacher, prototypes, teacher_prototypes, center, lse_s, out_s, lse_t, u = ctx.saved_tensors
    S, T, s_scale = ctx.num_views, ctx.num_teacher_views, ctx.s_scale
    ct = lse_s.dtype
    g = torch.zeros((), dtype=ct, device=lse_s.device) if grad_loss is None else grad_loss.to(ct)
    rows = student.shape[0] // S
    _, pairs = dino_pairs.partners(S, T)
    coef = s_scale / (pairs * rows)  # a Python float: no host read of g (it multiplies tensors below)
    d_student = d_prototypes = None
    if ctx.needs_input_grad[0]:
        _, n_v, _ = _dino_views(student[:0], S, T, ct)
        uv = u.view(T, rows, -1)
        partners = uv.sum(dim=0).expand(S, rows, -1).clone()  # Σ_{u≠v} u_t[u]: every teacher view minus its own
        partners[: min(S, T)] -= uv[: min(S, T)]
        d = n_v[:, None, None] * out_s.view(S, rows, -1) - partners
        d_student = (d.reshape(student.shape) * (g * coef)).to(student.dtype)
    if ctx.needs_input_grad[2]:
        d_prototypes = dino_prototype_grad(
            student, teacher, prototypes, teacher_prototypes, center, lse_s, lse_t, S, T, s_scale, ctx.t_scale, coef,
            ctx.impl,
        )  # fmt: skip
        d_prototypes = d_prototypes.mul_(g.to(d_prototypes.dtype))
    return d_student, None, d_prototypes, None, None, None, None, None, None, None


dino_loss_forward.register_autograd(_dino_backward, setup_context=_dino_setup_context)
