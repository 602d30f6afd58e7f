"""Ring-buffer enqueue of B keys into a (K, d) queue, all on the device, one launch, no host sync.

Shapes / dtypes:
    queue (K, d)   fp32 | bf16 | fp16 | fp64       written in place
    ptr, count (1,) int64                          read, then advanced in place
    keys  (B, d)   fp32 | bf16 | fp16 | fp64,  1 <= B <= K
    ok    (1,) bool                                written: all keys finite

Semantics: if any key value is NaN/Inf nothing is written (queue, ptr, count untouched) and ok is
False; else row (ptr + i) mod K <- keys[i] (L2-normalized first when NORMALIZE, x / max(|x|, 1e-12)
as F.normalize, in COMPUTE precision), cast to the queue dtype (through fp32 unless the queue is fp64);
ptr <- (ptr + B) mod K;
count <- min(count + B, K).

Design: a single program. All-or-nothing needs the verdict on every key before the first write,
and programs of one grid cannot wait for each other, so one program does a check pass and then a
write pass (the keys are re-read from L2). An enqueue is B*d elements (64 KB at B=256, d=128):
launch latency dominates, not bandwidth. The ptr/count loads happen before the check pass whose
cross-warp reductions end in a barrier, so no warp can overwrite ptr before every warp has read it.

Launcher: ``enqueue_``.
"""

import torch
import triton
import triton.language as tl

from . import heuristics as H
from . import runtime as R


@triton.jit
def enqueue_kernel(
    queue_ptr,
    ptr_ptr,
    count_ptr,
    keys_ptr,
    ok_ptr,
    B,
    K,
    d,
    NORMALIZE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    D_PAD: tl.constexpr,
):
    head = tl.load(ptr_ptr)
    count = tl.load(count_ptr)
    head = ((head % K) + K) % K  # tolerate a pointer outside [0, K)
    tl.debug_barrier()

    r = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, D_PAD)
    col_ok = cols < d
    # Check pass: count non-finite values (|x| < inf is False for NaN and +-Inf).
    bad = tl.zeros([BLOCK_R], tl.int32)
    for i in range(0, B, BLOCK_R):
        mask = ((i + r) < B)[:, None] & col_ok[None, :]
        x = tl.load(keys_ptr + (i + r)[:, None] * d + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
        bad += tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1)
    ok = tl.sum(bad, axis=0) == 0
    tl.store(ok_ptr, ok)
    if ok:
        for i in range(0, B, BLOCK_R):
            row_ok = (i + r) < B
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(keys_ptr + (i + r)[:, None] * d + cols[None, :], mask=mask, other=0.0).to(COMPUTE)
            if NORMALIZE:
                norm = tl.sqrt(tl.sum(x * x, axis=1))
                x = x / tl.maximum(norm, 1e-12)[:, None]
            dst = head + i + r  # < 2K since head < K and i + r < B <= K: no 64-bit modulo per row
            dst = tl.where(dst >= K, dst - K, dst)
            dst_ptrs = queue_ptr + dst[:, None] * d + cols[None, :]
            if queue_ptr.dtype.element_ty != tl.float64:
                # fp64 keys into an fp32/half queue round through fp32: the interpreter casts fp64 -> bf16
                # as an integer conversion (zeros), and the kernels do no half arithmetic (design.md).
                x = x.to(tl.float32)
            tl.store(dst_ptrs, x.to(queue_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        new_head = head + B
        tl.store(ptr_ptr, tl.where(new_head >= K, new_head - K, new_head))
        tl.store(count_ptr, tl.minimum(count + B, K))


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

_ALLOWED = R.FLOATS + (torch.float64,)


def enqueue_(queue, ptr, count, keys, normalize) -> torch.Tensor:
    """Write keys (B, d) into the ring buffer queue (K, d) at ptr, advance ptr/count ((1,) int64)
    on the device; returns ok (1,) bool (False: a key was NaN/Inf and nothing was written)."""
    R.check_float("queue", queue, _ALLOWED)
    R.check_float("keys", keys, _ALLOWED)
    K, d = queue.shape
    B = keys.shape[0]
    if not 1 <= B <= K:
        raise ValueError(f"enqueue_: need 1 <= B <= K, got B={B}, K={K}")
    if ptr.dtype != torch.int64 or count.dtype != torch.int64:
        raise TypeError("enqueue_: ptr and count must be int64 tensors")
    ok = torch.empty(1, dtype=torch.bool, device=queue.device)
    dp = H.d_pad(d)
    compute = tl.float64 if torch.float64 in (queue.dtype, keys.dtype) else tl.float32
    with R.device_guard(queue.device):
        enqueue_kernel[(1,)](
            queue,
            ptr,
            count,
            keys,
            ok,
            B,
            K,
            d,
            NORMALIZE=bool(normalize),
            COMPUTE=compute,
            BLOCK_R=H.enqueue_block_r(dp),
            D_PAD=dp,
            num_warps=8,
        )
    return ok
