"""The "cuda" backend: moco_fast._C built from csrc/ and its wrappers in moco_fast.cuda_ext.

Three layers:

* CPU, CI: the extension built by ``pip install -e .`` imports, registers a CUDA kernel for every op,
  and its SASS (read with cuobjdump, which triton's package ships) has sm_80 and sm_90 code, tensor-core
  instructions in the InfoNCE forward, and no local-memory spills anywhere. Skipped with a reason when the
  extension was not built (MOCO_FAST_BUILD_CUDA=0, no toolkit); MOCO_FAST_EXPECT_CUDA_EXT=1 (or
  MOCO_FAST_BUILD_CUDA=1) turns "not built" into a failure.
* CPU: a PyTorch emulation of the kernels' algorithm (the tile/chunk plan of bindings.cpp, lazy rescaling,
  rounding of the probabilities, the combine step) against float64 math, so the index and numerics design
  is checked without a GPU.
* GPU (skipped without CUDA): every op against float64 math over the matrix of sizes and dtypes, with the
  CUDA caching allocator poisoned first so an output element the kernels fail to write shows up as NaN/-1.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from moco_fast import cuda_ext

BUILT = importlib.util.find_spec("moco_fast._C") is not None
EXPECT_BUILT = os.environ.get("MOCO_FAST_EXPECT_CUDA_EXT", "") == "1" or os.environ.get(
    "MOCO_FAST_BUILD_CUDA", ""
).strip().lower() in ("1", "true", "yes", "on")
NOT_BUILT = "moco_fast._C was not built (MOCO_FAST_BUILD_CUDA=0, or no CUDA toolkit / CPU torch at install time)"
needs_ext = pytest.mark.skipif(not BUILT, reason=NOT_BUILT)
needs_gpu = pytest.mark.skipif(not (BUILT and torch.cuda.is_available()), reason="needs moco_fast._C and a CUDA GPU")

OPS = ("infonce_forward", "infonce_backward", "infonce_backward_negatives", "momentum_update_", "enqueue_")

# The GPU tests run against these; a local harness may point them at moco_fast.chunked on the CPU to
# check the test code itself.
DEVICE = "cuda"
IMPL = cuda_ext

LOG2E = 1.0 / math.log(2.0)


# ------------------------------------------------------------------------------------------------
# Build and registration (CPU)
# ------------------------------------------------------------------------------------------------


def test_extension_built_when_expected():
    if EXPECT_BUILT:
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
def test_op_schemas_declare_mutation():
    schema = {op: getattr(torch.ops.moco_fast_C, op).default._schema for op in OPS}
    mutable = {
        op: [a.name for a in s.arguments if a.alias_info is not None and a.alias_info.is_write]
        for op, s in schema.items()
    }
    assert mutable["momentum_update_"] == ["targets"]
    assert mutable["enqueue_"] == ["queue", "ptr", "count"]
    assert mutable["infonce_forward"] == mutable["infonce_backward"] == mutable["infonce_backward_negatives"] == []
    assert [a.name for a in schema["infonce_forward"].arguments] == ["q", "k", "negatives", "scale", "allow_tf32"]


@needs_ext
def test_cpu_tensors_are_rejected():
    q = torch.randn(4, 16)
    with pytest.raises(NotImplementedError):
        torch.ops.moco_fast_C.infonce_forward(q, q, q, 1.0, False)


# ------------------------------------------------------------------------------------------------
# SASS of the built library (CPU)
# ------------------------------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    candidates = []
    spec = importlib.util.find_spec("triton")  # no import: triton's package ships cuobjdump
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _library_path() -> str:
    return importlib.util.find_spec("moco_fast._C").origin


def _run_cuobjdump(*args: str) -> str:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (triton's package or a CUDA toolkit ships one)")
    res = subprocess.run([tool, *args, _library_path()], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return res.stdout


@functools.cache
def _sass_functions() -> dict[tuple[str, str], str]:
    """{(arch, mangled function name): SASS text} of every kernel in the library."""
    functions: dict[tuple[str, str], str] = {}
    for section in re.split(r"\nFatbin elf code:", "\n" + _run_cuobjdump("-sass"))[1:]:
        arch = re.search(r"arch = (sm_\d+)", section).group(1)
        parts = re.split(r"\n\s*Function : (\S+)\n", section)
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            functions[(arch, name)] = body
    return functions


@functools.cache
def _resource_usage() -> dict[tuple[str, str], dict[str, int]]:
    usage: dict[tuple[str, str], dict[str, int]] = {}
    arch = None
    lines = _run_cuobjdump("-res-usage").splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"arch = (sm_\d+)", line.strip())
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m and i + 1 < len(lines):
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", lines[i + 1]))
            usage[(arch, m.group(1))] = {k: int(v) for k, v in fields.items()}
    return usage


def _demangled_template_args(name: str) -> tuple[int, int] | None:
    """(compute, D) of an infonce_fwd_kernel<C, D> mangled name."""
    m = re.search(r"infonce_fwd_kernelILi(\d+)ELi(\d+)E", name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _built_arches() -> set[str]:
    return {arch for arch, _ in _sass_functions()}


def _require_arch(arch: str) -> None:
    """A build without a visible GPU (CI) must hold sm_80 and sm_90; a GPU build holds the GPU's arch."""
    built = sorted(_built_arches())
    if arch not in built:
        if torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"):
            pytest.skip(f"{arch} not built ({built}): built for the local GPU or TORCH_CUDA_ARCH_LIST")
        pytest.fail(f"{arch} missing from a no-GPU build (setup.py defaults to 8.0;9.0+PTX): {built}")


