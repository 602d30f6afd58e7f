"""Contrastive cross-entropy forward, stage 2: merge the per-split partials (flash-decoding).

Inputs (from contrast_fwd_kernel, S splits): m_part, l_part (S, M) fp32 log2-domain max / sum;
o_part (S, M, d) fp32 unnormalized sums of key rows; r_part (S, M) int32; pos (M,) fp32 the target's
unscaled logit; keys (N, d) and target (M,) int64 to reload each row's target key.
Outputs: loss (M,) fp32 = lse - scale*pos; lse (M,) fp32 natural log; dloss_dq (M, d) fp32 =
scale*(O - k_t); rank (M,) int64. The split holding the target has a finite max, so the global max is
finite; splits whose keys were all excluded (m = -inf) get weight exp2(-inf) = 0.

Grid: one program per BLOCK_M rows; BLOCK_S splits per step as 2-D / 3-D tiles (infonce_combine.py's
layout, so the same heuristics.combine_block_m / combine_block_s apply).
"""

import triton
import triton.language as tl

from moco_fast.numerics import LN2 as _LN2

LN2: tl.constexpr = tl.constexpr(_LN2)


@triton.jit
def contrast_combine_kernel(
    m_ptr,
    l_ptr,
    o_ptr,
    r_ptr,
    pos_ptr,
    k_ptr,
    t_ptr,
    loss_ptr,
    lse_ptr,
    out_ptr,
    rank_ptr,
    M,
    d,
    num_splits,
    scale,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    sp = tl.arange(0, BLOCK_S)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < d)[None, :]
    rc_off = rows.to(tl.int64)[:, None] * d + cols[None, :]

    m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        sm_off = (s0 + sp).to(tl.int64)[:, None] * M + rows[None, :]
        sm_mask = ((s0 + sp) < num_splits)[:, None] & row_ok[None, :]
        m_all = tl.maximum(m_all, tl.max(tl.load(m_ptr + sm_off, mask=sm_mask, other=float("-inf")), axis=0))
    m_all = tl.where(row_ok, m_all, 0.0)  # padded rows: keep the arithmetic finite
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    rank = tl.zeros([BLOCK_M], tl.int64)
    for s0 in range(0, num_splits, BLOCK_S):
        s_ok = (s0 + sp) < num_splits
        sm_off = (s0 + sp).to(tl.int64)[:, None] * M + rows[None, :]
        sm_mask = s_ok[:, None] & row_ok[None, :]
        w = tl.exp2(tl.load(m_ptr + sm_off, mask=sm_mask, other=float("-inf")) - m_all[None, :])
        l_all += tl.sum(tl.load(l_ptr + sm_off, mask=sm_mask, other=0.0) * w, axis=0)
        rank += tl.sum(tl.load(r_ptr + sm_off, mask=sm_mask, other=0), axis=0).to(tl.int64)
        o_off = (s0 + sp).to(tl.int64)[:, None, None] * M * d + rc_off[None, :, :]
        o = tl.load(o_ptr + o_off, mask=s_ok[:, None, None] & mask[None, :, :], other=0.0)
        acc += tl.sum(o * w[:, :, None], axis=0)
    l_all = tl.where(row_ok, l_all, 1.0)
    lse = (m_all + tl.log2(l_all)) * LN2
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    kt = tl.load(k_ptr + tgt.to(tl.int64)[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    tl.store(loss_ptr + rows, lse - pos * scale, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(out_ptr + rc_off, (acc / l_all[:, None] - kt) * scale, mask=mask)
    tl.store(rank_ptr + rows, rank, mask=row_ok)
