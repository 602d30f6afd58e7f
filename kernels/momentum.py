"""Momentum (EMA) update, target <- m*target + (1-m)*source, in place, in fp32 math (t*m + s*(1-m)).

momentum_flat_kernel -- one contiguous target and one contiguous source of N elements
    (fp32 | bf16 | fp16, same dtype): one program per BLOCK elements.

momentum_multi_kernel -- a whole parameter list in one launch. The host builds a chunk table
    (R, 3) int64 of [target address, source address, length] rows, every row at most CHUNK
    elements of one tensor; program r updates row r. Addresses become pointers with an int->ptr
    bitcast (works on the GPU and in TRITON_INTERPRET=1, whose pointers are real host addresses).
    The body runs unmasked BLOCK-wide steps (16-byte vector accesses when ALIGNED, i.e. the host
    checked that every address is 16-byte aligned) and one masked step for the tail.
"""

import triton
import triton.language as tl


@triton.jit
def momentum_flat_kernel(t_ptr, s_ptr, N, momentum, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
    m = momentum  # an fp32 scalar argument
    tl.store(t_ptr + offs, (t * m + s * (1.0 - m)).to(t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ema(t_ptrs, s_ptrs, m, mask, MASKED: tl.constexpr):
    if MASKED:
        t = tl.load(t_ptrs, mask=mask).to(tl.float32)
        s = tl.load(s_ptrs, mask=mask).to(tl.float32)
        tl.store(t_ptrs, (t * m + s * (1.0 - m)).to(t_ptrs.dtype.element_ty), mask=mask)
    else:
        t = tl.load(t_ptrs).to(tl.float32)
        s = tl.load(s_ptrs).to(tl.float32)
        tl.store(t_ptrs, (t * m + s * (1.0 - m)).to(t_ptrs.dtype.element_ty))


@triton.jit
def momentum_multi_kernel(table_ptr, momentum, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * 3
    t_base = tl.load(table_ptr + row).to(tl.pointer_type(DTYPE), bitcast=True)
    s_base = tl.load(table_ptr + row + 1).to(tl.pointer_type(DTYPE), bitcast=True)
    n = tl.load(table_ptr + row + 2).to(tl.int32)  # <= CHUNK < 2**31
    if ALIGNED:
        t_base = tl.multiple_of(t_base, 16)
        s_base = tl.multiple_of(s_base, 16)
    m = momentum  # an fp32 scalar argument
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        _ema(t_base + start + offs, s_base + start + offs, m, offs < BLOCK, False)
    tail = n_full + offs
    _ema(t_base + tail, s_base + tail, m, tail < n, True)
