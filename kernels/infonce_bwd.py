"""InfoNCE backward.

infonce_bwd_qk_kernel -- the usual case (the negatives are a stop-gradient queue). Because the
forward saved loss and delta = O - k = sum_j softmax_ij (n_j - k_i), the gradients are O(B*d)
elementwise and read neither k nor the negatives:
    dq_i = g_i * scale * delta_i                                  (B, d) in q.dtype
    dk_i = g_i * scale * (p0_i - 1) * q_i,  p0_i - 1 = expm1(-loss_i)   (B, d) in k.dtype
    grad (B,) fp32, q (B, d) fp32|bf16|fp16, loss (B,) fp32, delta (B, d) fp32.
expm1 keeps dk exact when the loss is tiny (and exactly 0 when K = 0: loss = 0).
One program per BLOCK_M rows; one launch for both outputs.

infonce_bwd_negatives_kernel -- only when the negatives require grad:
    dn_j = scale * sum_i g_i * softmax_ij * q_i             (K, d) in n.dtype
Column-parallel and deterministic (no atomics): each program owns BLOCK_N negatives, recomputes
their logits against every BLOCK_M-row tile of q (transposed, s^T = n @ q^T, so that
dn += p^T-tile @ (g*scale*q) needs no register transpose) and accumulates in fp32 in a fixed order.
Dot dtype rules are the forward's (see infonce_fwd.py).

Launchers: ``infonce_backward`` (dq, dk) and ``infonce_backward_negatives`` (dn).
"""

import functools

import torch
import triton
import triton.language as tl

from moco_fast import numerics

from . import heuristics as H
from . import runtime as R
from .infonce_fwd import _dot
from .runtime import LOG2E, expm1


@triton.jit
def infonce_bwd_qk_kernel(
    g_ptr, q_ptr, loss_ptr, delta_ptr, dq_ptr, dk_ptr, B, d, scale, BLOCK_M: tl.constexpr, D_PAD: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < d)[None, :]
    off = rows.to(tl.int64)[:, None] * d + cols[None, :]

    gs = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * scale
    loss = tl.load(loss_ptr + rows, mask=row_ok, other=0.0)
    q = tl.load(q_ptr + off, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + off, mask=mask, other=0.0)
    dq = gs[:, None] * delta
    dk = (gs * expm1(-loss))[:, None] * q
    tl.store(dq_ptr + off, dq.to(dq_ptr.dtype.element_ty), mask=mask)
    tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=mask)


@triton.jit
def infonce_bwd_negatives_kernel(
    g_ptr,
    q_ptr,
    n_ptr,
    lse_ptr,
    dn_ptr,
    B,
    K,
    d,
    scale,
    qk_scale,  # scale and scale*log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    keys = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < d
    n_mask = (keys < K)[:, None] & col_ok[None, :]
    n_off = keys.to(tl.int64)[:, None] * d + cols[None, :]
    nt = tl.load(n_ptr + n_off, mask=n_mask, other=0.0)

    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    r = tl.arange(0, BLOCK_M)
    q_ptrs = q_ptr + r[:, None] * d + cols[None, :]
    for i in range(0, B, BLOCK_M):
        row_ok = (i + r) < B
        if EVEN_D:
            qt = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
        else:
            qt = tl.load(q_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        # Padded rows: q = 0 and g = 0 zero their contribution whatever their lse.
        gs = tl.load(g_ptr + i + r, mask=row_ok, other=0.0) * scale
        lse2 = tl.load(lse_ptr + i + r, mask=row_ok, other=0.0) * LOG2E
        st = _dot(nt, tl.trans(qt), DOT_DTYPE, PRECISION, EMULATE)  # (BLOCK_N, BLOCK_M) fp32
        pt = tl.exp2(st * qk_scale - lse2[None, :])  # softmax_ij^T, in [0, 1]: safe to round to half
        # g_i*scale goes on the q side: p stays a probability even for fp16 dots.
        acc += _dot(pt, qt.to(tl.float32) * gs[:, None], DOT_DTYPE, PRECISION, EMULATE)
        q_ptrs += BLOCK_M * d
    tl.store(dn_ptr + n_off, acc.to(dn_ptr.dtype.element_ty), mask=n_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def infonce_backward(grad, q, k, loss, delta, scale):
    """(dq in q.dtype, dk in k.dtype), both (B, d), from grad (B,) (any float dtype, any stride),
    q, k (B, d) and the forward's loss (B,) fp32 and delta (B, d) fp32; scale = 1/temperature.
    (k gives dk's dtype and shape; its values are not read.)"""
    B, d = q.shape
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    if B == 0:
        return dq, dk
    grad = grad.to(torch.float32).contiguous()
    dp = H.d_pad(d)
    bm = H.bwd_qk_block_m(dp)
    with R.device_guard(q.device):
        infonce_bwd_qk_kernel[(H.cdiv(B, bm),)](
            grad,
            q,
            loss.contiguous(),
            delta.contiguous(),
            dq,
            dk,
            B,
            d,
            float(scale),
            BLOCK_M=bm,
            D_PAD=dp,
            num_warps=4,
        )
    return dq, dk


@functools.lru_cache(maxsize=512)
def _dn_meta(plan: H.DnPlan, dot_dtype: str, precision: str) -> dict:
    """The dn kernel's constexprs and launch options for a plan (built once per plan)."""
    return R.dot_kernel_meta(plan.config, plan.d_pad, plan.even_d, dot_dtype, precision)


def plan_backward_negatives(q: torch.Tensor, negatives: torch.Tensor, *, config=None):
    """(plan, dot dtype name, precision) of the dn kernel for these inputs (see heuristics.dn_plan)."""
    dot = H.dot_dtype_name(R.DTYPE_NAME[q.dtype], R.DTYPE_NAME[negatives.dtype])
    prec = H.dot_precision(dot, R.fp32_precision())
    _, cc = R.device_info(q.device)
    K, d = negatives.shape
    return H.dn_plan(K, d, dot, prec, cc, R.INTERPRETED, config), dot, prec


def infonce_backward_negatives(grad, q, negatives, lse, scale, *, config=None):
    """dn (K, d) in negatives.dtype from grad (B,), q (B, d), negatives (K, d), lse (B,) fp32;
    config (a heuristics.TileConfig) overrides the heuristics."""
    K, d = negatives.shape
    B = q.shape[0]
    dn = torch.empty_like(negatives)
    if K == 0:
        return dn
    if B == 0:
        return dn.zero_()
    grad = grad.to(torch.float32).contiguous()
    plan, dot, prec = plan_backward_negatives(q, negatives, config=config)
    scale = float(scale)
    with R.device_guard(q.device):
        infonce_bwd_negatives_kernel[(plan.grid,)](
            grad,
            q,
            negatives,
            lse.contiguous(),
            dn,
            B,
            K,
            d,
            scale,
            scale * numerics.LOG2E,
            **_dn_meta(plan, dot, prec),
        )
    return dn
