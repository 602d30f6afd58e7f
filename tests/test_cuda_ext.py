"""The "cuda" backend's internals: moco_fast._C built from csrc/ and its wrappers in moco_fast.cuda_ext.

Layers (the SASS of the built library is checked in tests/machine_code/test_cuda_sass.py):

* CPU, CI: the extension built by ``pip install -e .`` imports and registers a CUDA kernel for every op
  (and a Meta kernel that runs the forward's shape/dtype/plan checks without a GPU). Skipped with a
  reason when the extension was not built (MOCO_FAST_BUILD_CUDA=0, no toolkit); MOCO_FAST_EXPECT_CUDA_EXT=1
  (or MOCO_FAST_BUILD_CUDA=1) turns "not built" into a failure.
* CPU: the Python side of the backend (the launch plan of kernels/heuristics.py, the fp32 precision read,
  the argument checks) with the op replaced by a recorder; and a PyTorch emulation of the kernels'
  algorithm (that plan, lazy rescaling, rounding of the probabilities, the combine step writing loss)
  against float64 math, so the index and numerics design is checked without a GPU.
* GPU (skipped without CUDA): the kernels' own checks, occupancy and launch count.

Every op of this backend against float64 math (forward matrix, backward, enqueue, momentum, on poisoned
memory without host syncs) is in the by-op files (tests/test_info_nce.py, test_momentum.py, test_queue.py)
with the other backends.
"""

from __future__ import annotations

import importlib.util
import math
import types

import pytest
import torch
from conftest import EXPECT_CUDA_EXT, rows
from moco_fast.kernels import heuristics as H
from oracle import check_rank, infonce_forward, rel

from moco_fast import cuda_ext

BUILT = importlib.util.find_spec("moco_fast._C") is not None
NOT_BUILT = "moco_fast._C was not built (MOCO_FAST_BUILD_CUDA=0, or no CUDA toolkit / CPU torch at install time)"
needs_ext = pytest.mark.skipif(not BUILT, reason=NOT_BUILT)
needs_gpu = pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs moco_fast._C and a CUDA GPU")
NEW_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")

OPS = ("infonce_forward", "infonce_backward", "infonce_backward_negatives", "momentum_update_", "enqueue_")
DEVICE = "cuda"
LOG2E = 1.0 / math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Build and registration (CPU)
# ------------------------------------------------------------------------------------------------


def test_extension_built_when_expected():
    if EXPECT_CUDA_EXT:
        assert BUILT, "MOCO_FAST_EXPECT_CUDA_EXT/MOCO_FAST_BUILD_CUDA says moco_fast._C must exist: " + NOT_BUILT
    if not BUILT:
        assert not cuda_ext.AVAILABLE
        with pytest.raises(RuntimeError, match="not available"):
            cuda_ext.enqueue_(None, None, None, None, False)


@needs_ext
def test_extension_imports():
    assert cuda_ext.AVAILABLE, cuda_ext.IMPORT_ERROR
    assert cuda_ext.IMPORT_ERROR is None
    import moco_fast._C  # noqa: F401


@needs_ext
@pytest.mark.parametrize("op", OPS)
def test_op_has_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moco_fast_C::{op}", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"moco_fast_C::{op}", "CPU")


@needs_ext
def test_op_schemas():
    schema = {op: getattr(torch.ops.moco_fast_C, op).default._schema for op in OPS}
    mutable = {
        op: [a.name for a in s.arguments if a.alias_info is not None and a.alias_info.is_write]
        for op, s in schema.items()
    }
    assert mutable["momentum_update_"] == ["targets"]
    assert mutable["enqueue_"] == ["queue", "ptr", "count"]
    assert mutable["infonce_forward"] == mutable["infonce_backward"] == mutable["infonce_backward_negatives"] == []
    fwd = schema["infonce_forward"]
    assert [a.name for a in fwd.arguments] == [
        "q", "k", "negatives", "scale", "compute", "num_splits", "keys_per_split"
    ]  # fmt: skip
    assert [r.name for r in fwd.returns] == ["loss", "lse", "delta", "rank"]
    tile = torch.ops.moco_fast_C.infonce_forward_tile.default._schema
    assert [a.name for a in tile.arguments] == ["compute", "d", "device"] and not tile.returns[0].name


