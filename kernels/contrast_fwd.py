"""Contrastive cross-entropy forward: one sweep of query rows over a chunk of the keys.

The op (moco_fast.backends, "contrast"): queries q (M, d), keys (N, d), per-row target column t_i and
optional excluded column e_i; loss_i = lse_{j != e_i}(s*q_i.k_j) - s*q_i.k_{t_i}. NT-Xent (keys = q,
e = self), MoCo v3 (keys = gathered momentum keys), CMC (keys = another view) and the memory bank's
exact softmax (keys = the bank) are all this kernel.

Program (pid_m, pid_s) owns query rows [pid_m*BLOCK_M, +BLOCK_M) and keys
[pid_s*keys_per_split, +keys_per_split) (a multiple of BLOCK_N). As InfoNCE's sweep holds the negatives
and not the positive, this one holds the keys other than the target (the target column and the
excluded one are masked to -inf per tile); per row, in fp32 and the log2 domain:

    m    running max of  c*q.k_j   over j < N, j != t_i, j != e_i   (c = scale*log2(e))
    l    running sum of  exp2(c*q.k_j - m)
    acc  running sum of  exp2(c*q.k_j - m) * k_j                    (flash attention with V = K)
    rank #{those j : q.k_j > q.k_{t_i}}

The target's logit pos_i = q_i.k_{t_i} is computed in plain fp32 from the gathered target row and joins
at the end through infonce_combine._merge_positive (loss = ln2*(m - pos2) + log1p(...), delta = O - k_t
= a*acc + b*k_t, exact when the loss -> 0; docs/design.md "Numerics"). A split with no key for a row
keeps m = -inf: exp2 is then taken against 0, not -inf.

Shapes / dtypes (row-major, contiguous, row stride d):
    q (M, d), keys (N, d)   fp32 | bf16 | fp16
    target (M,) int64 in [0, N); exclude (M,) int64 in [-1, N) (HAS_EXCL; -1 = none)
    split outputs (FINALIZE=False): m_part, l_part (S, M) fp32; o_part (S, M, d) fp32 (unnormalized
        acc); r_part (S, M) int32; pos (M,) fp32 (unscaled, written by split 0) — InfoNCE's partials,
        merged by infonce_combine_kernel against the gathered target rows
    final outputs (FINALIZE=True, a single split): loss (M,), lse (M,) natural log, dloss_dq (M, d)
        = scale*(O - k_t), rank (M,) int64 (written through m/l/o/r pointer slots, see launcher)

Dot dtype rules are infonce_fwd.py's (equal half types on tensor cores, any mix promoted to fp32,
PRECISION for fp32 dots, EMULATE in the interpreter).
"""

import dataclasses

import torch
import triton
import triton.language as tl

from moco_fast.numerics import LOG2E as _LOG2E

from . import heuristics as H
from .infonce_combine import _merge_positive, infonce_combine_kernel
from .infonce_fwd import _dot
from .runtime import INTERPRETED, device_guard, device_info, dot_setup


