"""InfoNCE forward, stage 1: one sweep over a chunk of the negatives (flash-decoding split), and
``infonce_forward``, the forward's launcher (which calls stage 2, infonce_combine.py, when needed).

Program (pid_m, pid_s) owns query rows [pid_m*BLOCK_M, +BLOCK_M) and negatives
[pid_s*keys_per_split, +keys_per_split) (keys_per_split is a multiple of BLOCK_N). It streams its
negatives in BLOCK_N-row tiles and keeps, per row, in fp32 and in the log2 domain:

    m    running max of  c*q.n_j          (c = scale*log2(e), so exp(x) == exp2(c*x/scale))
    l    running sum of  exp2(c*q.n_j - m)
    acc  running sum of  exp2(c*q.n_j - m) * n_j      (flash attention with V = K = negatives)
    rank #{j : q.n_j > q.k}                           (the positive's rank among the negatives)

Shapes / dtypes (row-major, contiguous, row stride d):
    q, k        (B, d)  fp32 | bf16 | fp16
    n           (K, d)  fp32 | bf16 | fp16          (K = 0 allowed: the loop is then empty)
    split outputs (FINALIZE=False), in one workspace (see heuristics.FwdPlan):
        m_part, l_part  (S, B)    fp32
        o_part          (S, B, d) fp32            (unnormalized acc)
        r_part          (S, B)    int32
        pos             (B,)      fp32  q_i.k_i, written by split 0 only
    final outputs (FINALIZE=True, only with a single split): the positive is merged here and the
        pointers mean m_ptr -> loss (B,) fp32, l_ptr -> lse (B,) fp32, o_ptr -> delta (B, d) fp32,
        r_ptr -> rank (B,) int64 (pos_ptr is unused).

The sweep holds the negatives only; the positive joins at the end (infonce_combine._merge_positive):
loss_i = ln2*(m - c*q.k) + log1p(l_neg + exp2(c*q.k - m) - 1) with m = max(c*q.k, max_j c*q.n_j), i.e.
log1p(l_neg) when the positive is the max (no lse - pos cancellation when it dominates), exactly 0 when
K = 0; lse = scale*q.k + loss; delta = O - k = (acc - l_neg*k) / (exp2(c*q.k - m) + l_neg).

Dot dtype (DOT_DTYPE): the torch promotion of (q.dtype, n.dtype). Two equal half types run the dots
on tensor cores in that type (p is cast to it for p@N, as flash attention does); anything mixed
(fp32 q with a bf16 queue, bf16 with fp16) promotes to fp32 and the bf16/fp16 tile is upcast
exactly, then PRECISION ("ieee" or "tf32", torch's float32 matmul precision) decides -- casting q
down instead would drop q's precision below what the op promises.
TRANS_COPY (tf32 on sm_90, fp32 queue): the tile is loaded a second time as its transpose for p@N
(see heuristics.py: tf32 wgmma wants both operands K-major; two loads keep both cp.async).
EMULATE (interpreter only, whose bf16 dot is wrong): round operands to DOT_DTYPE, dot in fp32.
"""

import functools
import math
import os

import torch
import triton
import triton.language as tl

from moco_fast import numerics

from . import heuristics as H
from . import runtime as R
from .infonce_combine import _merge_positive, combine_


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    # a @ b with fp32 accumulation; operands are rounded to DOT_DTYPE first.
    if EMULATE:
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32))
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


@triton.jit
def _load_tile(ptrs, key_ok, col_ok, EVEN_K: tl.constexpr, EVEN_D: tl.constexpr, TRANSPOSED: tl.constexpr):
    """A tile of negatives, (BLOCK_N, D_PAD), or its transpose (D_PAD, BLOCK_N) when TRANSPOSED;
    padded keys / columns read 0."""
    if EVEN_K:
        if EVEN_D:
            t = tl.load(ptrs)
        elif TRANSPOSED:
            t = tl.load(ptrs, mask=col_ok[:, None], other=0.0)
        else:
            t = tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    elif TRANSPOSED:
        t = tl.load(ptrs, mask=key_ok[None, :] & col_ok[:, None], other=0.0)
    else:
        t = tl.load(ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)
    return t