@needs_ext
def test_cpu_tensors_are_rejected():
    q = torch.randn(4, 16)
    with pytest.raises(NotImplementedError):
        torch.ops.moco_fast_C.infonce_forward(q, q, q, 1.0, "ieee", 1, 32)


@needs_ext
def test_tile_query_agrees_with_the_python_side():
    """The kernel facts the plan is made from: a tile for every compute type and d up to MAX_DIM (and a
    ValueError beyond, so cuda_ext.MAX_DIM and csrc kMaxD agree), no occupancy without a device."""
    tile = torch.ops.moco_fast_C.infonce_forward_tile
    for compute in H.CUDA_COMPUTES:
        for d in (1, 16, 33, 64, 100, 128, 200, cuda_ext.MAX_DIM):
            bm, bn, threads, smem, ctas, max_splits = tile(compute, d)
            assert bm in (32, 64) and bn in (32, 64) and threads == 256 and 0 < smem <= 99 * 1024
            assert ctas == 0 and max_splits == 1024
        for bad in (0, cuda_ext.MAX_DIM + 1):
            with pytest.raises(ValueError, match="feature dimension d"):
                tile(compute, bad)
    with pytest.raises(ValueError, match="compute must be"):
        tile("bf16", 128)


def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


@needs_ext
def test_forward_checks_run_on_meta_tensors():
    """The shapes of the outputs, and the plan accepted as given, without a GPU."""
    bf = torch.bfloat16
    q, n = _meta((7, 128), bf), _meta((1000, 128), bf)
    loss, lse, delta, rank = torch.ops.moco_fast_C.infonce_forward(q, q, n, 10.0, "bfloat16", 4, 256)
    assert loss.shape == lse.shape == rank.shape == (7,) and delta.shape == (7, 128)
    assert loss.dtype == lse.dtype == delta.dtype == torch.float32 and rank.dtype == torch.int64
    torch.ops.moco_fast_C.infonce_forward(q, q, _meta((0, 128), bf), 10.0, "bfloat16", 0, 0)  # K = 0
    torch.ops.moco_fast_C.infonce_forward(q, q, n, 10.0, "tf32", 1, 1024)  # fp32 operands from bf16: allowed


@needs_ext
@pytest.mark.parametrize(
    "compute, qt, nt, splits, keys, match",
    [
        ("bfloat16", torch.bfloat16, torch.float32, 1, 1024, "needs q and negatives both bfloat16"),
        ("float16", torch.float16, torch.bfloat16, 1, 1024, "needs q and negatives both float16"),
        ("fp32", torch.float32, torch.float32, 1, 1024, "compute must be"),
        ("ieee", torch.float32, torch.float32, 0, 0, "num_splits must be in"),
        ("ieee", torch.float32, torch.float32, 1025, 32, "num_splits must be in"),
        ("ieee", torch.float32, torch.float32, 2, 500, "multiple of the key tile 32"),
        ("ieee", torch.float32, torch.float32, 1, 2048, "at most 1024"),
        ("ieee", torch.float32, torch.float32, 2, 256, "must cover K = 1000"),  # keys 512.. left out
        ("ieee", torch.float32, torch.float32, 5, 256, "no empty split"),  # split 4 starts at 1024
    ],
)
def test_forward_rejects_bad_plans(compute, qt, nt, splits, keys, match):
    q, n = _meta((7, 128), qt), _meta((1000, 128), nt)
    with pytest.raises(ValueError, match=match):
        torch.ops.moco_fast_C.infonce_forward(q, q, n, 10.0, compute, splits, keys)


@needs_ext
def test_forward_rejects_bad_inputs_on_meta_tensors():
    f = torch.float32
    q = _meta((7, 64), f)
    with pytest.raises(ValueError, match="K = 0 negatives"):
        torch.ops.moco_fast_C.infonce_forward(q, q, _meta((0, 64), f), 1.0, "ieee", 1, 32)
    with pytest.raises(TypeError, match="negatives must be float32, bfloat16 or float16"):
        torch.ops.moco_fast_C.infonce_forward(q, q, _meta((9, 64), torch.float64), 1.0, "ieee", 1, 32)
    with pytest.raises(ValueError, match="feature dimension d must be in"):
        wide = _meta((7, 300), f)
        torch.ops.moco_fast_C.infonce_forward(wide, wide, _meta((9, 300), f), 1.0, "ieee", 1, 32)
    with pytest.raises(ValueError, match="k must have q's shape"):
        torch.ops.moco_fast_C.infonce_forward(q, _meta((6, 64), f), _meta((9, 64), f), 1.0, "ieee", 1, 32)
    with pytest.raises(ValueError, match="negatives must have d = 64"):
        torch.ops.moco_fast_C.infonce_forward(q, q, _meta((9, 32), f), 1.0, "ieee", 1, 32)


