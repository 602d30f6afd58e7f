"""Python launchers: allocate outputs, pick configs (kernels/heuristics.py), launch.

These are the five functions of the internal backend interface (moco_fast/backends.py); the
inputs arrive validated (2-D, contiguous, one device, matching d). Under TRITON_INTERPRET=1 the
same launchers run the kernels on CPU tensors.
"""

from __future__ import annotations

import collections
import functools
import math
import os

import torch
import triton.language as tl

from . import heuristics as H
from .enqueue import enqueue_kernel
from .infonce_bwd import infonce_bwd_negatives_kernel, infonce_bwd_qk_kernel
from .infonce_combine import infonce_combine_kernel
from .infonce_fwd import infonce_fwd_split_kernel
from .momentum import momentum_flat_kernel, momentum_multi_kernel

LOG2E = 1.4426950408889634
# @triton.jit returns an InterpretedFunction when TRITON_INTERPRET=1 was set before triton's import.
INTERPRETED = type(infonce_fwd_split_kernel).__name__ == "InterpretedFunction"

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}
_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_float(name: str, t: torch.Tensor, allowed=_FLOATS) -> None:
    if t.dtype not in allowed:
        raise TypeError(f"moco_fast triton backend: {name} must be one of {allowed}, got {t.dtype}")


def _precision() -> str:
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.cache
def _device_info(device: torch.device) -> tuple[int, tuple[int, int]]:
    """(SM count, compute capability); the interpreter gets a 1-SM view (no splits by default)."""
    if device.type == "cuda" and not INTERPRETED:
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, (props.major, props.minor)
    return 1, (9, 0)


def _dot_setup(q: torch.Tensor, n: torch.Tensor):
    name = H.dot_dtype_name(_NAME[q.dtype], _NAME[n.dtype])
    return name, getattr(tl, name), _precision()


# --------------------------------------------------------------------------------------------
# InfoNCE forward
# --------------------------------------------------------------------------------------------