@triton.jit
def contrast_fwd_kernel(
    q_ptr,
    k_ptr,
    t_ptr,
    e_ptr,
    m_ptr,  # FINALIZE: loss
    l_ptr,  # FINALIZE: lse
    o_ptr,  # FINALIZE: dloss_dq
    r_ptr,  # FINALIZE: rank (int64)
    pos_ptr,
    M,
    N,
    d,
    keys_per_split,
    scale,
    qk_scale,  # scale * log2(e)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_EXCL: tl.constexpr,
    FINALIZE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < M
    col_ok = cols < d
    qmask = row_ok[:, None] & col_ok[None, :]
    rc_off = rows.to(tl.int64)[:, None] * d + cols[None, :]

    q = tl.load(q_ptr + rc_off, mask=qmask, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=0)
    t_off = tgt.to(tl.int64)[:, None] * d + cols[None, :]
    kt = tl.load(k_ptr + t_off, mask=qmask, other=0.0)
    pos = tl.sum(q.to(tl.float32) * kt.to(tl.float32), axis=1)  # exact products of half inputs
    if HAS_EXCL:
        exc = tl.load(e_ptr + rows, mask=row_ok, other=-1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    rank = tl.zeros([BLOCK_M], tl.int32)

    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N)
    offs = tl.arange(0, BLOCK_N)
    for j in range(start, end, BLOCK_N):
        key = j + offs
        key_ok = key < N
        k_mask = key_ok[:, None] & col_ok[None, :]
        kb = tl.load(k_ptr + key.to(tl.int64)[:, None] * d + cols[None, :], mask=k_mask, other=0.0)
        s = _dot(q, tl.trans(kb), DOT_DTYPE, PRECISION, EMULATE)  # (BLOCK_M, BLOCK_N) fp32, unscaled
        valid = key_ok[None, :] & (key[None, :] != tgt[:, None])  # the target joins at the end
        if HAS_EXCL:
            valid = valid & (key[None, :] != exc[:, None])
        s = tl.where(valid, s, float("-inf"))
        rank += tl.sum((s > pos[:, None]).to(tl.int32), axis=1)
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far excluded: exp2(-inf) = 0
        p = tl.exp2(s * qk_scale - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p, kb, DOT_DTYPE, PRECISION, EMULATE)
        m_i = m_new

    if FINALIZE:
        loss, lse, a, b = _merge_positive(pos, pos * qk_scale, m_i, l_i, scale)
        acc = acc * (a * scale)[:, None]
        kt = tl.load(k_ptr + t_off, mask=qmask, other=0.0).to(tl.float32)  # reloaded: not live in the loop
        acc += kt * (b * scale)[:, None]
        tl.store(o_ptr + rc_off, acc, mask=qmask)
        tl.store(l_ptr + rows, lse, mask=row_ok)
        tl.store(m_ptr + rows, loss, mask=row_ok)
        tl.store(r_ptr + rows, rank.to(tl.int64), mask=row_ok)
    else:
        part = pid_s.to(tl.int64) * M
        tl.store(m_ptr + part + rows, m_i, mask=row_ok)
        tl.store(l_ptr + part + rows, l_i, mask=row_ok)
        tl.store(r_ptr + part + rows, rank, mask=row_ok)
        tl.store(o_ptr + part * d + rc_off, acc, mask=qmask)
        if pid_s == 0:
            tl.store(pos_ptr + rows, pos, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launcher (the "triton" backend's contrast_forward; see moco_fast/backends.py)
# --------------------------------------------------------------------------------------------


def sweep_config(dp: int, dot_name: str, cc: tuple[int, int], interpret: bool, precision: str) -> H.TileConfig:
    """heuristics.fwd_config (InfoNCE's sweep has the same loop), with 16-row, 8-warp tiles for IEEE fp32 dots:
    the target and exclusion compares add registers, and InfoNCE's 32-row tile spills under triton 3.6 on
    sm_90 (tests/machine_code/test_contrast_kernels_compile.py)."""
    cfg = H.fwd_config(dp, dot_name, cc, interpret, precision)
    if not interpret and dot_name == "float32" and precision == "ieee":
        cfg = dataclasses.replace(cfg, block_m=min(cfg.block_m, 16), num_warps=8)
    return cfg


def contrast_forward(q, keys, target, exclude, scale, need_rank=True, *, num_splits=None, config=None, fuse=None):
    """(loss (M,) fp32, lse (M,) fp32, dloss_dq (M, d) fp32, rank (M,) int64); inputs validated.

    The rank is counted for free by the sweep, so ``need_rank`` is accepted and ignored.
    num_splits / config (a heuristics.TileConfig) / fuse (finalize a single split in the sweep
    kernel) override the heuristics (tests). Tiles and splits are InfoNCE's (same loop structure).
    """
    M, d = q.shape
    N = keys.shape[0]
    dev = q.device
    loss = torch.empty(M, dtype=torch.float32, device=dev)
    lse = torch.empty(M, dtype=torch.float32, device=dev)
    out = torch.empty(M, d, dtype=torch.float32, device=dev)
    rank = torch.empty(M, dtype=torch.int64, device=dev)
    dp = H.d_pad(d)
    dot_name, dot_tl, prec = dot_setup(q, keys)
    num_sms, cc = device_info(dev)
    cfg = config or sweep_config(dp, dot_name, cc, INTERPRETED, prec)
    row_blocks = H.cdiv(M, cfg.block_m)
    n_tiles = H.cdiv(N, cfg.block_n)
    if num_splits is None:
        num_splits = H.num_splits(row_blocks, n_tiles, num_sms)
    num_splits = max(1, min(int(num_splits), n_tiles))
    kps = H.cdiv(n_tiles, num_splits) * cfg.block_n  # keys per split, a multiple of BLOCK_N
    splits = H.cdiv(N, kps)  # no empty split
    has_excl = exclude is not None
    excl = exclude if has_excl else target  # a valid pointer the kernel never reads
    meta = dict(
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
    if fuse is None:
        fuse = H.fuse_single_split(dp, dot_name, cc, INTERPRETED)
    qk_scale = float(scale) * _LOG2E
    with device_guard(q.device):
        if splits == 1 and fuse:
            contrast_fwd_kernel[(row_blocks, 1)](
                q,
                keys,
                target,
                excl,
                loss,
                lse,
                out,
                rank,
                lse,
                M,
                N,
                d,
                kps,
                float(scale),
                qk_scale,
                FINALIZE=True,
                **meta,
            )
            return loss, lse, out, rank
        # One workspace for the partials: O (S, M, d) first (16-byte aligned), then m, l, rank (S, M), pos (M,).
        sm = splits * M
        ws = torch.empty(sm * (d + 3) + M, dtype=torch.float32, device=dev)
        o_part = ws[: sm * d]
        m_part, l_part = ws[sm * d : sm * (d + 1)], ws[sm * (d + 1) : sm * (d + 2)]
        r_part = ws[sm * (d + 2) : sm * (d + 3)].view(torch.int32)
        pos = ws[sm * (d + 3) :]
        contrast_fwd_kernel[(row_blocks, splits)](
            q,
            keys,
            target,
            excl,
            m_part,
            l_part,
            o_part,
            r_part,
            pos,
            M,
            N,
            d,
            kps,
            float(scale),
            qk_scale,
            FINALIZE=False,
            **meta,
        )
        # InfoNCE's combine merges the partials against the target rows (O(M·d), gathered once): delta = O - k_t
        k_target = keys.index_select(0, target)
        bmc = H.combine_block_m(M, num_sms, dp)
        infonce_combine_kernel[(H.cdiv(M, bmc),)](
            m_part,
            l_part,
            o_part,
            r_part,
            pos,
            k_target,
            loss,
            lse,
            out,
            rank,
            M,
            d,
            splits,
            float(scale),
            qk_scale,
            BLOCK_M=bmc,
            BLOCK_S=H.combine_block_s(bmc, dp),
            D_PAD=dp,
            num_warps=4,
        )
    return loss, lse, out.mul_(scale), rank
