"""Momentum (EMA) update, in place: target <- target + w*(source - target) with w = 1 - momentum
(a lerp, computed in fp32 and rounded once to the storage dtype), and ``momentum_update_``, its
launcher with the chunk-table cache.

momentum_flat_kernel -- one contiguous target and one contiguous source of N elements
    (fp32 | bf16 | fp16, same dtype): one program per BLOCK elements. Every program but the last
    runs unmasked (16-byte vector accesses: LDG.E.128 / STG.E.128 for fp32); only the last, partial
    block is masked, so an N that is not a multiple of 16 (ResNet-50: 25,557,032) keeps the vectors.

momentum_multi_kernel -- a whole parameter list in one launch. The host builds a chunk table
    (R, 3) int64 of [target address, source address, length] rows, every row at most CHUNK
    elements of one tensor; program r updates row r. Addresses become pointers with an int->ptr
    bitcast (works on the GPU and in TRITON_INTERPRET=1, whose pointers are real host addresses).
    The body runs unmasked BLOCK-wide steps (16-byte vector accesses when ALIGNED, i.e. the host
    checked that every address is 16-byte aligned) and one masked step for the tail.
"""

import collections

import torch
import triton
import triton.language as tl

from . import heuristics as H
from . import runtime as R


@triton.jit
def _lerp(t_ptrs, s_ptrs, w, mask, MASKED: tl.constexpr):
    # t + w*(s - t) in fp32, one rounding to the storage dtype.
    if MASKED:
        t = tl.load(t_ptrs, mask=mask).to(tl.float32)
        s = tl.load(s_ptrs, mask=mask).to(tl.float32)
        tl.store(t_ptrs, (t + w * (s - t)).to(t_ptrs.dtype.element_ty), mask=mask)
    else:
        t = tl.load(t_ptrs).to(tl.float32)
        s = tl.load(s_ptrs).to(tl.float32)
        tl.store(t_ptrs, (t + w * (s - t)).to(t_ptrs.dtype.element_ty))


