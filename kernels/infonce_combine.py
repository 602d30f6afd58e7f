"""InfoNCE forward, stage 2: merge the per-split partials and the positive into loss, lse, delta, rank;
and ``combine_``, its launcher (called by infonce_fwd.infonce_forward).

Inputs (from infonce_fwd_split_kernel, S splits):
    m_part, l_part (S, B) fp32   log2-domain running max / sum of each split
    o_part   (S, B, d) fp32      unnormalized sum_j exp2(c*q.n_j - m_s) * n_j
    r_part   (S, B) int32        negatives of the split that beat the positive
    pos      (B,) fp32           q_i.k_i (unscaled)
    k        (B, d) fp32 | bf16 | fp16   the positives (x_0 of every row)
Outputs (_merge_positive, shared with the split kernel's FINALIZE epilogue):
    loss  (B,) fp32 lse - scale*q.k, with the positive kept apart from the negatives (no cancellation
          when it dominates; exactly 0 when K = 0)
    lse   (B,) fp32 natural-log logsumexp of [c*q.k, c*q.n_0, ...] / log2(e)
    delta (B, d) fp32 O - k = sum_j softmax_ij (n_j - k_i) (exactly 0 when K = 0)
    rank  (B,) int64

Grid: one program per BLOCK_M rows (small BLOCK_M so that B=256 still spreads over many SMs:
the partials, not the FLOPs, are what this stage reads). Pass 1 reads the (S, BLOCK_M) maxima;
pass 2 reads BLOCK_S splits per step as BLOCK_S separate 2-D (BLOCK_M, D_PAD) loads of an unrolled
loop: independent loads in flight (latency hiding) without the 3-D layouts that made triton 3.6
spill, in a fixed order (deterministic).
"""

import triton
import triton.language as tl

from . import heuristics as H
from .runtime import LN2, log1p


@triton.jit
def _merge_positive(pos, pos2, m_neg, l_neg, scale):
    """(loss, lse, a, b), each (BLOCK_M,), of rows from their negatives' part and their positive, with
    delta = O - k = a*acc_neg + b*k (the caller applies it: acc scaled in place, then k added, which
    keeps the fused epilogue's registers where they were).

    m_neg: the log2-domain max the negatives' sums are relative to (-inf when there are none; the
    combine's includes pos2); l_neg = sum_j exp2(c*q.n_j - m_neg), acc_neg = sum_j exp2(c*q.n_j - m_neg)*n_j;
    pos = q.k, pos2 = c*pos. With m = max(m_neg, pos2), w = exp2(m_neg - m), w0 = exp2(pos2 - m):
        loss  = ln2*(m - pos2) + log1p(w*l_neg + (w0 - 1))   (= log1p(l_neg) when pos is the max)
        delta = (acc_neg - l_neg*k) * w / (w0 + w*l_neg)      (a = w / (w0 + w*l_neg), b = -l_neg*a)
    The positive is never a term of a sum that is then subtracted (docs/design.md "Numerics").
    Shared by the combine kernel and the split kernel's FINALIZE epilogue."""
    m = tl.maximum(m_neg, pos2)
    w = tl.exp2(m_neg - m)  # 0 when K = 0
    w0 = tl.exp2(pos2 - m)
    l_all = l_neg * w
    # w0 - 1 is exactly 0 when the positive is the max, so K = 0 gives log1p(0) = 0.
    loss = (m - pos2) * LN2 + log1p(l_all + tl.where(m > pos2, w0 - 1.0, 0.0))
    a = w / (w0 + l_all)
    return loss, pos * scale + loss, a, -l_neg * a


@triton.jit
def infonce_combine_kernel(
    m_ptr,
    l_ptr,
    o_ptr,
    r_ptr,
    pos_ptr,
    k_ptr,
    loss_ptr,
    lse_ptr,
    delta_ptr,
    rank_ptr,
    B,
    d,
    num_splits,
    scale,
    qk_scale,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
    D_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < B
    mask = row_ok[:, None] & (cols < d)[None, :]
    rc_off = rows.to(tl.int64)[:, None] * d + cols[None, :]

    pos = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    pos2 = pos * qk_scale
    # Pass 1: the global max (the positive's logit is part of it, so it is finite and every w <= 1).
    m_all = pos2
    for s0 in range(0, num_splits, BLOCK_S):
        for u in tl.static_range(BLOCK_S):
            s = s0 + u
            m_s = tl.load(m_ptr + s * B + rows, mask=row_ok & (s < num_splits), other=float("-inf"))
            m_all = tl.maximum(m_all, m_s)
    # Pass 2: rescale and add the negatives' partials (the positive stays apart).
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    l_all = tl.zeros([BLOCK_M], tl.float32)
    rank = tl.zeros([BLOCK_M], tl.int32)
    for s0 in range(0, num_splits, BLOCK_S):
        for u in tl.static_range(BLOCK_S):
            s = s0 + u
            s_ok = s < num_splits
            sm_off = s * B + rows
            sm_mask = row_ok & s_ok
            w = tl.exp2(tl.load(m_ptr + sm_off, mask=sm_mask, other=float("-inf")) - m_all)  # empty: 0
            l_all += tl.load(l_ptr + sm_off, mask=sm_mask, other=0.0) * w
            rank += tl.load(r_ptr + sm_off, mask=sm_mask, other=0)
            o = tl.load(o_ptr + s.to(tl.int64) * B * d + rc_off, mask=mask & s_ok, other=0.0)
            acc += o * w[:, None]
    loss, lse, a, b = _merge_positive(pos, pos2, m_all, l_all, scale)
    kp = tl.load(k_ptr + rc_off, mask=mask, other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(delta_ptr + rc_off, acc * a[:, None] + kp * b[:, None], mask=mask)
    tl.store(rank_ptr + rows, rank.to(tl.int64), mask=row_ok)


def combine_(plan: H.FwdPlan, m_part, l_part, o_part, r_part, pos, k, loss, lse, delta, rank, scale, qk_scale) -> None:
    """Launch the combine of ``plan.splits`` partials into loss, lse, delta, rank (the caller holds the
    device guard). Shapes as in the module docstring; scale, qk_scale Python floats."""
    B, d = k.shape
    infonce_combine_kernel[(plan.combine_grid,)](
        m_part,
        l_part,
        o_part,
        r_part,
        pos,
        k,
        loss,
        lse,
        delta,
        rank,
        B,
        d,
        plan.splits,
        scale,
        qk_scale,
        BLOCK_M=plan.combine_block_m,
        BLOCK_S=plan.combine_block_s,
        D_PAD=plan.d_pad,
        num_warps=4,
    )
