"""DINO backward: the gradient of the prototypes, recomputed blockwise over P, and its launcher.

Program pid owns prototypes [pid*BLOCK_N, +BLOCK_N) and writes their rows of

    dW_k = grad_scale · ( Σ_r P_s(r, k)·y_s[r]  +  Σ_r P_t(r, k)·y_t[r] )

with P_s = exp2(c_s·x_s·W_kᵀ − lse2_s) over the student rows and P_t = exp2(c_t·(x_t·Wt_kᵀ − bias_k) −
lse2_t) over the teacher rows (c = scale·log2 e, lse2 = lse·log2 e, from the forward). Each row set is
streamed in BLOCK_M-row tiles of x (the features) and y (fp32 weights: n_v·h for student rows,
[u<S]·h_u − Σ_v h_v for teacher rows); the (BLOCK_N, d) accumulator stays in registers and is written
once, so the kernel is deterministic (no atomics) and reads each feature tile once per program, like
infonce_bwd.py's negatives kernel (and cut-cross-entropy's backward).

Shapes / dtypes (row-major, contiguous): x_s (R_s, d), x_t (R_t, d) fp32|bf16|fp16; w_s, w_t (P, d)
fp32|bf16|fp16; bias (P,) fp32; lse_s (R_s,), lse_t (R_t,), y_s (R_s, d), y_t (R_t, d) fp32;
dw (P, d) in w_s's dtype. Dot dtypes: the promotion of (x, W) for the logits, the same for p·y (y is
rounded to it, as infonce_bwd.py rounds g·q), fp32 operands following PRECISION.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moco_fast.dino_pairs import prototype_grad_rows
from moco_fast.numerics import LOG2E

from . import heuristics as H
from .infonce_fwd import _dot
from .runtime import DTYPE_NAME, INTERPRETED, device_guard, device_info, fp32_precision

_LOG2E: tl.constexpr = tl.constexpr(LOG2E)


@triton.jit
def _accumulate_rows(
    acc,
    wt,
    bias2,
    x_ptr,
    y_ptr,
    lse_ptr,
    R,
    d,
    qk_scale,
    BLOCK_M: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    # acc (BLOCK_N, D_PAD) += Σ_r softmax(r, k)·y_r over rows r of one set, BLOCK_M at a time.
    r = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < d
    off = r.to(tl.int64)[:, None] * d + cols[None, :]
    for i in range(0, R, BLOCK_M):
        row_ok = (i + r) < R
        mask = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptr + off, mask=mask, other=0.0)
        yt = tl.load(y_ptr + off, mask=mask, other=0.0)  # padded rows: y = 0 zeroes them, whatever their lse
        lse2 = tl.load(lse_ptr + i + r, mask=row_ok, other=0.0) * _LOG2E
        st = _dot(wt, tl.trans(xt), DOT_DTYPE, PRECISION, EMULATE) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_BIAS:
            st -= bias2[:, None]
        # softmax(r, k)ᵀ in [0, 1]: safe to round to half. Padded rows (lse 0) could overflow: zero them.
        pt = tl.where(row_ok[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        acc += _dot(pt, yt, DOT_DTYPE, PRECISION, EMULATE)
        off += BLOCK_M * d
    return acc


@triton.jit
def dino_prototype_grad_kernel(
    xs_ptr,
    ws_ptr,
    lses_ptr,
    ys_ptr,
    xt_ptr,
    wt_ptr,
    bias_ptr,
    lset_ptr,
    yt_ptr,
    dw_ptr,
    Rs,
    Rt,
    P,
    d,
    qk_scale_s,  # scale_s * log2(e)
    qk_scale_t,  # scale_t * log2(e)
    grad_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    SAME_W: tl.constexpr,
    DOT_DTYPE_S: tl.constexpr,
    DOT_DTYPE_T: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    keys = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    key_ok = keys < P
    w_mask = key_ok[:, None] & (cols < d)[None, :]
    w_off = keys.to(tl.int64)[:, None] * d + cols[None, :]
    ws = tl.load(ws_ptr + w_off, mask=w_mask, other=0.0)
    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    no_bias = tl.zeros([BLOCK_N], tl.float32)
    acc = _accumulate_rows(
        acc,
        ws,
        no_bias,
        xs_ptr,
        ys_ptr,
        lses_ptr,
        Rs,
        d,
        qk_scale_s,
        BLOCK_M,
        D_PAD,
        False,
        DOT_DTYPE_S,
        PRECISION,
        EMULATE,
    )
    if SAME_W:
        wt = ws
    else:
        wt = tl.load(wt_ptr + w_off, mask=w_mask, other=0.0)
    bias2 = tl.load(bias_ptr + keys, mask=key_ok, other=0.0) * qk_scale_t
    acc = _accumulate_rows(
        acc,
        wt,
        bias2,
        xt_ptr,
        yt_ptr,
        lset_ptr,
        Rt,
        d,
        qk_scale_t,
        BLOCK_M,
        D_PAD,
        True,
        DOT_DTYPE_T,
        PRECISION,
        EMULATE,
    )
    tl.store(dw_ptr + w_off, (acc * grad_scale).to(dw_ptr.dtype.element_ty), mask=w_mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def bwd_config(dp: int, dot_dtype: str, cc=(9, 0), interpret=False, precision="tf32") -> H.TileConfig:
    """(block_m = rows per step, block_n = prototypes per program): infonce's dn tiles (the same loop), but
    8 warps for TF32 at d > 128 — this kernel streams two row tiles (x and y) next to its resident W tile,
    and with 4 warps that config spills on sm_90 (tests/machine_code/test_dino_kernels_compile.py)."""
    if interpret:
        return H.TileConfig(32, 64, 4, 1)
    cfg = H.bwd_dn_config(dp, dot_dtype, cc, False, precision)
    if dot_dtype not in H.HALF and precision == "tf32" and dp > 128:
        return H.TileConfig(cfg.block_m, cfg.block_n, 8, cfg.num_stages)
    return cfg


def dino_prototype_grad(
    student,
    teacher,
    prototypes,
    teacher_prototypes,
    center,
    lse_s,
    lse_t,
    num_views,
    num_teacher_views,
    student_scale,
    teacher_scale,
    grad_scale,
    *,
    config=None,
):
    """dW (P, d) in prototypes.dtype (contract: moco_fast.backends). The row weights y_s, y_t come from the
    pairs (O(rows·d) torch ops, moco_fast.dino_pairs); the kernel recomputes both softmaxes."""
    P, d = prototypes.shape
    dev = prototypes.device
    y_s, y_t = prototype_grad_rows(student, num_views, num_teacher_views, torch.float32)
    dw = torch.empty_like(prototypes)
    same_w = teacher_prototypes.data_ptr() == prototypes.data_ptr() and teacher_prototypes.dtype == prototypes.dtype
    dot_s = H.dot_dtype_name(DTYPE_NAME[student.dtype], DTYPE_NAME[prototypes.dtype])
    dot_t = H.dot_dtype_name(DTYPE_NAME[teacher.dtype], DTYPE_NAME[teacher_prototypes.dtype])
    prec = fp32_precision()
    dp = H.d_pad(d)
    _, cc = device_info(dev)
    cfg = config or bwd_config(dp, dot_s if dot_s == dot_t else "float32", cc, interpret=INTERPRETED, precision=prec)
    f32 = dict(dtype=torch.float32)
    with device_guard(dev):
        dino_prototype_grad_kernel[(H.cdiv(P, cfg.block_n),)](
            student,
            prototypes,
            lse_s.to(**f32).contiguous(),
            y_s,
            teacher,
            teacher_prototypes,
            center.to(**f32).contiguous(),
            lse_t.to(**f32).contiguous(),
            y_t,
            dw,
            student.shape[0],
            teacher.shape[0],
            P,
            d,
            float(student_scale) * LOG2E,
            float(teacher_scale) * LOG2E,
            float(grad_scale),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            D_PAD=dp,
            SAME_W=same_w,
            DOT_DTYPE_S=getattr(tl, dot_s),
            DOT_DTYPE_T=getattr(tl, dot_t),
            PRECISION=prec,
            EMULATE=INTERPRETED,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return dw
