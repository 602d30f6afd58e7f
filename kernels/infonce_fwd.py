"""InfoNCE forward, stage 1: one sweep over a chunk of the negatives (flash-decoding split).

Program (pid_m, pid_s) owns query rows [pid_m*BLOCK_M, +BLOCK_M) and negatives
[pid_s*keys_per_split, +keys_per_split) (keys_per_split is a multiple of BLOCK_N). It streams its
negatives in BLOCK_N-row tiles and keeps, per row, in fp32 and in the log2 domain:

    m    running max of  c*q.n_j          (c = scale*log2(e), so exp(x) == exp2(c*x/scale))
    l    running sum of  exp2(c*q.n_j - m)
    acc  running sum of  exp2(c*q.n_j - m) * n_j      (flash attention with V = K = negatives)
    rank #{j : q.n_j > q.k}                           (the positive's rank among the negatives)

Shapes / dtypes (row-major, contiguous, row stride d):
    q, k        (B, d)  fp32 | bf16 | fp16
    n           (K, d)  fp32 | bf16 | fp16          (K >= 1 when launched)
    split outputs (FINALIZE=False):
        m_part, l_part  (S, B)    fp32
        o_part          (S, B, d) fp32            (unnormalized acc)
        r_part          (S, B)    int32
        pos             (B,)      fp32  q_i.k_i, written by split 0 only
    final outputs (FINALIZE=True, only with a single split): the positive is merged here and
        lse (B,) fp32 (natural log), out (B, d) fp32, rank (B,) int64 are written directly
        (m_part/l_part/o_part/r_part/pos are then the final lse/out/rank pointers, unused ones ignored).

Dot dtype (DOT_DTYPE): the torch promotion of (q.dtype, n.dtype). Two equal half types run the dots
on tensor cores in that type (p is cast to it for p@N, as flash attention does); anything mixed
(fp32 q with a bf16 queue, bf16 with fp16) promotes to fp32 and the bf16/fp16 tile is upcast
exactly, then PRECISION ("ieee" when torch's float32 matmul precision is "highest", else "tf32")
decides -- casting q down instead would drop q's precision below what the op promises.
EMULATE (interpreter only, whose bf16 dot is wrong): round operands to DOT_DTYPE, dot in fp32.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    # a @ b with fp32 accumulation; operands are rounded to DOT_DTYPE first.
    if EMULATE:
        return tl.dot(a.to(DOT_DTYPE).to(tl.float32), b.to(DOT_DTYPE).to(tl.float32))
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), input_precision=PRECISION)


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
    qk_scale,  # scale * log2(e), fp32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_D: tl.constexpr,
    FINALIZE: tl.constexpr,
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
    n_ptrs = n_ptr + start.to(tl.int64) * d + keys[:, None] * d + cols[None, :]
    for j in range(start, end, BLOCK_N):
        if EVEN_K:
            if EVEN_D:
                nt = tl.load(n_ptrs)
            else:
                nt = tl.load(n_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            key_ok = (j + keys) < K
            nt = tl.load(n_ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)
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
        acc = acc * alpha[:, None] + _dot(p, nt, DOT_DTYPE, PRECISION, EMULATE)
        m_i = m_new
        n_ptrs += BLOCK_N * d

    if FINALIZE:
        # Single split: merge the positive x_0 = k_i here (k reloaded, not kept live in the loop).
        pos2 = pos * qk_scale
        m_f = tl.maximum(m_i, pos2)
        w0 = tl.exp2(pos2 - m_f)
        w = tl.exp2(m_i - m_f)
        l_f = l_i * w + w0
        acc = acc * (w / l_f)[:, None]
        kp = tl.load(k_ptr + rc_off, mask=qk_mask, other=0.0)
        acc += kp.to(tl.float32) * (w0 / l_f)[:, None]
        tl.store(o_ptr + rc_off, acc, mask=qk_mask)
        tl.store(l_ptr + rows, (m_f + tl.log2(l_f)) * 0.6931471805599453, mask=row_ok)
        tl.store(r_ptr + rows, rank.to(tl.int64), mask=row_ok)
    else:
        part = pid_s.to(tl.int64) * B
        tl.store(m_ptr + part + rows, m_i, mask=row_ok)
        tl.store(l_ptr + part + rows, l_i, mask=row_ok)
        tl.store(r_ptr + part + rows, rank, mask=row_ok)
        tl.store(o_ptr + part * d + rc_off, acc, mask=qk_mask)
        if pid_s == 0:
            tl.store(pos_ptr + rows, pos, mask=row_ok)
