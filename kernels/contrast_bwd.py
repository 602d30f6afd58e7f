"""Contrastive cross-entropy backward of the keys (only when they require grad: NT-Xent, CMC).

    dk_j = scale * sum_i g_i * (P_ij - [j = t_i]) * q_i,   P_ij = exp(scale*q_i.k_j - lse_i), 0 for j = e_i

(dq needs no kernel: it is grad * dloss_dq, saved by the forward.) Column-parallel and
deterministic (no atomics): each program owns BLOCK_N keys, recomputes their logits against every
BLOCK_M-row tile of q (transposed, s^T = k @ q^T, so dk += (P - onehot)^T-tile @ (g*scale*q) needs
no register transpose), applies the excluded column and the target indicator inside the tile, and
accumulates in fp32 in a fixed order. infonce_bwd.py's dn kernel plus those two masks; its tiles
(heuristics.bwd_dn_config) and dot dtype rules apply.

Shapes: grad (M,) fp32, q (M, d), keys (N, d), target (M,) int64, exclude (M,) int64 (HAS_EXCL),
lse (M,) fp32; dk (N, d) in keys.dtype.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from moco_fast.numerics import LOG2E as _LOG2E

from . import heuristics as H
from .infonce_fwd import _dot
from .runtime import INTERPRETED, device_guard, device_info, dot_setup

LOG2E: tl.constexpr = tl.constexpr(_LOG2E)


@triton.jit
def contrast_bwd_keys_kernel(
    g_ptr,
    q_ptr,
    k_ptr,
    t_ptr,
    e_ptr,
    lse_ptr,
    dk_ptr,
    M,
    N,
    d,
    scale,
    qk_scale,  # scale and scale*log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid = tl.program_id(0)
    key = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < d
    k_mask = (key < N)[:, None] & col_ok[None, :]
    k_off = key.to(tl.int64)[:, None] * d + cols[None, :]
    kb = tl.load(k_ptr + k_off, mask=k_mask, other=0.0)

    acc = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    r = tl.arange(0, BLOCK_M)
    for i in range(0, M, BLOCK_M):
        rows = i + r
        row_ok = rows < M
        q_mask = row_ok[:, None] & col_ok[None, :]
        qt = tl.load(q_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :], mask=q_mask, other=0.0)
        # Padded rows: q = 0 and g = 0 zero their contribution whatever their lse.
        gs = tl.load(g_ptr + rows, mask=row_ok, other=0.0) * scale
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
        st = _dot(kb, tl.trans(qt), DOT_DTYPE, PRECISION, EMULATE)  # (BLOCK_N, BLOCK_M) fp32
        pt = tl.exp2(st * qk_scale - lse2[None, :])
        if HAS_EXCL:
            exc = tl.load(e_ptr + rows, mask=row_ok, other=-1)
            pt = tl.where(key[:, None] == exc[None, :], 0.0, pt)
        pt = pt - (key[:, None] == tgt[None, :]).to(tl.float32)  # in [-1, 1]: safe to round to half
        acc += _dot(pt, qt.to(tl.float32) * gs[:, None], DOT_DTYPE, PRECISION, EMULATE)
    tl.store(dk_ptr + k_off, acc.to(dk_ptr.dtype.element_ty), mask=k_mask)


# --------------------------------------------------------------------------------------------
# Launcher (the "triton" backend's contrast_backward_keys; see moco_fast/backends.py)
# --------------------------------------------------------------------------------------------


def keys_config(dp: int, dot_name: str, cc: tuple[int, int], interpret: bool, precision: str) -> H.TileConfig:
    """heuristics.bwd_dn_config, with 8 warps for fp32 dots (and one stage for IEEE ones): the excluded-column
    and target masks add registers, and the InfoNCE tiles spill on sm_90 otherwise (triton 3.8: the 4-warp
    fp32 tiles; 3.6: the 2-stage IEEE one; tests/machine_code/test_contrast_kernels_compile.py)."""
    cfg = H.bwd_dn_config(dp, dot_name, cc, interpret, precision)
    if not interpret and dot_name == "float32":
        cfg = dataclasses.replace(cfg, num_warps=8, num_stages=1 if precision == "ieee" else cfg.num_stages)
    return cfg


def contrast_backward_keys(grad, q, keys, target, exclude, lse, scale, *, config=None):
    """dk (N, d) in keys.dtype; inputs validated and contiguous."""
    N, d = keys.shape
    M = q.shape[0]
    dk = torch.empty_like(keys)
    grad = grad.to(torch.float32).contiguous()
    dp = H.d_pad(d)
    dot_name, dot_tl, prec = dot_setup(q, keys)
    _, cc = device_info(q.device)
    cfg = config or keys_config(dp, dot_name, cc, INTERPRETED, prec)
    has_excl = exclude is not None
    with device_guard(q.device):
        contrast_bwd_keys_kernel[(H.cdiv(N, cfg.block_n),)](
            grad,
            q,
            keys,
            target,
            exclude if has_excl else target,  # a valid pointer the kernel never reads
            lse.to(torch.float32).contiguous(),
            dk,
            M,
            N,
            d,
            float(scale),
            float(scale) * _LOG2E,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            D_PAD=dp,
            HAS_EXCL=has_excl,
            DOT_DTYPE=dot_tl,
            PRECISION=prec,
            EMULATE=INTERPRETED,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return dk
