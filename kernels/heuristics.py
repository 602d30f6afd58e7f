"""Launch plans: tiles, warps, pipeline stages, split counts, workspace layout -- the single source.

Pure Python (no triton, no torch import) so that the offline compile test (tests/machine_code) and
the benchmarks enumerate exactly what the launchers launch: the launchers call fwd_plan / dn_plan /
... here with the problem's shape, dtype names, precision and device (SM count, compute capability),
and these functions are memoized per problem shape, so a launch pays one dictionary lookup, not the
split search.

Forward tiles (GPU). One (BLOCK_M, d) tile of q stays resident; (BLOCK_N, d) tiles of negatives
stream through NUM_STAGES shared-memory buffers and feed both dots (s = q n^T, acc += p n), so
unlike flash attention there is one K/V tile per step, not two. The fp32 accumulator (BLOCK_M x
D_PAD) and the logits tile (BLOCK_M x BLOCK_N) live in registers.
- bf16/fp16 on sm_90: one warpgroup (4 warps) per 64-row tile, so that ~200 registers x 128 threads
  and ~64 KB of shared memory let two programs share an SM: one program's exp2/rescale (MUFU, FMA)
  overlaps the other's wgmma, which a single 8-warp program never does (its two warpgroups run the
  same phase). The price is half the arithmetic intensity per loaded tile (L2 traffic 2x that of
  128-row tiles); docs/roofline.md has the numbers.
- fp32 (tf32) tiles are twice the bytes and registers of bf16 ones, so they halve BLOCK_N. tf32
  wgmma reads both operands K-major only, and the second dot (p @ n) needs n N-major: with one load
  of the tile Triton copies it to shared memory twice from registers and gets no cp.async pipeline.
  The kernel therefore loads the tile twice (TRANS_COPY), once as (BLOCK_N, d) and once as its
  transpose (d, BLOCK_N): both are asynchronous copies (LDGSTS), the second one 4 bytes wide.
- IEEE fp32 dots run on CUDA cores (FMA), whose operands sit in registers along d: small tiles.
- sm_80 has no wgmma (mma.sync keeps the A operand in registers) and 164 KB of shared memory: its
  d=128 tiles are 64 x 64, 4 warps, 2 stages.

Every value below was compiled offline for sm_90a and sm_80 under triton 3.6 and 3.8
(tests/machine_code/test_triton_offline_compile.py): no local-memory spills, shared memory within
the chip's limit, ctas_per_sm programs fit an SM, HGMMA (sm_90) / HMMA (sm_80) for the tensor-core
dots. They are starting points, not measurements: MOCO_FAST_TRITON_AUTOTUNE=1 times
fwd_candidates() on the GPU instead.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

HALF = ("bfloat16", "float16")


@dataclass(frozen=True)
class TileConfig:
    """A kernel's tile: rows of q per program (block_m), negatives per step (block_n), warps,
    software-pipeline stages, and how many programs of it an SM holds at once (ctas_per_sm: checked
    against the compiled registers and shared memory by tests/machine_code; the split model uses it)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 1