@triton.jit
def momentum_flat_kernel(t_ptr, s_ptr, N, weight, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    t_ptrs = t_ptr + start + offs
    s_ptrs = s_ptr + start + offs
    w = weight  # an fp32 scalar argument, 1 - momentum
    if start + BLOCK <= N:
        _lerp(t_ptrs, s_ptrs, w, offs < BLOCK, False)
    else:
        _lerp(t_ptrs, s_ptrs, w, start + offs < N, True)


@triton.jit
def momentum_multi_kernel(table_ptr, weight, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * 3
    t_base = tl.load(table_ptr + row).to(tl.pointer_type(DTYPE), bitcast=True)
    s_base = tl.load(table_ptr + row + 1).to(tl.pointer_type(DTYPE), bitcast=True)
    n = tl.load(table_ptr + row + 2).to(tl.int32)  # <= CHUNK < 2**31
    if ALIGNED:
        t_base = tl.multiple_of(t_base, 16)
        s_base = tl.multiple_of(s_base, 16)
    w = weight  # an fp32 scalar argument, 1 - momentum
    offs = tl.arange(0, BLOCK)
    n_full = (n // BLOCK) * BLOCK
    for start in range(0, n_full, BLOCK):
        _lerp(t_base + start + offs, s_base + start + offs, w, offs < BLOCK, False)
    tail = n_full + offs
    _lerp(t_base + tail, s_base + tail, w, tail < n, True)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------

_TABLES: collections.OrderedDict = collections.OrderedDict()
_TABLES_MAX = 16


def _as_span(ts) -> torch.Tensor | None:
    """A 1-D view covering ts if they lie back to back in one storage (a flat buffer), else None."""
    first = ts[0]
    es = first.element_size()
    storage = first.untyped_storage().data_ptr()
    addr = first.data_ptr()
    total = 0
    for t in ts:
        if t.untyped_storage().data_ptr() != storage or t.data_ptr() != addr + total * es:
            return None
        total += t.numel()
    return first.as_strided((total,), (1,))


def _chunk_table(targets, sources) -> tuple[torch.Tensor, bool]:
    """(R, 3) int64 [target addr, source addr, length] table on the targets' device, and whether
    every address is 16-byte aligned; cached by the tensors' addresses and sizes (LRU, 16 entries).

    A miss on CUDA builds the table in pinned host memory and copies it with non_blocking=True (no
    pageable copy, no host sync); the pinned source stays in the cache entry, alive until evicted.
    """
    t_ptrs = tuple(t.data_ptr() for t in targets)
    s_ptrs = tuple(s.data_ptr() for s in sources)
    sizes = tuple(t.numel() for t in targets)
    dev = targets[0].device
    key = (str(dev), targets[0].dtype, t_ptrs, s_ptrs, sizes)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit[0], hit[1]
    es = targets[0].element_size()
    rows = []
    chunk = H.MOMENTUM_CHUNK
    for ta, sa, n in zip(t_ptrs, s_ptrs, sizes):
        for off in range(0, n, chunk):
            rows.append((ta + off * es, sa + off * es, min(chunk, n - off)))
    aligned = all(a % 16 == 0 for a in t_ptrs + s_ptrs)
    host = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
    if dev.type == "cuda":
        host = host.pin_memory()
        table = torch.empty_like(host, device=dev)
        table.copy_(host, non_blocking=True)
    else:
        table = host
    _TABLES[key] = (table, aligned, host)
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table, aligned


def momentum_update_(targets, sources, momentum, exact=False) -> None:
    """In place, for every pair: target <- target + (1 - momentum)*(source - target) (fp32 math,
    one rounding). Tensors: one device, one dtype (fp32 | bf16 | fp16), contiguous, pairwise equal
    sizes. Back-to-back views of one buffer (or a single pair) take the flat kernel, any other list
    the multi-tensor kernel (one launch either way). There is no ``exact`` (two-rounding) mode: the
    backend's SUPPORT says so, and the selection never asks for it."""
    if exact:
        raise ValueError("the triton backend has no exact (two-rounding) momentum mode; use backend='torch'")
    targets, sources = list(targets), list(sources)
    if len(targets) != len(sources):
        raise ValueError(f"momentum_update_: {len(targets)} targets but {len(sources)} sources")
    pairs = [(t, s) for t, s in zip(targets, sources) if t.numel() > 0]
    if not pairs:
        return
    targets = [t for t, _ in pairs]
    sources = [s for _, s in pairs]
    dtype = targets[0].dtype
    R.check_float("targets", targets[0])
    for t, s in pairs:
        if t.dtype != dtype or s.dtype != dtype or t.numel() != s.numel():
            raise ValueError("momentum_update_: targets and sources must share one dtype and pairwise sizes")
        if not (t.is_contiguous() and s.is_contiguous()):
            raise ValueError("momentum_update_: tensors must be contiguous")
    w = 1.0 - float(momentum)
    t_span = targets[0].view(-1) if len(targets) == 1 else _as_span(targets)
    s_span = sources[0].view(-1) if len(sources) == 1 else _as_span(sources)
    with R.device_guard(targets[0].device):
        if t_span is not None and s_span is not None:
            n = t_span.numel()
            momentum_flat_kernel[(H.cdiv(n, H.MOMENTUM_BLOCK),)](
                t_span, s_span, n, w, BLOCK=H.MOMENTUM_BLOCK, num_warps=H.MOMENTUM_WARPS
            )
            return
        table, aligned = _chunk_table(targets, sources)
        momentum_multi_kernel[(table.shape[0],)](
            table, w, DTYPE=R.TL_DTYPE[dtype], BLOCK=H.MOMENTUM_BLOCK, ALIGNED=aligned, num_warps=H.MOMENTUM_WARPS
        )