# ------------------------------------------------------------------------------------------------
# The Python side of the backend (CPU): plan, precision, argument checks
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def recorded_forward(monkeypatch):
    """cuda_ext.infonce_forward on CPU tensors with the op replaced by a recorder of its plan arguments,
    132 SMs and the kernels' real tiles at 2 blocks per SM; the plan caches are emptied around the test."""
    calls = []

    def fake_forward(q, k, n, scale, *plan):
        calls.append(plan)
        B, d = q.shape
        return torch.zeros(B), torch.zeros(B), torch.zeros(B, d), torch.zeros(B, dtype=torch.int64)

    real = torch.ops.moco_fast_C if BUILT else None
    fake = types.SimpleNamespace(
        infonce_forward=fake_forward,
        infonce_forward_tile=lambda c, d, device=-1: [*real.infonce_forward_tile(c, d)[:4], 2, 1024],
    )
    for cached in ("_plan", "_tile", "_num_sms"):
        getattr(cuda_ext, cached, None) and getattr(cuda_ext, cached).cache_clear()
    monkeypatch.setattr(cuda_ext, "_ops", fake)
    monkeypatch.setattr(cuda_ext, "_num_sms", lambda device: 132, raising=False)
    yield calls
    for cached in ("_plan", "_tile"):
        getattr(cuda_ext, cached, None) and getattr(cuda_ext, cached).cache_clear()


@needs_ext
@pytest.mark.skipif(not NEW_PRECISION_API, reason="torch < 2.9 has no fp32_precision API")
@pytest.mark.parametrize("setting", ["tf32", "ieee"])
def test_forward_reads_the_new_fp32_precision_api(restore_precision, recorded_forward, setting):
    """torch >= 2.9: once the new API is set, torch.get_float32_matmul_precision() raises; the forward
    used to call it on every call (a crash). The compute type must follow the new setting."""
    torch.backends.cuda.matmul.fp32_precision = setting
    q, n = torch.randn(5, 16), torch.randn(7, 16)
    cuda_ext.infonce_forward(q, q, n, 2.0)
    cuda_ext.infonce_forward(q.bfloat16(), q.bfloat16(), n.bfloat16(), 2.0)
    cuda_ext.infonce_forward(q, q, n.bfloat16(), 2.0)
    assert [c[0] for c in recorded_forward] == [setting, "bfloat16", setting]