@triton.jit
def infonce_fwd_split_kernel(
    q_ptr,
    k_ptr,
    n_ptr,
    m_ptr,
    l_ptr,
    o_ptr,
    r_ptr,
    pos_ptr,
    B,
    K,
    d,
    keys_per_split,
    scale,  # 1 / temperature, fp32
    qk_scale,  # scale * log2(e), fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_D: tl.constexpr,
    FINALIZE: tl.constexpr,
    TRANS_COPY: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < B
    col_ok = cols < d
    qk_mask = row_ok[:, None] & col_ok[None, :]
    rc_off = rows.to(tl.int64)[:, None] * d + cols[None, :]

    # Padded rows/cols load as 0: their logits are 0 (finite), they are never stored.
    q = tl.load(q_ptr + rc_off, mask=qk_mask, other=0.0)
    kp = tl.load(k_ptr + rc_off, mask=qk_mask, other=0.0)
    # Positive logit in plain fp32 (products of half inputs are exact in fp32).
    pos = tl.sum(q.to(tl.float32) * kp.to(tl.float32), axis=1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    rank = tl.zeros([BLOCK_M], tl.int32)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, K)
    keys = tl.arange(0, BLOCK_N)
    # 64-bit base offset: K*d may exceed 2**31 for big queues.
    base = n_ptr + start.to(tl.int64) * d
    n_ptrs = base + keys[:, None] * d + cols[None, :]
    nt_ptrs = base + keys[None, :] * d + cols[:, None]  # the transposed view (TRANS_COPY only)
    for j in range(start, end, BLOCK_N):
        key_ok = (j + keys) < K
        nt = _load_tile(n_ptrs, key_ok, col_ok, EVEN_K, EVEN_D, False)
        s = _dot(q, tl.trans(nt), DOT_DTYPE, PRECISION, EMULATE)  # (BLOCK_M, BLOCK_N) fp32, unscaled
        beats = s > pos[:, None]
        if not EVEN_K:
            beats = beats & key_ok[None, :]
            s = tl.where(key_ok[None, :], s, float("-inf"))
        rank += tl.sum(beats.to(tl.int32), axis=1)
        # Every tile holds >= 1 real key, so m_new is finite and alpha = exp2(-inf) = 0 at first.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])  # one FFMA + MUFU per logit
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if TRANS_COPY:
            v = tl.trans(_load_tile(nt_ptrs, key_ok, col_ok, EVEN_K, EVEN_D, True))
        else:
            v = nt
        acc = acc * alpha[:, None] + _dot(p, v, DOT_DTYPE, PRECISION, EMULATE)
        m_i = m_new
        n_ptrs += BLOCK_N * d
        nt_ptrs += BLOCK_N * d

    if FINALIZE:
        # Single split: merge the positive x_0 = k_i here (k reloaded, not kept live in the loop; the
        # accumulator scaled in place before k is loaded: the registers of the old O epilogue).
        loss, lse, a, b = _merge_positive(pos, pos * qk_scale, m_i, l_i, scale)
        acc = acc * a[:, None]
        kp = tl.load(k_ptr + rc_off, mask=qk_mask, other=0.0)
        acc += kp.to(tl.float32) * b[:, None]
        tl.store(o_ptr + rc_off, acc, mask=qk_mask)
        tl.store(m_ptr + rows, loss, mask=row_ok)
        tl.store(l_ptr + rows, lse, mask=row_ok)
        tl.store(r_ptr + rows, rank.to(tl.int64), mask=row_ok)
    else:
        part = pid_s.to(tl.int64) * B
        tl.store(m_ptr + part + rows, m_i, mask=row_ok)
        tl.store(l_ptr + part + rows, l_i, mask=row_ok)
        tl.store(r_ptr + part + rows, rank, mask=row_ok)
        tl.store(o_ptr + part * d + rc_off, acc, mask=qk_mask)
        if pid_s == 0:
            tl.store(pos_ptr + rows, pos, mask=row_ok)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _split_meta(plan: H.FwdPlan, dot_dtype: str, precision: str) -> dict:
    """The split kernel's constexprs and launch options for a plan (built once per plan)."""
    meta = R.dot_kernel_meta(plan.config, plan.d_pad, plan.even_d, dot_dtype, precision)
    return dict(meta, EVEN_K=plan.even_k, FINALIZE=plan.fused, TRANS_COPY=plan.trans_copy)


def plan_forward(q: torch.Tensor, negatives: torch.Tensor, *, num_splits=None, config=None, fuse=None):
    """(plan, dot dtype name, precision) the forward launches for these inputs (see heuristics.fwd_plan)."""
    n_name = R.DTYPE_NAME[negatives.dtype]
    dot = H.dot_dtype_name(R.DTYPE_NAME[q.dtype], n_name)
    prec = H.dot_precision(dot, R.fp32_precision())
    num_sms, cc = R.device_info(q.device)
    B, d = q.shape
    plan = H.fwd_plan(B, negatives.shape[0], d, n_name, dot, prec, cc, num_sms, R.INTERPRETED, num_splits, config, fuse)
    return plan, dot, prec


def infonce_forward(q, k, negatives, scale, need_rank=True, *, num_splits=None, config=None, fuse=None):
    """(loss (B,) fp32, lse (B,) fp32, delta (B, d) fp32, rank (B,) int64) of q, k (B, d) against
    negatives (K, d), all fp32/bf16/fp16 and contiguous; scale = 1/temperature.

    loss_i = lse_i - scale*q_i.k_i and delta_i = O_i - k_i are written by the kernels with the positive
    kept apart from the negatives (module docstring; exactly 0 when K = 0). The rank is
    counted for free by the sweep, so ``need_rank`` is accepted and ignored. num_splits / config
    (a heuristics.TileConfig) / fuse (finalize a single split in the split kernel) override the
    heuristics (tests, autotuning). One launch when the plan is fused, else split + combine.
    """
    for name, t in (("q", q), ("k", k), ("negatives", negatives)):
        R.check_float(name, t)
    dev = q.device
    if config is None and num_splits is None and _autotune_enabled(dev):
        config, num_splits = _autotuned_fwd(q, k, negatives, scale)
    plan, dot, prec = plan_forward(q, negatives, num_splits=num_splits, config=config, fuse=fuse)
    B, d = q.shape
    K = negatives.shape[0]
    loss = torch.empty(B, dtype=torch.float32, device=dev)
    lse = torch.empty(B, dtype=torch.float32, device=dev)
    delta = torch.empty(B, d, dtype=torch.float32, device=dev)
    rank = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return loss, lse, delta, rank
    scale = float(scale)
    qk_scale = scale * numerics.LOG2E
    meta = _split_meta(plan, dot, prec)
    grid = (plan.row_blocks, plan.splits)
    kps = plan.keys_per_split
    with R.device_guard(dev):
        if plan.fused:
            # K == 0 lands here too (or in the combine below): the loop is empty, only the positive counts.
            infonce_fwd_split_kernel[grid](
                q, k, negatives, loss, lse, delta, rank, lse, B, K, d, kps, scale, qk_scale, **meta
            )
            return loss, lse, delta, rank
        ws = torch.empty(plan.ws_size, dtype=torch.float32, device=dev)
        m_part, l_part = ws[plan.m_off : plan.l_off], ws[plan.l_off : plan.r_off]
        r_part, pos = ws[plan.r_off : plan.pos_off].view(torch.int32), ws[plan.pos_off :]
        infonce_fwd_split_kernel[grid](
            q, k, negatives, m_part, l_part, ws, r_part, pos, B, K, d, kps, scale, qk_scale, **meta
        )
        combine_(plan, m_part, l_part, ws, r_part, pos, k, loss, lse, delta, rank, scale, qk_scale)
    return loss, lse, delta, rank


# --------------------------------------------------------------------------------------------
# Optional autotuning (MOCO_FAST_TRITON_AUTOTUNE=1, CUDA only)
# --------------------------------------------------------------------------------------------

_TUNED: dict = {}


def _autotune_enabled(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and not R.INTERPRETED
        and os.environ.get("MOCO_FAST_TRITON_AUTOTUNE", "0") not in ("", "0")
    )


def _autotuned_fwd(q, k, negatives, scale):
    """Best (TileConfig, num_splits) for this problem class, timed once per key and cached."""
    B, d = q.shape
    K = negatives.shape[0]
    bucket = lambda x: 1 << max(0, int(x) - 1).bit_length()  # noqa: E731 - next power of two
    dot = H.dot_dtype_name(R.DTYPE_NAME[q.dtype], R.DTYPE_NAME[negatives.dtype])
    prec = H.dot_precision(dot, R.fp32_precision())
    key = (q.device.index, bucket(B), bucket(K), d, q.dtype, k.dtype, negatives.dtype, prec)
    if key in _TUNED:
        return _TUNED[key]
    from triton.testing import do_bench

    num_sms, _ = R.device_info(q.device)
    dp = H.d_pad(d)
    best, best_t = (None, None), math.inf
    for cfg in H.fwd_candidates(dp, dot, prec):
        base = H.num_splits(H.cdiv(B, cfg.block_m), H.cdiv(K, cfg.block_n), num_sms * cfg.ctas_per_sm)
        for s in sorted({max(1, base // 2), base, base * 2}):
            try:
                fn = lambda s=s, cfg=cfg: infonce_forward(q, k, negatives, scale, num_splits=s, config=cfg)  # noqa: E731
                t = do_bench(fn, warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                continue
            if t < best_t:
                best, best_t = (cfg, s), t
    _TUNED[key] = best
    return best
