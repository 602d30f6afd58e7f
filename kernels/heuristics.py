"""Launch configurations: block sizes, warps, pipeline stages and split counts.

Pure Python (no triton import) so that the offline compile test and the benchmarks can enumerate
exactly the configurations the launchers pick.

Forward tiles (GPU). One (BLOCK_M, d) tile of q stays resident; (BLOCK_N, d) tiles of negatives
stream through NUM_STAGES shared-memory buffers and feed both dots (s = q n^T, acc += p n), so
unlike flash attention there is one K/V tile per step, not two. The fp32 accumulator (BLOCK_M x
D_PAD) and the logits tile (BLOCK_M x BLOCK_N) live in registers: with 8 warps (2 warpgroups of
wgmma on sm_90) a 128 x 128 fp32 accumulator is 64 registers/thread, which is why d=256 halves
BLOCK_M. fp32 (tf32) tiles are twice the bytes and registers of bf16 ones, so they halve BLOCK_N.
IEEE fp32 dots run on CUDA cores (FMA), whose operands sit in registers along d: small tiles.
sm_80 has no wgmma (mma.sync keeps the A operand in registers) and 164 KB of shared memory: its
d=128 tiles are 64 x 64, 4 warps, 2 stages.

Every value below was compiled offline for sm_90a and sm_80 (tests/test_triton_offline_compile.py):
no local-memory spills, shared memory within the chip's limit, HGMMA (sm_90) / HMMA (sm_80) for the
tensor-core dots. They are starting points, not measurements: MOCO_FAST_TRITON_AUTOTUNE=1 times
fwd_candidates() on the GPU instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HALF = ("bfloat16", "float16")


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def d_pad(d: int) -> int:
    """Feature dim rounded up to a power of two, at least 16 (tl.dot's minimum K)."""
    return max(16, 1 << max(0, (int(d) - 1).bit_length()))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_dtype_name(q_dtype: str, n_dtype: str) -> str:
    """The dtype the dots run in: equal half types stay half, anything else promotes to fp32."""
    return q_dtype if q_dtype == n_dtype and q_dtype in HALF else "float32"


def fwd_config(
    dp: int, dot_dtype: str, cc: tuple[int, int] = (9, 0), interpret: bool = False, precision: str = "tf32"
) -> TileConfig:
    """Tile config of infonce_fwd_split_kernel for padded dim dp, dot dtype and fp32 precision."""
    if interpret:
        # numpy cost is per op, not per element: big tiles, few iterations.
        return TileConfig(64, 128, 4, 1)
    hopper = cc >= (9, 0)
    if dot_dtype in HALF:
        if dp <= 32:
            return TileConfig(128, 128, 8, 3)
        if dp <= 64:
            return TileConfig(128, 64, 8, 3)
        if dp <= 128:
            return TileConfig(128, 64, 8, 3) if hopper else TileConfig(64, 64, 4, 2)
        return TileConfig(64, 64, 8, 2) if hopper else TileConfig(64, 32, 8, 2)
    if precision == "ieee":
        # CUDA-core FMA dots: each thread holds operand strips along d, so tiles shrink with d.
        if dp <= 32:
            return TileConfig(64, 32, 4, 2)
        return TileConfig(32, 32, 4, 2) if dp <= 128 else TileConfig(16, 16, 4, 2)
    # tf32 tensor cores: fp32 tiles are twice the bytes of bf16 ones.
    if dp <= 64:
        return TileConfig(128, 64, 8, 3) if hopper else TileConfig(128, 64, 8, 2)
    if dp <= 128:
        return TileConfig(128, 32, 8, 3) if hopper else TileConfig(64, 32, 4, 2)
    return TileConfig(64, 16, 8, 2) if hopper else TileConfig(64, 32, 8, 2)


def fuse_single_split(dp: int, dot_dtype: str, cc: tuple[int, int] = (9, 0), interpret: bool = False) -> bool:
    """Whether a single-split forward finalizes in the split kernel (FINALIZE, one launch) rather
    than through the combine kernel. The fused epilogue adds registers (k reloaded next to the
    accumulator): only the configs checked spill-free by the offline compile test use it."""
    return interpret or (cc >= (9, 0) and dot_dtype in HALF and dp <= 128)


def fwd_candidates(dp: int, dot_dtype: str, precision: str = "tf32") -> list[TileConfig]:
    """Configs tried when MOCO_FAST_TRITON_AUTOTUNE=1 (the heuristic pick first)."""
    base = fwd_config(dp, dot_dtype, precision=precision)
    cands = [base]
    half = dot_dtype in HALF
    for bm in (64, 128):
        for bn in (64, 128) if half else (32, 64):
            for w in (4, 8):
                for st in (2, 3, 4):
                    if dp >= 256 and (bm == 128 or bn == 128):
                        continue
                    c = TileConfig(bm, bn, w, st)
                    if c not in cands:
                        cands.append(c)
    return cands


def num_splits(row_blocks: int, n_tiles: int, num_sms: int, min_tiles: int = 4) -> int:
    """Key splits (flash-decoding) per row block.

    Cost model, one resident program per SM: time ~ waves * (tiles per program + 1), where the
    +1 is a program's fixed cost (loading q, writing its (m, l, O, rank) partial). The smallest
    split count reaching the minimum wins (fewer partials for the combine to read).
    """
    if n_tiles <= 0:
        return 1
    max_s = max(1, min(n_tiles // max(1, min_tiles), 4 * num_sms))
    best, best_cost = 1, math.inf
    for s in range(1, max_s + 1):
        tiles = cdiv(n_tiles, s)
        cost = cdiv(row_blocks * s, num_sms) * (tiles + 1)
        if cost < best_cost:
            best, best_cost = s, cost
    return best


def combine_block_m(B: int, num_sms: int, dp: int) -> int:
    """Rows per combine program: small enough that B rows spread over the SMs."""
    bm = 4
    while bm < 32 and cdiv(B, bm * 2) >= num_sms:
        bm *= 2
    return bm


def combine_block_s(bm: int, dp: int) -> int:
    """Splits per combine step: a (BLOCK_S, BLOCK_M, D_PAD) fp32 tile of <= 8192 values
    (64 registers/thread at 4 warps)."""
    return max(1, min(16, 8192 // (bm * dp)))


def combine_block_ms(dp: int) -> list[int]:
    """Every BLOCK_M combine_block_m can return."""
    return [4, 8, 16, 32]


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
    return TileConfig(32, 64, 4, 2) if dp <= 128 else TileConfig(32, 32, 4, 2)


def enqueue_block_r(dp: int) -> int:
    """Key rows per step of the (single-program, 8-warp) enqueue: 8192 values per tile."""
    return max(1, min(256, 8192 // dp))


MOMENTUM_BLOCK = 2048  # elements per step: 4 warps x 32 threads x 4 vectors of 4 fp32
MOMENTUM_CHUNK = 65536  # elements per program (one table row) of the multi-tensor kernel
MOMENTUM_WARPS = 4


def all_fwd_keys() -> list[tuple[int, str, str, str]]:
    """(d, q dtype, n dtype, precision) combos covering every forward config the heuristics pick."""
    keys = []
    for d in (16, 32, 64, 96, 128, 256):
        for dt in ("bfloat16", "float16"):
            keys.append((d, dt, dt, "ieee"))
        keys.append((d, "float32", "float32", "tf32"))
        keys.append((d, "float32", "float32", "ieee"))
        keys.append((d, "float32", "bfloat16", "tf32"))
    return keys


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
