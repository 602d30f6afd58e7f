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

from . import backends
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
    ct = compute_dtype(q, keys)
    rows = q.shape[0]
    return (
        q.new_empty((rows,), dtype=ct),
        q.new_empty((rows,), dtype=ct),
        q.new_empty((rows, q.shape[1]), dtype=ct),
        q.new_empty((rows,), dtype=torch.int64),
    )


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
