"""Memory-bank update (InstDisc / NPID), one launch after a finiteness reduction, no host sync.

    bank[idx_b] <- normalize(m * bank[idx_b] + (1 - m) * f_b)      (x / max(|x|, 1e-12), fp32 math)

Shapes / dtypes: bank (N, d) fp32 | bf16 | fp16, written in place; idx (B,) int64 in [0, N);
features (B, d) fp32 | bf16 | fp16; ok (1,) bool (all features finite: computed by the launcher
before the launch, so the update is all-or-nothing without a grid-wide barrier).

Duplicate indices: only the LAST occurrence of an index in the batch writes (with its own feature),
so exactly one program reads and writes each bank row: no race, deterministic. Each program finds
its rows' later duplicates by scanning the indices after its block (B^2/2 integer compares for the
whole batch; B is a global batch, a few thousand at most). Grid: one program per BLOCK_R rows.
"""

import torch
import triton
import triton.language as tl

from . import heuristics as H
from .runtime import device_guard


@triton.jit
def memory_bank_update_kernel(
    bank_ptr, idx_ptr, f_ptr, ok_ptr, B, d, momentum, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, D_PAD: tl.constexpr
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < B
    col_ok = cols < d
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    later = tl.zeros([BLOCK_R], tl.int32)
    offs = tl.arange(0, BLOCK_B)
    for b0 in range(pid * BLOCK_R, B, BLOCK_B):
        other = b0 + offs
        other_ok = other < B
        oidx = tl.load(idx_ptr + other, mask=other_ok, other=-1)
        dup = (oidx[None, :] == idx[:, None]) & (other[None, :] > rows[:, None]) & other_ok[None, :]
        later += tl.sum(dup.to(tl.int32), axis=1)
    ok = tl.load(ok_ptr).to(tl.int32)
    write = row_ok & (later == 0) & (ok != 0)
    wmask = write[:, None] & col_ok[None, :]
    b_off = idx.to(tl.int64)[:, None] * d + cols[None, :]
    v = tl.load(bank_ptr + b_off, mask=wmask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + rows.to(tl.int64)[:, None] * d + cols[None, :], mask=wmask, other=0.0).to(tl.float32)
    u = v * momentum + f * (1.0 - momentum)
    norm = tl.sqrt(tl.sum(u * u, axis=1))
    u = u / tl.maximum(norm, 1e-12)[:, None]
    tl.store(bank_ptr + b_off, u.to(bank_ptr.dtype.element_ty), mask=wmask)


def memory_bank_update_(bank, indices, features, momentum) -> torch.Tensor:
    """In place, all-or-nothing on non-finite features; returns ok (1,) bool on the bank's device."""
    B, d = features.shape
    ok = torch.isfinite(features).all().reshape(1)
    dp = H.d_pad(d)
    block_r = max(1, min(64, 4096 // dp))
    with device_guard(bank.device):
        memory_bank_update_kernel[(H.cdiv(B, block_r),)](
            bank, indices, features, ok, B, d, float(momentum), BLOCK_R=block_r, BLOCK_B=256, D_PAD=dp, num_warps=4
        )
    return ok