def infonce_forward(q, k, negatives, scale, need_rank=True, *, num_splits=None, config=None, fuse=None):
    """(loss (B,) fp32, lse (B,) fp32, out (B, d) fp32, rank (B,) int64). See infonce_fwd.py.

    The rank is counted for free by the sweep, so ``need_rank`` is accepted and ignored.

    num_splits / config (a heuristics.TileConfig) / fuse (finalize a single split in the split
    kernel) override the heuristics (tests, autotuning).
    """
    for name, t in (("q", q), ("k", k), ("negatives", negatives)):
        _check_float(name, t)
    B, d = q.shape
    K = negatives.shape[0]
    dev = q.device
    lse = torch.empty(B, dtype=torch.float32, device=dev)
    out = torch.empty(B, d, dtype=torch.float32, device=dev)
    rank = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return lse.clone(), lse, out, rank
    dp = H.d_pad(d)
    dot_name, dot_tl, prec = _dot_setup(q, negatives)
    num_sms, cc = _device_info(dev)
    if config is None and num_splits is None and _autotune_enabled(dev):
        config, num_splits = _autotuned_fwd(q, k, negatives, scale)
    cfg = config or H.fwd_config(dp, dot_name, cc, INTERPRETED, prec)
    row_blocks = H.cdiv(B, cfg.block_m)
    n_tiles = H.cdiv(K, cfg.block_n)
    if num_splits is None:
        num_splits = H.num_splits(row_blocks, n_tiles, num_sms)
    num_splits = max(1, min(int(num_splits), max(1, n_tiles)))
    kps = max(1, H.cdiv(n_tiles, num_splits)) * cfg.block_n  # keys per split, a multiple of BLOCK_N
    splits = max(1, H.cdiv(K, kps))  # no empty split
    qk_scale = float(scale) * LOG2E
    meta = dict(
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        D_PAD=dp,
        EVEN_K=(K % cfg.block_n == 0),
        EVEN_D=(d == dp),
        DOT_DTYPE=dot_tl,
        PRECISION=prec,
        EMULATE=INTERPRETED,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if fuse is None:
        fuse = H.fuse_single_split(dp, dot_name, cc, INTERPRETED)
    if splits == 1 and fuse:
        # K == 0 lands here too: the loop is empty and only the positive is merged.
        infonce_fwd_split_kernel[(row_blocks, 1)](
            q, k, negatives, lse, lse, out, rank, lse, B, K, d, kps, qk_scale, FINALIZE=True, **meta
        )
        return _row_loss(lse, q, k, scale), lse, out, rank
    # One workspace allocation for all partials: O (S, B, d) first (keeps its 16-byte alignment),
    # then m, l, rank (S, B) each and pos (B,).
    sb = splits * B
    ws = torch.empty(sb * (d + 3) + B, dtype=torch.float32, device=dev)
    o_part = ws[: sb * d]
    m_part, l_part = ws[sb * d : sb * (d + 1)], ws[sb * (d + 1) : sb * (d + 2)]
    r_part = ws[sb * (d + 2) : sb * (d + 3)].view(torch.int32)
    pos = ws[sb * (d + 3) :]
    infonce_fwd_split_kernel[(row_blocks, splits)](
        q, k, negatives, m_part, l_part, o_part, r_part, pos, B, K, d, kps, qk_scale, FINALIZE=False, **meta
    )
    bmc = H.combine_block_m(B, num_sms, dp)
    infonce_combine_kernel[(H.cdiv(B, bmc),)](
        m_part,
        l_part,
        o_part,
        r_part,
        pos,
        k,
        lse,
        out,
        rank,
        B,
        d,
        splits,
        qk_scale,
        BLOCK_M=bmc,
        BLOCK_S=H.combine_block_s(bmc, dp),
        D_PAD=dp,
        num_warps=4,
    )
    return _row_loss(lse, q, k, scale), lse, out, rank


def _row_loss(lse, q, k, scale):
    # TODO(kernels): write the per-row loss from the kernels instead of these extra torch ops.
    return lse - (q.float() * scale * k.float()).sum(dim=1)


# --------------------------------------------------------------------------------------------
# InfoNCE backward
# --------------------------------------------------------------------------------------------


def infonce_backward(grad, q, k, lse, out, scale):
    """(dq in q.dtype, dk in k.dtype), both (B, d). See infonce_bwd.py."""
    B, d = q.shape
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    if B == 0:
        return dq, dk
    grad = grad.to(torch.float32).contiguous()
    dp = H.d_pad(d)
    bm = H.bwd_qk_block_m(dp)
    infonce_bwd_qk_kernel[(H.cdiv(B, bm),)](
        grad, q, k, lse.contiguous(), out.contiguous(), dq, dk, B, d, float(scale), BLOCK_M=bm, D_PAD=dp, num_warps=4
    )
    return dq, dk


def infonce_backward_negatives(grad, q, negatives, lse, scale, *, config=None):
    """dn (K, d) in negatives.dtype. See infonce_bwd.py."""
    K, d = negatives.shape
    B = q.shape[0]
    dn = torch.empty_like(negatives)
    if K == 0:
        return dn
    if B == 0:
        return dn.zero_()
    grad = grad.to(torch.float32).contiguous()
    dp = H.d_pad(d)
    dot_name, dot_tl, prec = _dot_setup(q, negatives)
    _, cc = _device_info(q.device)
    cfg = config or H.bwd_dn_config(dp, dot_name, cc, INTERPRETED, prec)
    infonce_bwd_negatives_kernel[(H.cdiv(K, cfg.block_n),)](
        grad,
        q,
        negatives,
        lse.contiguous(),
        dn,
        B,
        K,
        d,
        float(scale),
        float(scale) * LOG2E,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        D_PAD=dp,
        EVEN_D=(d == dp),
        DOT_DTYPE=dot_tl,
        PRECISION=prec,
        EMULATE=INTERPRETED,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return dn


# --------------------------------------------------------------------------------------------
# Momentum update
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
    """(R, 3) int64 [target addr, source addr, length] table, cached by the tensors' addresses."""
    t_ptrs = tuple(t.data_ptr() for t in targets)
    s_ptrs = tuple(s.data_ptr() for s in sources)
    sizes = tuple(t.numel() for t in targets)
    dev = targets[0].device
    key = (str(dev), targets[0].dtype, t_ptrs, s_ptrs, sizes)
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    es = targets[0].element_size()
    rows = []
    chunk = H.MOMENTUM_CHUNK
    for ta, sa, n in zip(t_ptrs, s_ptrs, sizes):
        for off in range(0, n, chunk):
            rows.append((ta + off * es, sa + off * es, min(chunk, n - off)))
    aligned = all(a % 16 == 0 for a in t_ptrs + s_ptrs)
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3).to(dev)
    _TABLES[key] = (table, aligned)
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return table, aligned


def momentum_update_(targets, sources, momentum, exact=False) -> None:
    """In place: target <- momentum*target + (1-momentum)*source for every pair. See momentum.py."""
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
    _check_float("targets", targets[0])
    for t, s in pairs:
        if t.dtype != dtype or s.dtype != dtype or t.numel() != s.numel():
            raise ValueError("momentum_update_: targets and sources must share one dtype and pairwise sizes")
        if not (t.is_contiguous() and s.is_contiguous()):
            raise ValueError("momentum_update_: tensors must be contiguous")
    m = float(momentum)
    t_span = targets[0].view(-1) if len(targets) == 1 else _as_span(targets)
    s_span = sources[0].view(-1) if len(sources) == 1 else _as_span(sources)
    if t_span is not None and s_span is not None:
        n = t_span.numel()
        momentum_flat_kernel[(H.cdiv(n, H.MOMENTUM_BLOCK),)](
            t_span, s_span, n, m, BLOCK=H.MOMENTUM_BLOCK, num_warps=H.MOMENTUM_WARPS
        )
        return
    table, aligned = _chunk_table(targets, sources)
    momentum_multi_kernel[(table.shape[0],)](
        table, m, DTYPE=_TL[dtype], BLOCK=H.MOMENTUM_BLOCK, ALIGNED=aligned, num_warps=H.MOMENTUM_WARPS
    )


# --------------------------------------------------------------------------------------------
# Queue enqueue
# --------------------------------------------------------------------------------------------


def enqueue_(queue, ptr, count, keys, normalize) -> torch.Tensor:
    """Write keys into the ring buffer at ptr, advance ptr/count on the device; returns ok (1,) bool."""
    allowed = _FLOATS + (torch.float64,)
    _check_float("queue", queue, allowed)
    _check_float("keys", keys, allowed)
    K, d = queue.shape
    B = keys.shape[0]
    if not 1 <= B <= K:
        raise ValueError(f"enqueue_: need 1 <= B <= K, got B={B}, K={K}")
    if ptr.dtype != torch.int64 or count.dtype != torch.int64:
        raise TypeError("enqueue_: ptr and count must be int64 tensors")
    ok = torch.empty(1, dtype=torch.bool, device=queue.device)
    dp = H.d_pad(d)
    compute = tl.float64 if torch.float64 in (queue.dtype, keys.dtype) else tl.float32
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


# --------------------------------------------------------------------------------------------
# Optional autotuning (MOCO_FAST_TRITON_AUTOTUNE=1, CUDA only)
# --------------------------------------------------------------------------------------------

_TUNED: dict = {}


def _autotune_enabled(device: torch.device) -> bool:
    return (
        device.type == "cuda" and not INTERPRETED and os.environ.get("MOCO_FAST_TRITON_AUTOTUNE", "0") not in ("", "0")
    )


def _autotuned_fwd(q, k, negatives, scale):
    """Best (TileConfig, num_splits) for this problem class, timed once per key and cached."""
    B, d = q.shape
    K = negatives.shape[0]
    bucket = lambda x: 1 << max(0, int(x) - 1).bit_length()  # noqa: E731 - next power of two
    key = (q.device.index, bucket(B), bucket(K), d, q.dtype, k.dtype, negatives.dtype, _precision())
    if key in _TUNED:
        return _TUNED[key]
    from triton.testing import do_bench

    num_sms, _ = _device_info(q.device)
    dp = H.d_pad(d)
    best, best_t = (None, None), math.inf
    for cfg in H.fwd_candidates(dp, H.dot_dtype_name(_NAME[q.dtype], _NAME[negatives.dtype]), _precision()):
        base = H.num_splits(H.cdiv(B, cfg.block_m), H.cdiv(K, cfg.block_n), num_sms)
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
