"""torch.library registration of the fused ops, and their autograd.

Each op is one custom op whose string argument ``impl`` names the concrete backend that runs it
(chosen by :func:`moco_fast.backends.select` before the call), so torch.compile and opcheck see one
op whatever runs inside, and every backend — the "reference" too — goes through the same autograd.

InfoNCE: ``moco_fast::info_nce_forward`` returns (loss, lse, out, rank) per row; its backward is
``moco_fast::info_nce_backward`` (dq, dk from the saved lse and out: O(B·d), the negatives are never
read again) and, only when the negatives require grad, ``moco_fast::info_nce_backward_negatives``.
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
    """Per-row loss (B,), lse (B,), O (B, d) and rank (B,) int64 of InfoNCE; see moco_fast.backends.

    With ``need_rank=False`` a backend may skip the rank and return -1s.
    """
    module = backends.module(impl)
    return module.infonce_forward(q.contiguous(), k.contiguous(), negatives.contiguous(), scale, need_rank=need_rank)


@info_nce_forward.register_fake
def _(q, k, negatives, scale, impl, need_rank=True):
    ct = compute_dtype(q, k, negatives)
    rows = q.shape[0]
    return (
        q.new_empty((rows,), dtype=ct),
        q.new_empty((rows,), dtype=ct),
        q.new_empty((rows, q.shape[1]), dtype=ct),
        q.new_empty((rows,), dtype=torch.int64),
    )


@torch.library.custom_op("moco_fast::info_nce_backward", mutates_args=())
def info_nce_backward(
    grad: Tensor, q: Tensor, k: Tensor, lse: Tensor, out: Tensor, scale: float, impl: str
) -> tuple[Tensor, Tensor]:
    """(dq, dk) from the saved lse and O: dq = g/T·(O − k), dk = g/T·(p0 − 1)·q."""
    module = backends.module(impl)
    return module.infonce_backward(grad.contiguous(), q.contiguous(), k.contiguous(), lse, out, scale)


@info_nce_backward.register_fake
def _(grad, q, k, lse, out, scale, impl):
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
    _, lse, out, rank = output
    ctx.scale, ctx.impl = scale, impl
    ctx.negatives_need_grad = negatives.requires_grad
    # The negatives are saved only when they need a gradient: the fast path never reads them again,
    # so the queue may be overwritten right after the forward.
    ctx.save_for_backward(q, k, lse, out, negatives if negatives.requires_grad else None)
    ctx.mark_non_differentiable(lse, out, rank)


def _backward(ctx, grad_loss, grad_lse, grad_out, grad_rank):
    q, k, lse, out, negatives = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dq, dk = info_nce_backward(grad_loss, q, k, lse, out, ctx.scale, ctx.impl)
    dn = None
    if ctx.negatives_need_grad:
        dn = info_nce_backward_negatives(grad_loss, q, negatives, lse, ctx.scale, ctx.impl)
    return dq, dk, dn, None, None, None


info_nce_forward.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
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