@needs_ext
@pytest.mark.parametrize("legacy, compute", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_forward_reads_the_legacy_fp32_precision_api(restore_precision, recorded_forward, legacy, compute):
    torch.set_float32_matmul_precision(legacy)
    q = torch.randn(5, 16)
    cuda_ext.infonce_forward(q, q.half(), torch.randn(7, 16).half(), 2.0)  # fp32 q with fp16 negatives
    assert recorded_forward == [(compute, 1, 32)]


@needs_ext
def test_forward_passes_the_cached_plan(recorded_forward, monkeypatch):
    """The op gets heuristics.cuda_fwd_plan's numbers; a repeated shape is a cache hit (no plan search)."""
    q, n = torch.randn(256, 128).bfloat16(), torch.randn(65536, 128).bfloat16()
    cuda_ext.infonce_forward(q, q, n, 1 / 0.07)
    monkeypatch.setattr(H, "cuda_num_splits", lambda *a, **kw: pytest.fail("plan recomputed for a cached shape"))
    cuda_ext.infonce_forward(q, q, n, 1 / 0.07)
    assert recorded_forward == [("bfloat16", 64, 1024)] * 2
    cuda_ext.infonce_forward(q, q, n[:0], 1 / 0.07)  # a new shape would search: K = 0 needs none
    assert recorded_forward[-1] == ("bfloat16", 0, 0)


@needs_ext
def test_unsupported_inputs_raise_instead_of_falling_back():
    """d > MAX_DIM and fp64 used to go to the torch backend silently; now an error names the argument."""
    assert cuda_ext.MAX_DIM == 256 and cuda_ext.DTYPES == (torch.float32, torch.bfloat16, torch.float16)
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        cuda_ext.infonce_forward(torch.randn(3, 16), torch.randn(3, 16), torch.randn(5, 16), 2.0)
    assert torch.float64 in cuda_ext.STATE_DTYPES
    q, n = torch.randn(3, 300), torch.randn(5, 300)
    with pytest.raises(ValueError, match=r"infonce_forward: the feature dimension d of q must be in \[1, 256\]"):
        cuda_ext.infonce_forward(q, q, n, 2.0)
    with pytest.raises(ValueError, match="infonce_backward_negatives: the feature dimension"):
        cuda_ext.infonce_backward_negatives(torch.ones(3), q, n, torch.zeros(3), 2.0)
    q64, n64 = torch.randn(3, 16, dtype=torch.float64), torch.randn(5, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="infonce_forward: negatives must be float32, bfloat16 or float16"):
        cuda_ext.infonce_forward(q64.float(), q64.float(), n64, 2.0)
    with pytest.raises(TypeError, match="infonce_forward: q must be"):
        cuda_ext.infonce_forward(q64, q64.float(), n64.float(), 2.0)
    with pytest.raises(TypeError, match="infonce_backward: k must be"):
        cuda_ext.infonce_backward(torch.ones(3), q64.float(), q64, torch.zeros(3), q64.float(), 2.0)


# ------------------------------------------------------------------------------------------------
# The launch plan (kernels/heuristics.py cuda_fwd_plan; CPU)
# ------------------------------------------------------------------------------------------------


def _real_tile(ctas: int = 2):
    """heuristics' tile callback from the extension's tile query, with `ctas` resident blocks per SM."""
    if not BUILT:
        pytest.skip(NOT_BUILT)

    def tile(compute, d):
        bm, bn, _threads, _smem, _ctas, max_splits = torch.ops.moco_fast_C.infonce_forward_tile(compute, d)
        return H.CudaFwdTile(bm, bn, ctas, max_splits)

    return tile


def _check_plan(plan, B, K, d, tile, sms):
    """Every key in exactly one non-empty split of whole tiles; multi-wave only when it keeps more slots busy."""
    t = tile(plan.compute, d)
    if K == 0:
        assert plan.num_splits == plan.keys_per_split == 0
        return
    assert 1 <= plan.num_splits <= t.max_splits and plan.keys_per_split % plan.block_n == 0
    assert (plan.num_splits - 1) * plan.keys_per_split < K <= plan.num_splits * plan.keys_per_split
    slots = t.ctas_per_sm * sms
    row_tiles = -(-B // plan.block_m)
    blocks = row_tiles * plan.num_splits
    if blocks > slots:
        waves = -(-blocks // slots)
        one_wave = min(slots // row_tiles, -(-K // plan.block_n)) * row_tiles if row_tiles <= slots else 0
        assert blocks / (waves * slots) > one_wave / slots, (B, K, plan, slots)


@pytest.mark.parametrize("sms", [132, 108])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("B", [1, 256, 4096])
def test_plan_fills_one_wave(B, dtype, sms):
    """K = 65536, d = 128: the H200 (132 SMs x 2 blocks) and A100 (108 x 2) cases. The old C++ rule gave
    B = 4096 bf16 on 132 SMs 5 splits = 320 blocks for 264 slots (a second wave 21% full)."""
    tile = _real_tile()
    plan = H.cuda_fwd_plan(B, 65536, 128, dtype, dtype, "tf32", sms, tile)
    assert plan.compute == ("bfloat16" if dtype == "bfloat16" else "tf32")
    _check_plan(plan, B, 65536, 128, tile, sms)
    blocks, slots = -(-B // plan.block_m) * plan.num_splits, 2 * sms
    if sms == 132:
        assert 0.9 * slots <= blocks <= slots, plan  # one wave, at least 90% of the slots busy
    else:  # one wave, or waves whose last one is (nearly) full
        assert blocks <= slots or (blocks % slots or slots) >= 0.9 * slots, plan


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("K", [0, 1, 31, 32, 33, 1000, 4099, 65536, 1 << 20])
def test_plan_covers_every_key_once(compute_dtype, K):
    for B in (1, 7, 64, 65, 256, 4096, 9000, 40000):
        for sms, ctas in ((1, 1), (108, 2), (132, 2), (132, 1)):
            for d in (16, 128, 256):
                for precision in ("tf32", "ieee"):
                    tile = _real_tile(ctas)
                    plan = H.cuda_fwd_plan(B, K, d, compute_dtype, compute_dtype, precision, sms, tile)
                    _check_plan(plan, B, K, d, tile, sms)


def test_plan_compute_type():
    assert H.cuda_fwd_compute("bfloat16", "bfloat16", "ieee") == "bfloat16"
    assert H.cuda_fwd_compute("float16", "float16", "tf32") == "float16"
    assert H.cuda_fwd_compute("float32", "bfloat16", "tf32") == "tf32"
    assert H.cuda_fwd_compute("bfloat16", "float16", "ieee") == "ieee"
    with pytest.raises(ValueError, match="precision"):
        H.cuda_fwd_compute("float32", "float32", "highest")


def test_split_count_is_one_wave_unless_more_waves_fill_the_slots():
    assert H.cuda_num_splits(64, 1024, 264, 1024) == 4  # B = 4096 bf16 on an H200: 256 blocks, not 320
    assert H.cuda_num_splits(141, 1024, 264, 1024) > 1  # 141 of 264 slots: more waves keep more busy
    assert H.cuda_num_splits(300, 1024, 264, 1024) >= 1
    assert H.cuda_num_splits(1, 3, 264, 1024) == 1  # fewer tiles than min_tiles: one split
    assert H.cuda_num_splits(1, 0, 264, 1024) == 0
    assert H.cuda_num_splits(1, 1 << 20, 264, 16) == 16  # the combine's limit


# ------------------------------------------------------------------------------------------------
# PyTorch emulation of the kernels' algorithm (CPU)
# ------------------------------------------------------------------------------------------------


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: keep 10 mantissa bits, rounding half away from zero (finite inputs)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _round(x: torch.Tensor, compute: str) -> torch.Tensor:
    if compute == "bfloat16":
        return x.to(torch.bfloat16).float()
    if compute == "float16":
        return x.to(torch.float16).float()
    if compute == "tf32":
        return _round_tf32(x)
    return x.float()


def _emulate_forward(q, k, n, scale, precision="ieee", sms=132, threshold=8.0):
    """The split kernel + combine kernel of csrc/infonce.cu, tile by tile, in fp32 PyTorch, under the plan
    cuda_ext would pass. Returns (loss, lse, delta, rank, plan)."""
    B, d = q.shape
    K = n.shape[0]
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    plan = H.cuda_fwd_plan(B, K, d, name[q.dtype], name[n.dtype], precision, sms, _real_tile())
    compute, bn, nsplit, chunk = plan.compute, plan.block_n, plan.num_splits, plan.keys_per_split
    scale_log2 = scale * LOG2E
    qc, nc = _round(q.float(), compute), _round(n.float(), compute)
    t0 = (q.float() * k.float()).sum(1) * scale_log2
    parts, covered = [], []
    for s in range(nsplit):
        kbeg, kend = s * chunk, min(K, (s + 1) * chunk)
        assert kbeg < kend, "empty chunk"
        covered.append((kbeg, kend))
        m = torch.full((B,), -math.inf)
        lsum = torch.zeros(B)
        o = torch.zeros(B, d)
        cnt = torch.zeros(B, dtype=torch.int64)
        for key0 in range(kbeg, kend, bn):
            keys = nc[key0 : min(key0 + bn, kend)]
            t = (qc @ keys.T) * scale_log2
            cnt += (t > t0[:, None]).sum(1)
            tmax = t.amax(1)
            need = tmax > m + threshold
            alpha = torch.where(need, torch.exp2(m - tmax), torch.ones(B))
            m = torch.where(need, tmax, m)
            lsum, o = lsum * alpha, o * alpha[:, None]
            p = torch.exp2(t - m[:, None])
            assert p.max() <= 2.0**threshold * (1 + 1e-6), "lazy rescaling let a probability grow past 2^8"
            lsum = lsum + p.sum(1)
            o = o + _round(p, compute) @ keys
        parts.append((m, lsum, o, cnt))
    assert not covered or (covered[0][0] == 0 and covered[-1][1] == K)
    # combine: M, the negatives' L, then the positive apart from them: loss = ln2 (M - t0) + log1p(L + w0 - 1),
    # delta = (sum_s w_s O_s - L k) / (w0 + L) (0 and 0 exactly when K = 0), rank
    big_m = t0.clone()
    for m, *_ in parts:
        big_m = torch.maximum(big_m, m)
    w0 = torch.exp2(t0 - big_m)
    big_l, rank = torch.zeros(B), torch.zeros(B, dtype=torch.int64)
    for m, lsum, _, cnt in parts:
        big_l, rank = big_l + lsum * torch.exp2(m - big_m), rank + cnt
    acc = -big_l[:, None] * k.float()
    for m, _, o, _ in parts:
        acc = acc + torch.exp2(m - big_m)[:, None] * o
    loss = (big_m - t0) / LOG2E + torch.log1p(big_l + torch.where(big_m > t0, w0 - 1, torch.zeros(B)))
    return loss, t0 / LOG2E + loss, acc / (w0 + big_l)[:, None], rank, plan


@needs_ext
@pytest.mark.parametrize("dtype, precision", [("bf16", "ieee"), ("f16", "ieee"), ("f32", "tf32"), ("f32", "ieee")])
@pytest.mark.parametrize("B,K,d", [(1, 1, 16), (7, 1000, 96), (37, 4099, 32), (70, 333, 256), (5, 0, 48)])
def test_emulated_algorithm_matches_float64(dtype, precision, B, K, d):
    dt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    q, k, n = rows(B, d, dt), rows(B, d, dt), rows(K, d, dt)
    scale = 1 / 0.07
    loss, lse, delta, rank, plan = _emulate_forward(q, k, n, scale, precision, sms=8)
    out = delta.double() + k.double()  # O = k + delta
    ref = infonce_forward(q, k, n, scale)
    compute = plan.compute
    tol = {"bfloat16": 1e-2, "float16": 3e-3, "tf32": 2e-3, "ieee": 1e-5}[compute]
    assert rel(lse, ref.lse) < (1e-3 if compute == "tf32" else 1e-5)  # TF32 rounds q and the keys
    assert rel(out, ref.out) < tol
    check_rank(rank, ref.pos * scale, ref.neg * scale, eps=1e-2 if compute == "tf32" else 1e-4)
    # loss in log2 units relative to the max: |error| relative to the row's logit scale, not to a small loss
    assert (loss.double() - ref.loss).abs().max() < (2e-3 if compute == "tf32" else 1e-4) * scale
    if K == 0:
        assert torch.equal(loss, torch.zeros(B)), "K = 0 must give loss 0 exactly"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_lazy_rescaling_with_wide_logits(dtype):
    """Unnormalized keys in increasing magnitude force many rescales; the results stay exact-ish."""
    B, K, d = 9, 3000, 64
    q = torch.randn(B, d).to(dtype)
    k = torch.randn(B, d).to(dtype)
    n = (torch.randn(K, d) * torch.linspace(0.1, 3.0, K)[:, None]).to(dtype)
    scale = 1 / 0.5
    loss, lse, delta, rank, _ = _emulate_forward(q, k, n, scale, "ieee", sms=2)
    out = delta.double() + k.double()  # O = k + delta
    ref = infonce_forward(q, k, n, scale)
    assert rel(lse, ref.lse) < 1e-5
    assert rel(loss, ref.loss) < 1e-5
    assert rel(out, ref.out) < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    check_rank(rank, ref.pos * scale, ref.neg * scale, eps=1e-3)


# ------------------------------------------------------------------------------------------------
# Emulation of the momentum kernels' slot mapping (CPU)
# ------------------------------------------------------------------------------------------------

_MOMENTUM_THREADS, _MOMENTUM_ITEMS = 256, 4  # csrc/momentum.cu kThreads, kItems


def _momentum_slots(elem_bytes: int, t_offset: int, s_offset: int, n: int):
    """csrc/momentum.cu process(): per element, how often it is touched and whether by a 16-byte access.

    t_offset/s_offset: the pair's byte offsets from a 16-byte boundary. Returns (touches (n,), vector (n,),
    blocks) for the grid pair_blocks() gives."""
    V = 16 // elem_bytes
    off = (t_offset % 16) // elem_bytes
    same = (s_offset % 16) // elem_bytes == off
    per_block = _MOMENTUM_THREADS * _MOMENTUM_ITEMS
    blocks = H.cdiv(H.cdiv(off + n, V), per_block)
    touches, vector = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.bool)
    v = torch.arange(blocks * per_block)  # every (block, item, thread) slot of the grid
    e0 = v * V - off
    full = same & (e0 >= 0) & (e0 + V <= n)
    for e in range(V):
        idx = e0 + e
        ok = (idx >= 0) & (idx < n)
        touches.index_add_(0, idx[ok], torch.ones_like(idx[ok]))
        vector[idx[ok & full]] = True
    return touches, vector, blocks


@pytest.mark.parametrize("elem_bytes", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 17, 1000, 4099, 8192, 8197])
def test_emulated_momentum_masked_tail_keeps_vectors(elem_bytes, n):
    """Every element exactly once, for any target offset; all but the two edge slots are 16-byte accesses
    when the source has the target's offset (N % 16 != 0 no longer loses vectorization)."""
    V = 16 // elem_bytes
    for t_off in range(0, 16, elem_bytes):
        for s_off in (t_off, (t_off + elem_bytes) % 16):
            touches, vector, blocks = _momentum_slots(elem_bytes, t_off, s_off, n)
            assert torch.equal(touches, torch.ones(n, dtype=torch.int64)), (t_off, s_off)
            assert blocks <= H.cdiv(n + V, _MOMENTUM_THREADS * _MOMENTUM_ITEMS * V) + 1
            if s_off == t_off:
                assert (~vector).sum() <= 2 * (V - 1), "more than the two edge slots went element by element"
            else:
                assert not vector.any() or V == 1


# ------------------------------------------------------------------------------------------------
# GPU: the kernels' own checks, occupancy, launch count
# ------------------------------------------------------------------------------------------------


@needs_gpu
def test_forward_large_d_and_fp64_raise():
    """No hand-off to the torch backend: the selection layer must not send these here."""
    q, n = rows(7, 300, torch.float32, device=DEVICE), rows(100, 300, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="feature dimension d"):
        cuda_ext.infonce_forward(q, q, n, 10.0)
    with pytest.raises(TypeError, match="q must be float32"):
        cuda_ext.infonce_forward(q[:, :64].double(), q[:, :64], n[:, :64], 10.0)


@needs_gpu
def test_forward_rejects_bad_plans_on_the_gpu():
    """The CUDA kernel runs the same plan checks as the Meta kernel, before anything is launched."""
    q, n = rows(7, 128, torch.float32, device=DEVICE), rows(1000, 128, torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="no empty split"):
        torch.ops.moco_fast_C.infonce_forward(q, q, n, 10.0, "ieee", 5, 256)
    with pytest.raises(ValueError, match="needs q and negatives both bfloat16"):
        torch.ops.moco_fast_C.infonce_forward(q, q, n, 10.0, "bfloat16", 1, 1024)


@needs_gpu
def test_tile_query_reports_occupancy_on_the_device():
    """Resident forward blocks per SM from cudaOccupancyMaxActiveBlocksPerMultiprocessor: 2 on sm_90 for
    every variant (as tests/machine_code/test_cuda_sass.py derives from the SASS)."""
    dev = torch.cuda.current_device()
    major = torch.cuda.get_device_capability(dev)[0]
    for compute in H.CUDA_COMPUTES:
        for d in (32, 64, 128, 256):
            ctas = torch.ops.moco_fast_C.infonce_forward_tile(compute, d, dev)[4]
            assert ctas >= 1
            if major == 9:
                assert ctas == 2, (compute, d, ctas)


@needs_gpu
def test_momentum_is_one_launch():
    targets = [torch.randn(n, device=DEVICE) for n in (10, 1000, 100_000, 5)]
    sources = [torch.randn_like(t) for t in targets]
    cuda_ext.momentum_update_(targets, sources, 0.5)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        cuda_ext.momentum_update_(targets, sources, 0.5)
        torch.cuda.synchronize()
    kernels = [
        e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and "momentum" in e.name
    ]
    assert len(kernels) == 1, kernels


@needs_gpu
def test_momentum_rejects_mixed_dtypes():
    t = [torch.zeros(4, device=DEVICE), torch.zeros(4, device=DEVICE, dtype=torch.bfloat16)]
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.moco_fast_C.momentum_update_(t, [x.clone() for x in t], 0.5)
