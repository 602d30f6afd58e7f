"""InfoNCE forward, stage 2: merge the per-split partials and the positive into lse, out, rank.

Inputs (from infonce_fwd_split_kernel, S splits):
    m_part, l_part (S, B) fp32   log2-domain running max / sum of each split
    o_part   (S, B, d) fp32      unnormalized sum_j exp2(c*q.n_j - m_s) * n_j
    r_part   (S, B) int32        negatives of the split that beat the positive
    pos      (B,) fp32           q_i.k_i (unscaled)
    k        (B, d) fp32 | bf16 | fp16   the positives (x_0 of every row)
Outputs:
    lse  (B,) fp32 natural-log logsumexp of [c*q.k, c*q.n_0, ...] / log2(e)
    out  (B, d) fp32 softmax-weighted mean of [k_i, n_0, ...]
    rank (B,) int64

Grid: one program per BLOCK_M rows (small BLOCK_M so that B=256 still spreads over many SMs:
the partials, not the FLOPs, are what this stage reads). Splits are read BLOCK_S at a time as 2-D /
3-D tiles so that a program keeps many loads in flight instead of one dependent load per split.
"""

import triton
import triton.language as tl


@triton.jit
def infonce_combine_kernel(
    m_ptr,
    l_ptr,
    o_ptr,
    r_ptr,
    pos_ptr,
    k_ptr,
    lse_ptr,
    out_ptr,
    rank_ptr,
    B,
    d,
    num_splits,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    sp = tl.arange(0, BLOCK_S)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < d)[None, :]
    rc_off = rows.to(tl.int64)[:, None] * d + cols[None, :]

    pos2 = tl.load(pos_ptr + rows, mask=row_ok, other=0.0) * qk_scale
    # Pass 1: the global max (the positive's logit is part of it, so it is finite). BLOCK_S splits
    # per step as one (BLOCK_S, BLOCK_M) tile: many independent loads in flight, not a serial chain.
    m_all = pos2
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = (s0 + sp) < num_splits
        sm_off = (s0 + sp).to(tl.int64)[:, None] * B + rows[None, :]
        sm_mask = s_ok[:, None] & row_ok[None, :]
        m_s = tl.load(m_ptr + sm_off, mask=sm_mask, other=float("-inf"))
        m_all = tl.maximum(m_all, tl.max(m_s, axis=0))
    # Pass 2: rescale and add, in a fixed order (deterministic).
    w0 = tl.exp2(pos2 - m_all)
    kp = tl.load(k_ptr + rc_off, mask=mask, other=0.0).to(tl.float32)
    acc = kp * w0[:, None]
    l_all = w0
    rank = tl.zeros([BLOCK_M], tl.int64)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = (s0 + sp) < num_splits
        sm_off = (s0 + sp).to(tl.int64)[:, None] * B + rows[None, :]
        sm_mask = s_ok[:, None] & row_ok[None, :]
        w = tl.exp2(tl.load(m_ptr + sm_off, mask=sm_mask, other=float("-inf")) - m_all[None, :])  # empty: 0
        l_all += tl.sum(tl.load(l_ptr + sm_off, mask=sm_mask, other=0.0) * w, axis=0)
        rank += tl.sum(tl.load(r_ptr + sm_off, mask=sm_mask, other=0), axis=0).to(tl.int64)
        # (BLOCK_S, BLOCK_M, D_PAD) slab of the partial accumulators.
        o_off = (s0 + sp).to(tl.int64)[:, None, None] * B * d + rc_off[None, :, :]
        o = tl.load(o_ptr + o_off, mask=s_ok[:, None, None] & mask[None, :, :], other=0.0)
        acc += tl.sum(o * w[:, :, None], axis=0)
    tl.store(lse_ptr + rows, (m_all + tl.log2(l_all)) * 0.6931471805599453, mask=row_ok)
    tl.store(out_ptr + rc_off, acc / l_all[:, None], mask=mask)
    tl.store(rank_ptr + rows, rank, mask=row_ok)
