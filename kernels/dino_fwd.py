"""DINO forward: one softmax-weighted sweep over the prototypes (flash-decoding split), and its launcher.

Program (pid_m, pid_s) owns rows [pid_m*BLOCK_M, +BLOCK_M) of x and prototypes
[pid_s*keys_per_split, +keys_per_split) (a multiple of BLOCK_N). It streams (BLOCK_N, d) tiles of the
keys (and of the values, when they are another matrix) and keeps, per row, in fp32 and in the log2
domain (c = scale·log2(e)):

    z    = c·(x·k_j − bias_j)                 the logit of prototype j (bias: DINO's center, or none)
    m    running max of z
    l    running sum of exp2(z − m)
    acc  running sum of exp2(z − m)·v_j        (flash attention with K = keys, V = values)

DINO runs it twice: the teacher rows (keys = the teacher's prototypes, values = the student's, bias =
the center, scale = 1/T_t) give u_t = Σ_k P_t(k)·W_k; the student rows (keys = values = W, no bias,
scale = 1/T_s) give the student's lse and O_s = Σ_k P_s(k)·W_k.

Shapes / dtypes (row-major, contiguous, row stride d):
    x            (R, d)  fp32 | bf16 | fp16
    keys, values (P, d)  fp32 | bf16 | fp16  (P >= 1)
    bias         (P,)    fp32                (HAS_BIAS)
    FINALIZE (single split): lse (R,) fp32 natural log, out (R, d) fp32 normalized.
    else: m_part, l_part (S, R) fp32 (m in the log2 domain), o_part (S, R, d) fp32 unnormalized;
        the launcher merges the S partials (O(S·R·d) torch ops).

Dot dtypes as in infonce_fwd.py (``_dot``): the torch promotion of (x, keys) for x·kᵀ, of (x, values)
for p·V; fp32 operands follow PRECISION; EMULATE in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moco_fast.numerics import LN2, LOG2E

from . import heuristics as H
from .infonce_fwd import _dot
from .runtime import DTYPE_NAME, INTERPRETED, device_guard, device_info, fp32_precision

_LN2: tl.constexpr = tl.constexpr(LN2)


@triton.jit
def dino_softmax_pass_kernel(
    x_ptr,
    k_ptr,
    v_ptr,
    bias_ptr,
    m_ptr,
    l_ptr,
    o_ptr,
    R,
    P,
    d,
    keys_per_split,
    qk_scale,  # scale * log2(e), fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAME_KV: tl.constexpr,
    EVEN_P: tl.constexpr,
    FINALIZE: tl.constexpr,
    QK_DTYPE: tl.constexpr,
    PV_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < R
    col_ok = cols < d
    x_mask = row_ok[:, None] & col_ok[None, :]
    x_off = rows.to(tl.int64)[:, None] * d + cols[None, :]
    # Padded rows/cols load as 0: their logits are finite (−bias), they are never stored.
    x = tl.load(x_ptr + x_off, mask=x_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, P)
    keys = tl.arange(0, BLOCK_N)
    tile_off = start.to(tl.int64) * d + keys[:, None] * d + cols[None, :]  # 64-bit: P*d may pass 2**31
    for j in range(start, end, BLOCK_N):
        key_ok = (j + keys) < P
        kv_mask = key_ok[:, None] & col_ok[None, :]
        kt = tl.load(k_ptr + tile_off, mask=kv_mask, other=0.0)
        s = _dot(x, tl.trans(kt), QK_DTYPE, PRECISION, EMULATE) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if HAS_BIAS:
            b = tl.load(bias_ptr + j + keys, mask=key_ok, other=0.0)
            s -= b[None, :] * qk_scale
        if not EVEN_P:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        # Every tile holds >= 1 real prototype, so m_new is finite and alpha = exp2(-inf) = 0 at first.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if SAME_KV:
            vt = kt
        else:
            vt = tl.load(v_ptr + tile_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p, vt, PV_DTYPE, PRECISION, EMULATE)
        m_i = m_new
        tile_off += BLOCK_N * d

    if FINALIZE:
        tl.store(l_ptr + rows, (m_i + tl.log2(l_i)) * _LN2, mask=row_ok)
        tl.store(o_ptr + x_off, acc / l_i[:, None], mask=x_mask)
    else:
        part = pid_s.to(tl.int64) * R
        tl.store(m_ptr + part + rows, m_i, mask=row_ok)
        tl.store(l_ptr + part + rows, l_i, mask=row_ok)
        tl.store(o_ptr + part * d + x_off, acc, mask=x_mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def dot_dtypes(x_dtype: torch.dtype, keys_dtype: torch.dtype, values_dtype: torch.dtype) -> tuple[str, str]:
    """(dtype of x·kᵀ, dtype of p·V): equal half types stay half, any other mix is fp32 (infonce's rule)."""
    name = DTYPE_NAME
    return (H.dot_dtype_name(name[x_dtype], name[keys_dtype]), H.dot_dtype_name(name[x_dtype], name[values_dtype]))


def fwd_config(dp: int, qk_dtype: str, pv_dtype: str, same_kv: bool, cc=(9, 0), interpret=False, precision="tf32"):
    """Tile config of dino_softmax_pass_kernel: infonce's forward tiles (the same loop, V = K), one pipeline
    stage fewer when the values are a second matrix (two tiles per stage in shared memory)."""
    if interpret:
        return H.TileConfig(32, 64, 4, 1)
    dot = qk_dtype if qk_dtype == pv_dtype else "float32"
    cfg = H.fwd_config(dp, dot, cc, False, precision)
    if not same_kv and cfg.num_stages > 2:
        cfg = H.TileConfig(cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages - 1)
    return cfg


def dino_softmax_pass(x, keys, values, bias, scale, *, num_splits=None, config=None):
    """(lse (R,) fp32, out (R, d) fp32) of z = scale·(x·keysᵀ − bias); see the module docstring.

    num_splits / config (a heuristics.TileConfig) override the heuristics (tests, tuning).
    """
    R, d = x.shape
    P = keys.shape[0]
    dev = x.device
    lse = torch.empty(R, dtype=torch.float32, device=dev)
    out = torch.empty(R, d, dtype=torch.float32, device=dev)
    if R == 0:
        return lse, out
    same_kv = values is keys or (values.data_ptr() == keys.data_ptr() and values.dtype == keys.dtype)
    dp = H.d_pad(d)
    qk_name, pv_name = dot_dtypes(x.dtype, keys.dtype, values.dtype)
    prec = fp32_precision()
    num_sms, cc = device_info(dev)
    cfg = config or fwd_config(dp, qk_name, pv_name, same_kv, cc, interpret=INTERPRETED, precision=prec)
    row_blocks = H.cdiv(R, cfg.block_m)
    n_tiles = H.cdiv(P, cfg.block_n)
    if num_splits is None:
        num_splits = H.num_splits(row_blocks, n_tiles, num_sms)
    num_splits = max(1, min(int(num_splits), n_tiles))
    kps = H.cdiv(n_tiles, num_splits) * cfg.block_n  # prototypes per split, a multiple of BLOCK_N
    splits = H.cdiv(P, kps)  # no empty split
    bias_arg = bias if bias is not None else lse  # never read without HAS_BIAS
    meta = dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        D_PAD=dp,
        HAS_BIAS=bias is not None,
        SAME_KV=same_kv,
        EVEN_P=(kps * splits == P),
        QK_DTYPE=getattr(tl, qk_name),
        PV_DTYPE=getattr(tl, pv_name),
        PRECISION=prec,
        EMULATE=INTERPRETED,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    qk_scale = float(scale) * LOG2E
    with device_guard(dev):
        if splits == 1:
            dino_softmax_pass_kernel[(row_blocks, 1)](
                x, keys, values, bias_arg, lse, lse, out, R, P, d, kps, qk_scale, FINALIZE=True, **meta
            )
            return lse, out
        m_part = torch.empty(splits, R, dtype=torch.float32, device=dev)
        l_part = torch.empty(splits, R, dtype=torch.float32, device=dev)
        o_part = torch.empty(splits, R, d, dtype=torch.float32, device=dev)
        dino_softmax_pass_kernel[(row_blocks, splits)](
            x, keys, values, bias_arg, m_part, l_part, o_part, R, P, d, kps, qk_scale, FINALIZE=False, **meta
        )
    # Merge the splits (O(S·R·d), small next to the sweep): log2-domain maxima, rescaled sums.
    m = m_part.amax(dim=0)
    w = torch.exp2(m_part - m)
    total = (l_part * w).sum(dim=0)
    out = (o_part * w[:, :, None]).sum(dim=0).div_(total[:, None])
    return (m + torch.log2(total)) * LN2, out