@needs_ext
def test_sass_arches():
    arches = _built_arches()
    assert arches and all(int(a[3:]) >= 80 for a in arches), arches
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        assert {"sm_80", "sm_90"} <= arches, arches
        ptx = _run_cuobjdump("--list-ptx")
        assert "sm_90" in ptx, "PTX for later chips (TORCH_CUDA_ARCH_LIST 9.0+PTX) is missing: " + ptx


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_every_kernel_present(arch):
    _require_arch(arch)
    names = [name for a, name in _sass_functions() if a == arch]
    joined = "\n".join(names)
    for kernel in (
        "infonce_combine_kernel",
        "infonce_bwd_kernel",
        "enqueue_kernel",
        "momentum_table_kernel",
        "momentum_flat_kernel",
    ):
        assert kernel in joined, f"{kernel} missing from {arch}"
    fwd = {_demangled_template_args(n) for n in names if _demangled_template_args(n)}
    assert fwd == {(c, d) for c in range(4) for d in (32, 64, 128, 256)}, sorted(fwd)
    dn = set(re.findall(r"infonce_dn_kernelILi(\d+)E", joined))
    assert dn == {"32", "64", "128", "256"}


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_tensor_cores_in_infonce_forward(arch):
    """bf16 (0), fp16 (1) and TF32 (2) forwards run on tensor cores; the IEEE fp32 one (3) on FFMA."""
    _require_arch(arch)
    checked = 0
    for (a, name), body in _sass_functions().items():
        args = _demangled_template_args(name)
        if a != arch or args is None:
            continue
        compute, d = args
        mma = len(re.findall(r"\b(?:HMMA|HGMMA)\b", body))
        if compute in (0, 1, 2):
            assert mma > 0, f"no HMMA/HGMMA in {name} ({arch})"
        else:
            assert mma == 0 and len(re.findall(r"\bFFMA\b", body)) > 0, name
        checked += 1
    assert checked == 16


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_no_local_memory(arch):
    """No LDL/STL (register spills or local arrays) in any kernel, and resource usage agrees."""
    _require_arch(arch)
    functions = {name: body for (a, name), body in _sass_functions().items() if a == arch}
    assert len(functions) >= 30
    offenders = {name: sorted(set(re.findall(r"\b(LDL|STL)\b", body))) for name, body in functions.items()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders
    usage = {name: u for (a, name), u in _resource_usage().items() if a == arch}
    assert set(usage) == set(functions)
    heavy = {name: (u.get("STACK"), u.get("LOCAL")) for name, u in usage.items() if u.get("STACK") or u.get("LOCAL")}
    assert not heavy, heavy
    for name, u in usage.items():
        if _demangled_template_args(name) and _demangled_template_args(name)[1] < 256:
            assert u["REG"] <= 128, (name, u)  # two blocks of 256 threads per SM


# ------------------------------------------------------------------------------------------------
# PyTorch emulation of the kernels' algorithm (CPU)
# ------------------------------------------------------------------------------------------------

COMPUTES = ("bf16", "f16", "tf32", "f32")  # csrc/moco_fast.h Compute, in order


def _tile_shape(compute: str, d: int) -> tuple[int, int]:
    """mf::fwd_tile_shape: (rows per block, keys per tile)."""
    f32 = compute in ("tf32", "f32")
    return (32 if f32 and d > 128 else 64), (32 if f32 or d > 128 else 64)


def _plan(B: int, K: int, compute: str, d: int, sms: int) -> tuple[int, int]:
    """bindings.cpp infonce_forward: (nsplit, chunk)."""
    if K == 0:
        return 0, 0
    bm, bn = _tile_shape(compute, d)
    row_tiles, key_tiles = -(-B // bm), -(-K // bn)
    nsplit = min(max(1, -(-2 * sms // row_tiles)), key_tiles, 1024)
    tiles_per_split = -(-key_tiles // nsplit)
    return -(-key_tiles // tiles_per_split), tiles_per_split * bn


def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: keep 10 mantissa bits, rounding half away from zero (finite inputs)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _round(x: torch.Tensor, compute: str) -> torch.Tensor:
    if compute == "bf16":
        return x.to(torch.bfloat16).float()
    if compute == "f16":
        return x.to(torch.float16).float()
    if compute == "tf32":
        return _round_tf32(x)
    return x.float()


def _emulate_forward(q, k, n, scale, compute, sms=132, threshold=8.0):
    """The split kernel + combine kernel of csrc/infonce.cu, tile by tile, in fp32 PyTorch."""
    B, d = q.shape
    K = n.shape[0]
    _, bn = _tile_shape(compute, d)
    nsplit, chunk = _plan(B, K, compute, d, sms)
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
    assert [c for c in covered] == [(s * chunk, min(K, (s + 1) * chunk)) for s in range(nsplit)]
    assert not covered or (covered[0][0] == 0 and covered[-1][1] == K)
    big_m = t0.clone()
    for m, *_ in parts:
        big_m = torch.maximum(big_m, m)
    w0 = torch.exp2(t0 - big_m)
    big_l, out, rank = w0.clone(), w0[:, None] * k.float(), torch.zeros(B, dtype=torch.int64)
    for m, lsum, o, cnt in parts:
        w = torch.exp2(m - big_m)
        big_l, out, rank = big_l + lsum * w, out + w[:, None] * o, rank + cnt
    return (big_m + torch.log2(big_l)) / LOG2E, out / big_l[:, None], rank


def _reference(q, k, n, scale):
    """float64 math: (lse, out, rank, logits of the negatives, positive logit)."""
    q64, k64, n64 = q.double(), k.double(), n.double()
    pos = (q64 * k64).sum(1) * scale
    neg = (q64 @ n64.T) * scale
    logits = torch.cat([pos[:, None], neg], dim=1)
    lse = torch.logsumexp(logits, dim=1)
    p = torch.exp(logits - lse[:, None])
    out = p[:, :1] * k64 + p[:, 1:] @ n64
    rank = (neg > pos[:, None]).sum(1)
    return lse, out, rank, neg, pos


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_rank(rank, ref_rank, neg, pos, tie_tol):
    """Exact, except for negatives within tie_tol of the positive logit (rounding may flip those)."""
    assert rank.dtype == torch.int64 and (rank >= 0).all()
    near = ((neg - pos[:, None]).abs() <= tie_tol).sum(1)
    diff = (rank.cpu() - ref_rank.cpu()).abs()
    assert (diff <= near.cpu()).all(), (diff.max().item(), near.max().item())


def _unit(*shape, dtype=torch.float32, device="cpu"):
    return F.normalize(torch.randn(*shape, device=device), dim=-1).to(dtype)


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("B,K,d", [(1, 1, 16), (7, 1000, 96), (37, 4099, 32), (70, 333, 256), (5, 0, 48)])
def test_emulated_algorithm_matches_float64(compute, B, K, d):
    dt = {"bf16": torch.bfloat16, "f16": torch.float16}.get(compute, torch.float32)
    q, k, n = _unit(B, d, dtype=dt), _unit(B, d, dtype=dt), _unit(K, d, dtype=dt)
    scale = 1 / 0.07
    lse, out, rank = _emulate_forward(q, k, n, scale, compute, sms=8)
    ref_lse, ref_out, ref_rank, neg, pos = _reference(q, k, n, scale)
    tol = {"bf16": 1e-2, "f16": 3e-3, "tf32": 2e-3, "f32": 1e-5}[compute]
    assert _rel(lse, ref_lse) < (1e-3 if compute == "tf32" else 1e-5)  # TF32 rounds q and the keys
    assert _rel(out, ref_out) < tol
    _check_rank(rank, ref_rank, neg, pos, tie_tol=1e-2 if compute == "tf32" else 1e-4)


@pytest.mark.parametrize("compute", ["bf16", "f32"])
def test_emulated_lazy_rescaling_with_wide_logits(compute):
    """Unnormalized keys in increasing magnitude force many rescales; the results stay exact-ish."""
    B, K, d = 9, 3000, 64
    dt = torch.bfloat16 if compute == "bf16" else torch.float32
    q = torch.randn(B, d).to(dt)
    k = torch.randn(B, d).to(dt)
    n = (torch.randn(K, d) * torch.linspace(0.1, 3.0, K)[:, None]).to(dt)
    scale = 1 / 0.5
    lse, out, rank = _emulate_forward(q, k, n, scale, compute, sms=2)
    ref_lse, ref_out, ref_rank, neg, pos = _reference(q, k, n, scale)
    assert _rel(lse, ref_lse) < 1e-5
    assert _rel(out, ref_out) < (1e-2 if compute == "bf16" else 1e-5)
    _check_rank(rank, ref_rank, neg, pos, tie_tol=1e-3)


@pytest.mark.parametrize("compute", COMPUTES)
@pytest.mark.parametrize("K", [1, 31, 32, 33, 1000, 4099, 65536, 1 << 20])
def test_split_plan_covers_every_key_once(compute, K):
    for B in (1, 7, 64, 65, 256, 4096):
        for sms in (1, 108, 132):
            for d in (16, 128, 256):
                bm, bn = _tile_shape(compute, d)
                nsplit, chunk = _plan(B, K, compute, d, sms)
                assert 1 <= nsplit <= 1024 and chunk % bn == 0
                assert (nsplit - 1) * chunk < K <= nsplit * chunk  # no empty chunk, all keys covered
                row_tiles = -(-B // bm)
                assert nsplit * row_tiles <= 2 * sms + row_tiles  # about one wave of 2 blocks per SM


# ------------------------------------------------------------------------------------------------
# GPU: InfoNCE
# ------------------------------------------------------------------------------------------------


def _poison_allocator():
    """Fill cached allocator blocks with 0xFF bytes (NaN as float, -1 as int64) before a kernel runs."""
    if DEVICE != "cuda":
        return
    small = [torch.empty(1 << 20, dtype=torch.uint8, device=DEVICE).fill_(255) for _ in range(4)]
    large = torch.empty(512 << 20, dtype=torch.uint8, device=DEVICE).fill_(255)
    del small, large


@contextlib.contextmanager
def _no_host_sync():
    """torch raises on any synchronizing CUDA call inside (the ops must not sync)."""
    if DEVICE != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@contextlib.contextmanager
def _matmul_precision(precision: str):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# name: (q dtype, k dtype, negatives dtype, float32 matmul precision, relative tolerance, tie tolerance)
DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32, "highest", 1e-5, 1e-4),
    "tf32": (torch.float32, torch.float32, torch.float32, "high", 2e-3, 2e-2),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, "highest", 1e-2, 1e-3),
    "fp16": (torch.float16, torch.float16, torch.float16, "highest", 5e-3, 1e-3),
    "fp32q_bf16n": (torch.float32, torch.float32, torch.bfloat16, "highest", 1e-5, 1e-4),
    "bf16q_fp16n_tf32": (torch.bfloat16, torch.float32, torch.float16, "high", 2e-3, 2e-2),
}


def _forward_case(B, K, d, name, temperature=0.07, inputs=None):
    qt, kt, nt, precision, tol, tie = DTYPES[name]
    if inputs is None:
        q, k, n = (
            _unit(B, d, dtype=qt, device=DEVICE),
            _unit(B, d, dtype=kt, device=DEVICE),
            _unit(K, d, dtype=nt, device=DEVICE),
        )
    else:
        q, k, n = inputs
    scale = 1.0 / temperature
    _poison_allocator()
    with _matmul_precision(precision), _no_host_sync():
        _, lse, out, rank = IMPL.infonce_forward(q, k, n, scale)
    assert lse.shape == (B,) and out.shape == (B, d) and rank.shape == (B,)
    assert lse.dtype == out.dtype == torch.float32 and rank.dtype == torch.int64
    ref_lse, ref_out, ref_rank, neg, pos = _reference(q, k, n, scale)
    assert _rel(lse, ref_lse) < tol, name
    assert _rel(out, ref_out) < tol, name
    _check_rank(rank, ref_rank, neg, pos, tie_tol=tie * scale * max(1.0, q.float().norm(dim=1).max().item() ** 2))
    return lse, out, rank


@needs_gpu
@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("d", [16, 96, 128])
@pytest.mark.parametrize("K", [0, 1, 1000, 4099, 65536])
@pytest.mark.parametrize("B", [1, 7, 37, 256])
def test_forward_matrix(B, K, d, name):
    _forward_case(B, K, d, name)


@needs_gpu
@pytest.mark.parametrize("name", ["fp32", "tf32", "bf16", "fp16", "fp32q_bf16n"])
@pytest.mark.parametrize("d", [1, 33, 100, 200, 256])
def test_forward_other_dims(d, name):
    """d padded up to 32/64/128/256 (zero columns), unaligned d through the converting loader."""
    _forward_case(37, 1000, d, name)
    _forward_case(130, 65, d, name)


@needs_gpu
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_forward_wide_logits_and_large_batch(name):
    """Unnormalized inputs (logits spanning hundreds of units: many lazy rescales) and B = 4096.
    (Not TF32: rounding q to 10 bits moves such logits by ~0.05, i.e. ~5% in the probabilities.)"""
    qt, kt, nt = DTYPES[name][:3]
    B, K, d = 4096, 4099, 128
    q = torch.randn(B, d, device=DEVICE).to(qt)
    k = torch.randn(B, d, device=DEVICE).to(kt)
    n = (torch.randn(K, d, device=DEVICE) * torch.linspace(0.1, 2.0, K, device=DEVICE)[:, None]).to(nt)
    _forward_case(B, K, d, name, temperature=2.0, inputs=(q, k, n))


@needs_gpu
def test_forward_unaligned_and_strided_inputs():
    """A view at an odd element offset (not 16-byte aligned) and a transposed (non-contiguous) negatives."""
    d = 128
    base = _unit(1 + 37 * d, 1, device=DEVICE).flatten()
    q = base[1:].view(37, d)  # 4-byte offset
    k = _unit(37, d, device=DEVICE)
    n = _unit(d, 999, device=DEVICE).T  # non-contiguous
    _forward_case(37, 999, d, "fp32", inputs=(q, k, n))
    _forward_case(37, 999, d, "bf16", inputs=(q.bfloat16(), k.bfloat16(), n.bfloat16()))


@needs_gpu
def test_forward_nan_propagates():
    q, k, n = _unit(9, 64, device=DEVICE), _unit(9, 64, device=DEVICE), _unit(500, 64, device=DEVICE)
    q2 = q.clone()
    q2[3, 5] = float("nan")
    _, lse, out, _ = IMPL.infonce_forward(q2, k, n, 10.0)
    assert torch.isnan(lse[3]) and torch.isnan(out[3]).all()
    assert torch.isfinite(lse[torch.arange(9, device=DEVICE) != 3]).all()
    n2 = n.clone()
    n2[123, 0] = float("nan")  # one bad queue entry poisons every row
    _, lse, out, _ = IMPL.infonce_forward(q, k, n2, 10.0)
    assert torch.isnan(lse).all() and torch.isnan(out).all()


@needs_gpu
def test_forward_large_d_falls_back():
    _forward_case(7, 100, 300, "fp32")


@needs_gpu
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp32q_bf16n"])
@pytest.mark.parametrize("K", [0, 1000])
@pytest.mark.parametrize("B,d", [(1, 16), (37, 96), (256, 128)])
def test_backward(B, K, d, name):
    qt, kt, nt = DTYPES[name][:3]
    q, k, n = (
        _unit(B, d, dtype=qt, device=DEVICE),
        _unit(B, d, dtype=kt, device=DEVICE),
        _unit(K, d, dtype=nt, device=DEVICE),
    )
    scale = 1 / 0.07
    grad = torch.rand(B, device=DEVICE) + 0.5
    ref_lse, ref_out, *_ = _reference(q, k, n, scale)
    lse, out = ref_lse.float(), ref_out.float()
    _poison_allocator()
    with _no_host_sync():
        dq, dk = IMPL.infonce_backward(grad, q, k, lse, out, scale)
    assert dq.dtype == qt and dk.dtype == kt and dq.shape == dk.shape == (B, d)
    g = grad.double()[:, None] * scale
    p0 = torch.exp((q.double() * k.double()).sum(1) * scale - ref_lse)
    ref_dq = g * (ref_out - k.double())
    ref_dk = g * (p0 - 1)[:, None] * q.double()
    tol = 1e-5 if qt == torch.float32 else 1e-2
    assert _rel(dq, ref_dq) < tol
    if K == 0:  # p0 = 1: dk vanishes up to rounding of lse
        assert dk.double().abs().max().item() < 1e-4 * scale
    else:
        assert _rel(dk, ref_dk) < (1e-4 if kt == torch.float32 else 1e-2)


@needs_gpu
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp32q_bf16n"])
@pytest.mark.parametrize("K", [1, 1000, 4099])
@pytest.mark.parametrize("B,d", [(1, 16), (37, 96), (256, 128), (5, 256), (9, 33)])
def test_backward_negatives(B, K, d, name):
    qt, _, nt = DTYPES[name][:3]
    q, n = _unit(B, d, dtype=qt, device=DEVICE), _unit(K, d, dtype=nt, device=DEVICE)
    k = _unit(B, d, dtype=qt, device=DEVICE)
    scale = 1 / 0.07
    grad = torch.rand(B, device=DEVICE) + 0.5
    ref_lse, *_ = _reference(q, k, n, scale)
    _poison_allocator()
    with _no_host_sync():
        dn = IMPL.infonce_backward_negatives(grad, q, n, ref_lse.float(), scale)
    assert dn.dtype == nt and dn.shape == (K, d)
    p = torch.exp((q.double() @ n.double().T) * scale - ref_lse[:, None])
    ref = scale * (grad.double()[:, None] * p).T @ q.double()
    assert _rel(dn, ref) < (1e-5 if nt == torch.float32 else 1e-2)


@needs_gpu
def test_public_info_nce_cuda_backend_matches_reference():
    import moco_fast

    if not hasattr(moco_fast, "info_nce"):
        pytest.skip("moco_fast.info_nce not available")
    q = _unit(37, 128, device=DEVICE).requires_grad_()
    k = _unit(37, 128, device=DEVICE).requires_grad_()
    n = _unit(4099, 128, device=DEVICE).requires_grad_()
    losses, grads = [], []
    for backend in ("cuda", "reference"):
        loss = moco_fast.info_nce(q, k, n, 0.07, backend=backend)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, (q, k, n)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        assert _rel(a, b) < 1e-4


# ------------------------------------------------------------------------------------------------
# GPU: enqueue
# ------------------------------------------------------------------------------------------------


def _state(K, d, dtype, ptr, count):
    queue = torch.randn(K, d, device=DEVICE).to(dtype)
    return queue, torch.tensor([ptr], device=DEVICE), torch.tensor([count], device=DEVICE)


@needs_gpu
def test_enqueue_wraps_around():
    queue, ptr, count = _state(10, 7, torch.float32, 8, 8)
    before = queue.clone()
    keys = torch.randn(5, 7, device=DEVICE)
    with _no_host_sync():
        ok = IMPL.enqueue_(queue, ptr, count, keys, False)
    assert ok.dtype == torch.bool and ok.shape == (1,) and bool(ok)
    rows = [8, 9, 0, 1, 2]
    torch.testing.assert_close(queue[rows], keys, rtol=0, atol=0)
    torch.testing.assert_close(queue[3:8], before[3:8], rtol=0, atol=0)
    assert ptr.item() == 3 and count.item() == 10


@needs_gpu
@pytest.mark.parametrize("qdt", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kdt", [torch.float32, torch.bfloat16, torch.float64])
def test_enqueue_normalizes_and_casts(qdt, kdt):
    K, d, B = 37, 96, 37  # B == K: every row, starting mid-queue
    queue, ptr, count = _state(K, d, qdt, 5, 0)
    keys = (torch.randn(B, d, device=DEVICE) * 3).to(kdt)
    ok = IMPL.enqueue_(queue, ptr, count, keys, True)
    assert bool(ok) and ptr.item() == 5 and count.item() == 37
    expect = F.normalize(keys.double(), dim=1).to(qdt)
    got = queue[(5 + torch.arange(B, device=DEVICE)) % K]
    tol = {torch.float32: 1e-6, torch.float64: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[qdt]
    torch.testing.assert_close(got.double(), expect.double(), rtol=tol, atol=tol)


@needs_gpu
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_enqueue_rejects_non_finite_keys_atomically(bad):
    queue, ptr, count = _state(64, 33, torch.bfloat16, 60, 60)
    before = queue.clone()
    keys = torch.randn(9, 33, device=DEVICE)
    keys[8, 32] = bad  # the very last element
    ok = IMPL.enqueue_(queue, ptr, count, keys, True)
    assert not bool(ok)
    assert torch.equal(queue.view(torch.int16), before.view(torch.int16))
    assert ptr.item() == 60 and count.item() == 60


@needs_gpu
def test_enqueue_large_batch_and_sequence():
    K, d = 65536, 128
    queue, ptr, count = _state(K, d, torch.bfloat16, 0, 0)
    seen = []
    for B in (4096, 7, 65536, 1000):
        keys = torch.randn(B, d, device=DEVICE)
        start = ptr.item()
        ok = IMPL.enqueue_(queue, ptr, count, keys, True)
        assert bool(ok)
        rows = (start + torch.arange(B, device=DEVICE)) % K
        torch.testing.assert_close(queue[rows].float(), F.normalize(keys, dim=1).bfloat16().float(), rtol=0, atol=8e-3)
        seen.append(B)
        assert ptr.item() == (start + B) % K and count.item() == min(sum(seen), K)


# ------------------------------------------------------------------------------------------------
# GPU: momentum
# ------------------------------------------------------------------------------------------------


def _expected_momentum(t, s, m):
    if t.dtype == torch.float64:
        return t * m + s * (1 - m)
    return (t.float() * m + s.float() * (1 - m)).to(t.dtype)


_MOMENTUM_TOL = {torch.float32: 2e-7, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_momentum_list_of_many_tensors(dtype):
    sizes = [0, 1, 3, 7, 8, 9, 1000, 4099, 70000, (1 << 20) + 3] + [int(x) for x in torch.randint(1, 300, (3000,))]
    targets = [torch.randn(n, device=DEVICE).to(dtype) for n in sizes]
    sources = [torch.randn(n, device=DEVICE).to(dtype) for n in sizes]
    expect = [_expected_momentum(t, s, 0.99) for t, s in zip(targets, sources, strict=True)]
    with _no_host_sync():
        IMPL.momentum_update_(targets, sources, 0.99)
    tol = _MOMENTUM_TOL[dtype]
    for got, exp in zip(targets, expect, strict=True):
        torch.testing.assert_close(got, exp, rtol=tol, atol=tol)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_momentum_misaligned_views_and_shapes(dtype):
    """Views at odd offsets (scalar path), 2-D/4-D shapes, neighbours untouched."""
    buf_t = torch.randn(10_000, device=DEVICE).to(dtype)
    buf_s = torch.randn(10_000, device=DEVICE).to(dtype)
    before = buf_t.clone()
    targets = [buf_t[1:1001], buf_t[1003 : 1003 + 64 * 3 * 3].view(64, 3, 3), buf_t[2000 : 2000 + 33 * 7].view(33, 7)]
    sources = [buf_s[5:1005], buf_s[3001 : 3001 + 64 * 3 * 3].view(64, 3, 3), buf_s[4000 : 4000 + 33 * 7].view(33, 7)]
    expect = [_expected_momentum(t, s, 0.9) for t, s in zip(targets, sources, strict=True)]
    IMPL.momentum_update_(targets, sources, 0.9)
    tol = _MOMENTUM_TOL[dtype]
    for got, exp in zip(targets, expect, strict=True):
        torch.testing.assert_close(got, exp, rtol=tol, atol=tol)
    untouched = torch.ones(10_000, dtype=torch.bool, device=DEVICE)
    untouched[1:1001] = untouched[1003 : 1003 + 576] = untouched[2000:2231] = False
    assert torch.equal(buf_t[untouched], before[untouched])


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_momentum_flat_buffer(dtype):
    t = torch.randn(3_000_017, device=DEVICE).to(dtype)
    s = torch.randn(3_000_017, device=DEVICE).to(dtype)
    expect = _expected_momentum(t, s, 0.999)
    with _no_host_sync():
        IMPL.momentum_update_([t], [s], 0.999)
    tol = _MOMENTUM_TOL[dtype]
    torch.testing.assert_close(t, expect, rtol=tol, atol=tol)


@needs_gpu
def test_momentum_is_one_launch():
    if DEVICE != "cuda":
        pytest.skip("counts CUDA kernels")
    targets = [torch.randn(n, device=DEVICE) for n in (10, 1000, 100_000, 5)]
    sources = [torch.randn_like(t) for t in targets]
    IMPL.momentum_update_(targets, sources, 0.5)  # warm-up
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        IMPL.momentum_update_(targets, sources, 0.5)
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