def d_pad(d: int) -> int:
    """Feature dim rounded up to a power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, 1 << max(0, (int(d) - 1).bit_length()))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_dtype_name(q_dtype: str, n_dtype: str) -> str:
    """The dtype the dots run in: equal half types stay half, anything else promotes to fp32."""
    return q_dtype if q_dtype == n_dtype and q_dtype in HALF else "float32"


def dot_precision(dot_dtype: str, fp32_precision: str) -> str:
    """The PRECISION constexpr: the user's fp32 matmul precision for fp32 dots; half dots ignore it
    (fixed "ieee", so toggling torch's setting does not recompile them)."""
    return fp32_precision if dot_dtype == "float32" else "ieee"


def fwd_config(
    dp: int, dot_dtype: str, cc: tuple[int, int] = (9, 0), interpret: bool = False, precision: str = "tf32"
) -> TileConfig:
    """Tile config of infonce_fwd_split_kernel for padded dim dp, dot dtype and fp32 precision."""
    if interpret:
        # numpy cost is per op, not per element: big tiles, few iterations.
        return TileConfig(64, 128, 4, 1)
    hopper = cc >= (9, 0)
    if dot_dtype in HALF:
        if hopper:
            if dp <= 128:
                return TileConfig(64, 64, 4, 3, ctas_per_sm=2)
            return TileConfig(64, 64, 8, 2)
        if dp <= 64:
            return TileConfig(128, 64, 8, 3)
        return TileConfig(64, 64, 4, 2, ctas_per_sm=2) if dp <= 128 else TileConfig(64, 32, 8, 2)
    if precision == "ieee":
        # CUDA-core FMA dots: each thread holds operand strips along d, so tiles shrink with d.
        if dp <= 32:
            return TileConfig(64, 32, 4, 2, ctas_per_sm=4)
        if dp <= 128:  # sm_80: 8 warps (4 spill under triton 3.8 when B == 1 is specialized)
            return TileConfig(32, 32, 4, 2, ctas_per_sm=3) if hopper else TileConfig(32, 32, 8, 2)
        return TileConfig(16, 16, 4, 2, ctas_per_sm=3)
    # tf32 tensor cores: fp32 tiles are twice the bytes of bf16 ones.
    if dp <= 64:
        return TileConfig(128, 64, 8, 3) if hopper else TileConfig(128, 64, 8, 2)
    if dp <= 128:
        return TileConfig(128, 32, 8, 3) if hopper else TileConfig(64, 32, 4, 2)
    return TileConfig(64, 16, 8, 2) if hopper else TileConfig(32, 32, 8, 2)


def trans_copy(n_dtype: str, dot_dtype: str, cc: tuple[int, int], interpret: bool, precision: str) -> bool:
    """Whether the forward loads each fp32 negatives tile a second time, transposed (see the module
    docstring): tf32 wgmma (sm_90) with an fp32 queue. A bf16/fp16 queue under an fp32 dot is upcast
    in registers before either dot, so a second copy would not make it asynchronous."""
    return not interpret and cc >= (9, 0) and dot_dtype == "float32" and n_dtype == "float32" and precision == "tf32"


def fuse_single_split(dp: int, dot_dtype: str, cc: tuple[int, int] = (9, 0), interpret: bool = False) -> bool:
    """Whether a single-split forward finalizes in the split kernel (FINALIZE, one launch) rather
    than through the combine kernel. The fused epilogue adds registers (k reloaded next to the
    accumulator): only the configs checked spill-free by the offline compile test use it."""
    return interpret or (cc >= (9, 0) and dot_dtype in HALF and dp <= 128)


def _shape(c: TileConfig) -> tuple[int, int, int, int]:
    return (c.block_m, c.block_n, c.num_warps, c.num_stages)


def fwd_candidates(dp: int, dot_dtype: str, precision: str = "tf32") -> list[TileConfig]:
    """Configs tried when MOCO_FAST_TRITON_AUTOTUNE=1 (the heuristic pick first)."""
    base = fwd_config(dp, dot_dtype, precision=precision)
    cands = [base]
    seen = {_shape(base)}
    half = dot_dtype in HALF
    for bm in (64, 128):
        for bn in (64, 128) if half else (32, 64):
            for w in (4, 8):
                for st in (2, 3, 4):
                    if dp >= 256 and (bm == 128 or bn == 128):
                        continue
                    c = TileConfig(bm, bn, w, st)
                    if _shape(c) not in seen:
                        seen.add(_shape(c))
                        cands.append(c)
    return cands


def num_splits(row_blocks: int, n_tiles: int, slots: int, min_tiles: int = 4, slack: float = 0.03) -> int:
    """Key splits (flash-decoding) per row block, for ``slots`` programs resident at once
    (SMs x programs per SM).

    Cost model: time ~ waves * (tiles per program + 1), where the +1 is a program's fixed cost
    (loading q, writing its (m, l, O, rank) partial). The smallest split count within ``slack`` of
    the best cost wins: every split adds a (B, d) fp32 partial that the combine must read, which
    the model does not price (without the slack B=4096 would pick 41 splits of 10 waves over 4
    splits of 1 wave for a 0.6% modelled gain). Memoized through fwd_plan.
    """
    if n_tiles <= 0:
        return 1
    max_s = max(1, min(n_tiles // max(1, min_tiles), 4 * slots))
    costs = [cdiv(row_blocks * s, slots) * (cdiv(n_tiles, s) + 1) for s in range(1, max_s + 1)]
    best = min(costs)
    return next(s for s, c in enumerate(costs, start=1) if c <= best * (1 + slack))


def combine_block_m(B: int, num_sms: int, dp: int) -> int:
    """Rows per combine program: small enough that B rows spread over the SMs (B=256 on 132 SMs:
    2 rows, 128 programs)."""
    bm = 2
    while bm < 32 and cdiv(B, bm * 2) >= num_sms:
        bm *= 2
    return bm


def combine_block_s(bm: int, dp: int) -> int:
    """Splits per combine step (unrolled: that many independent (BLOCK_M, D_PAD) loads in flight),
    <= 4096 fp32 values per step (32 registers/thread at 4 warps), at most 16."""
    return max(1, min(16, 4096 // (bm * dp)))


def _align4(n: int) -> int:
    return cdiv(n, 4) * 4  # fp32 elements -> a 16-byte boundary


@dataclass(frozen=True)
class FwdPlan:
    """Everything infonce_forward launches for one problem shape.

    Split stage: grid (row_blocks, splits), keys_per_split negatives each (a multiple of BLOCK_N).
    fused: a single split finalizes in the split kernel (no combine, no workspace).
    Otherwise one fp32 workspace of ws_size elements holds the partials, each part starting on a
    16-byte boundary: O (splits, B, d) at 0, then m, l (splits, B), rank (splits, B) int32 and
    pos (B,) at the given element offsets. Combine stage: grid (combine_grid,).
    """

    config: TileConfig
    d_pad: int
    even_k: bool
    even_d: bool
    trans_copy: bool
    row_blocks: int
    splits: int
    keys_per_split: int
    fused: bool
    combine_block_m: int
    combine_block_s: int
    combine_grid: int
    ws_size: int
    m_off: int
    l_off: int
    r_off: int
    pos_off: int


@functools.lru_cache(maxsize=512)
def fwd_plan(
    B: int,
    K: int,
    d: int,
    n_dtype: str,
    dot_dtype: str,
    precision: str,
    cc: tuple[int, int],
    num_sms: int,
    interpret: bool,
    num_splits_override: int | None = None,
    config: TileConfig | None = None,
    fuse: bool | None = None,
) -> FwdPlan:
    """The forward's plan for B queries, K negatives of dim d (n_dtype: the negatives' dtype name,
    dot_dtype from dot_dtype_name, precision from dot_precision) on a device with num_sms SMs of
    compute capability cc. num_splits_override / config / fuse override the heuristics (tests,
    autotuning)."""
    dp = d_pad(d)
    cfg = config or fwd_config(dp, dot_dtype, cc, interpret, precision)
    row_blocks = cdiv(B, cfg.block_m)
    n_tiles = cdiv(K, cfg.block_n)
    slots = max(1, num_sms * cfg.ctas_per_sm)
    s = num_splits(row_blocks, n_tiles, slots) if num_splits_override is None else int(num_splits_override)
    s = max(1, min(s, max(1, n_tiles)))
    kps = max(1, cdiv(n_tiles, s)) * cfg.block_n
    splits = max(1, cdiv(K, kps))  # no empty split
    if fuse is None:
        fuse = fuse_single_split(dp, dot_dtype, cc, interpret)
    fused = splits == 1 and bool(fuse)
    bmc = combine_block_m(B, num_sms, dp)
    sb = splits * B
    m_off = _align4(sb * d)
    l_off = m_off + _align4(sb)
    r_off = l_off + _align4(sb)
    pos_off = r_off + _align4(sb)
    return FwdPlan(
        config=cfg,
        d_pad=dp,
        even_k=(K % cfg.block_n == 0),
        even_d=(d == dp),
        trans_copy=trans_copy(n_dtype, dot_dtype, cc, interpret, precision),
        row_blocks=row_blocks,
        splits=splits,
        keys_per_split=kps,
        fused=fused,
        combine_block_m=bmc,
        combine_block_s=combine_block_s(bmc, dp),
        combine_grid=cdiv(B, bmc),
        ws_size=0 if fused else pos_off + _align4(B),
        m_off=m_off,
        l_off=l_off,
        r_off=r_off,
        pos_off=pos_off,
    )


def bwd_qk_block_m(dp: int) -> int:
    return max(1, min(64, 2048 // dp))


def bwd_dn_config(
    dp: int, dot_dtype: str, cc: tuple[int, int] = (9, 0), interpret: bool = False, precision: str = "tf32"
) -> TileConfig:
    """(block_m = q rows per step, block_n = negatives per program) of the dn kernel."""
    if interpret:
        return TileConfig(64, 64, 4, 1)
    if dot_dtype in HALF:
        if dp <= 128:
            return TileConfig(64, 128, 8, 2) if cc >= (9, 0) else TileConfig(64, 64, 8, 2)
        return TileConfig(32, 64, 8, 2)
    if precision == "ieee":
        if dp <= 64:
            return TileConfig(32, 32, 4, 2)
        return TileConfig(16, 32, 4, 2) if dp <= 128 else TileConfig(16, 16, 4, 2)
    if dp <= 128:  # 8 warps on sm_90: 4 warps spill under triton 3.6 (fp32 q, bf16 queue)
        return TileConfig(32, 64, 8, 2) if cc >= (9, 0) else TileConfig(32, 64, 4, 2)
    return TileConfig(32, 32, 4, 2)


@dataclass(frozen=True)
class DnPlan:
    config: TileConfig
    d_pad: int
    even_d: bool
    grid: int


@functools.lru_cache(maxsize=512)
def dn_plan(
    K: int,
    d: int,
    dot_dtype: str,
    precision: str,
    cc: tuple[int, int],
    interpret: bool,
    config: TileConfig | None = None,
) -> DnPlan:
    """The dn kernel's plan: one program per block_n negatives (K >= 1)."""
    dp = d_pad(d)
    cfg = config or bwd_dn_config(dp, dot_dtype, cc, interpret, precision)
    return DnPlan(config=cfg, d_pad=dp, even_d=(d == dp), grid=cdiv(K, cfg.block_n))


def enqueue_block_r(dp: int) -> int:
    """Key rows per step of the (single-program, 8-warp) enqueue: 8192 values per tile."""
    return max(1, min(256, 8192 // dp))


MOMENTUM_BLOCK = 2048  # elements per step: 4 warps x 32 threads x 4 vectors of 4 fp32
MOMENTUM_CHUNK = 65536  # elements per program (one table row) of the multi-tensor kernel
MOMENTUM_WARPS = 4


# ----------------------------------------------------------------------------------------------
# The CUDA extension's InfoNCE forward plan (csrc/infonce.cu). The extension re-derives nothing:
# moco_fast.cuda_ext computes this plan and passes it to torch.ops.moco_fast_C.infonce_forward,
# whose C++ checks it against the kernel's tile before launching.
# ----------------------------------------------------------------------------------------------

CUDA_COMPUTES = ("bfloat16", "float16", "tf32", "ieee")  # the kernel's compute types (csrc mf::Compute order)


def cuda_fwd_compute(q_dtype: str, n_dtype: str, precision: str) -> str:
    """What the CUDA forward feeds its dots with, one of CUDA_COMPUTES.

    q and negatives of one half type -> that type's tensor cores; any other mix (some operand fp32,
    or bf16 with fp16) -> fp32 operands (exact for 16-bit inputs) on TF32 tensor cores or IEEE FFMA,
    as ``precision`` ("tf32" | "ieee", moco_fast.numerics.fp32_matmul_precision()) says.
    """
    dot = dot_dtype_name(q_dtype, n_dtype)
    if dot in HALF:
        return dot
    if precision not in ("tf32", "ieee"):
        raise ValueError(f"precision must be 'tf32' or 'ieee', got {precision!r}")
    return precision


@dataclass(frozen=True)
class CudaFwdTile:
    """Facts of one compiled forward kernel, from torch.ops.moco_fast_C.infonce_forward_tile."""

    block_m: int  # query rows per block
    block_n: int  # keys per tile; a split's key count is a multiple of it
    ctas_per_sm: int  # resident blocks per SM on the device (0 = unknown, counted as 1)
    max_splits: int  # most key splits the combine kernel takes


@dataclass(frozen=True)
class CudaFwdPlan:
    """Launch plan of the CUDA forward: grid = (cdiv(B, block_m), num_splits) blocks."""

    compute: str  # one of CUDA_COMPUTES
    block_m: int
    block_n: int
    num_splits: int  # key chunks (0 when K == 0: the combine kernel alone finalizes)
    keys_per_split: int  # a multiple of block_n; every split holds at least one key (0 when K == 0)


CUDA_SPLIT_OVERHEAD_TILES = 3  # a block's fixed cost in key tiles: prologue, partial (m, l, O) write, its combine read


def cuda_num_splits(row_tiles: int, key_tiles: int, slots: int, max_splits: int, min_tiles: int = 4) -> int:
    """Key splits of the CUDA forward: the s minimizing waves(s) * (tiles per split + overhead).

    waves(s) = cdiv(row_tiles * s, slots), slots = resident blocks on the whole GPU. The overhead
    (CUDA_SPLIT_OVERHEAD_TILES) makes every extra split pay for its partials, so a single wave is
    kept whenever it is as fast, and more waves are taken only when they keep more slots busy
    (e.g. 141 row tiles on 264 slots). Ties go to fewer splits. Each split keeps >= min_tiles tiles.
    """
    if key_tiles <= 0:
        return 0
    top = max(1, min(key_tiles // max(1, min_tiles), max_splits))
    best, best_cost = 1, math.inf
    for s in range(1, top + 1):
        cost = cdiv(row_tiles * s, slots) * (cdiv(key_tiles, s) + CUDA_SPLIT_OVERHEAD_TILES)
        if cost < best_cost:
            best, best_cost = s, cost
    return cdiv(key_tiles, cdiv(key_tiles, best))  # trimmed: no empty split


def cuda_fwd_plan(
    B: int, K: int, d: int, q_dtype: str, n_dtype: str, precision: str, num_sms: int, tile
) -> CudaFwdPlan:
    """The CUDA forward's plan for q (B, d) of q_dtype against K negatives (K, d) of n_dtype.

    ``precision``: "tf32" | "ieee" (moco_fast.numerics.fp32_matmul_precision()); ``num_sms``: the
    device's SM count; ``tile(compute, d) -> CudaFwdTile``: the kernel's facts (moco_fast.cuda_ext
    asks the extension once per (compute, d, device)). Splits from cuda_num_splits over
    ctas_per_sm * num_sms slots. Pure function of its arguments; callers cache it per problem shape.
    """
    compute = cuda_fwd_compute(q_dtype, n_dtype, precision)
    t = tile(compute, d)
    if K <= 0:
        return CudaFwdPlan(compute, t.block_m, t.block_n, 0, 0)
    slots = max(1, t.ctas_per_sm) * max(1, num_sms)
    key_tiles = cdiv(K, t.block_n)
    splits = cuda_num_splits(cdiv(max(B, 1), t.block_m), key_tiles, slots, t.max_splits)
    return CudaFwdPlan(compute, t.block_m, t.block_n, splits, cdiv(key_tiles, splits) * t.block_n)
