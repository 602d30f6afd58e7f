"""Machine code of the built CUDA extension moco_fast._C, read offline (no GPU) with cuobjdump.

A build without a visible GPU (CI) holds sm_80 and sm_90 SASS plus sm_90 PTX. For every kernel: no
local memory (LDL/STL, stack). For the InfoNCE forward variants (4 compute types x d padded to
32/64/128/256): tensor-core HMMA for bf16/fp16/TF32 and FFMA for IEEE fp32, cp.async (LDGSTS) tile
loads, and registers x threads and shared memory that let the designed number of blocks share an SM
(the figures are in docs/cuda_extension.md). The momentum kernels keep 16-byte vector loads and stores.

Skipped with a reason when the extension was not built or no cuobjdump exists (triton's package ships
one); MOCO_FAST_EXPECT_CUDA_EXT=1 (or MOCO_FAST_BUILD_CUDA=1) turns "not built" into a failure in
tests/test_cuda_ext.py.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import subprocess

import pytest
import torch
from conftest import find_cuobjdump

BUILT = importlib.util.find_spec("moco_fast._C") is not None
needs_ext = pytest.mark.skipif(not BUILT, reason="moco_fast._C was not built")

# The forward's compute types in the order of csrc/moco_fast.h mf::Compute (the template argument C).
COMPUTES = ("bfloat16", "float16", "tf32", "ieee")
DIMS = (32, 64, 128, 256)

# Per-SM limits (CUDA programming guide, compute capabilities 8.0 and 9.0).
SM_LIMITS = {
    "sm_80": {"regs": 65536, "smem": 164 * 1024, "threads": 2048, "reserved_smem": 1024},
    "sm_90": {"regs": 65536, "smem": 228 * 1024, "threads": 2048, "reserved_smem": 1024},
}
# Resident forward blocks per SM the kernels are built for (csrc/infonce.cu kFwdMinCtas), and the measured
# exceptions: on sm_80 (164 KB per SM) the fp32 d=128 tile (84.2 KB) fits once.
DESIGNED_CTAS = 2
CTAS_EXCEPTIONS = {("sm_80", "tf32", 128): 1, ("sm_80", "ieee", 128): 1}


def _run_cuobjdump(*args: str) -> str:
    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (triton's package or a CUDA toolkit ships one)")
    lib = importlib.util.find_spec("moco_fast._C").origin
    res = subprocess.run([tool, *args, lib], capture_output=True, text=True, timeout=600)
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
    """{(arch, mangled function name): {"REG": .., "STACK": .., "SHARED": .., "LOCAL": .., ...}}."""
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


def _fwd_args(name: str) -> tuple[str, int] | None:
    """(compute name, D) of an infonce_fwd_kernel<C, D> mangled name."""
    m = re.search(r"infonce_fwd_kernelILi(\d+)ELi(\d+)E", name)
    return (COMPUTES[int(m.group(1))], int(m.group(2))) if m else None


def _forward_kernels(arch: str) -> dict[tuple[str, int], str]:
    """{(compute, D): mangled name} of the forward variants built for arch."""
    return {_fwd_args(n): n for a, n in _sass_functions() if a == arch and _fwd_args(n)}


def _count(pattern: str, body: str) -> int:
    return len(re.findall(pattern, body))


def _require_arch(arch: str) -> None:
    """A build without a visible GPU (CI) must hold sm_80 and sm_90; a GPU build holds the GPU's arch."""
    built = sorted({a for a, _ in _sass_functions()})
    if arch not in built:
        if torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST"):
            pytest.skip(f"{arch} not built ({built}): built for the local GPU or TORCH_CUDA_ARCH_LIST")
        pytest.fail(f"{arch} missing from a no-GPU build (setup.py defaults to 8.0;9.0+PTX): {built}")


def ctas_per_sm(arch: str, regs: int, threads: int, smem: int) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256), threads and shared memory."""
    lim = SM_LIMITS[arch]
    regs_per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = lim["regs"] // (regs_per_warp * (threads // 32))
    by_smem = lim["smem"] // (smem + lim["reserved_smem"])
    return min(by_regs, by_smem, lim["threads"] // threads, 32)


@needs_ext
def test_sass_arches():
    arches = {arch for arch, _ in _sass_functions()}
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
    assert set(_forward_kernels(arch)) == {(c, d) for c in COMPUTES for d in DIMS}
    dn = set(re.findall(r"infonce_dn_kernelILi(\d+)E", joined))
    assert dn == {"32", "64", "128", "256"}


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_forward_instructions(arch):
    """bf16/fp16/TF32 forwards run on tensor cores (HMMA), IEEE fp32 on FFMA; every variant streams its
    tiles with cp.async (LDGSTS)."""
    _require_arch(arch)
    functions = _sass_functions()
    for (compute, d), name in _forward_kernels(arch).items():
        body = functions[(arch, name)]
        mma = _count(r"\b(?:HMMA|HGMMA)\b", body)
        if compute == "ieee":
            assert mma == 0 and _count(r"\bFFMA\b", body) > 0, (compute, d)
        else:
            assert mma > 0, f"no HMMA in the {compute} d={d} forward ({arch})"
        assert _count(r"\bLDGSTS\b", body) > 0, f"no cp.async in the {compute} d={d} forward ({arch})"


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_no_local_memory(arch):
    """No LDL/STL (register spills or local arrays) in any kernel, and 0-byte stacks."""
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


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_forward_occupancy(arch):
    """Registers x threads and shared memory (from the extension's own tile query) let DESIGNED_CTAS forward
    blocks share an SM, for every variant and both chips (but the sm_80 fp32 d=128 exception)."""
    _require_arch(arch)
    import moco_fast._C  # noqa: F401  (loading the library registers torch.ops.moco_fast_C)

    usage = _resource_usage()
    got = {}
    for (compute, d), name in _forward_kernels(arch).items():
        _bm, _bn, threads, smem, _ctas, _splits = torch.ops.moco_fast_C.infonce_forward_tile(compute, d)
        regs = usage[(arch, name)]["REG"]
        assert regs * threads * DESIGNED_CTAS <= SM_LIMITS[arch]["regs"], (compute, d, regs)
        got[(compute, d)] = ctas_per_sm(arch, regs, threads, smem)
    expect = {(c, d): CTAS_EXCEPTIONS.get((arch, c, d), DESIGNED_CTAS) for c in COMPUTES for d in DIMS}
    assert got == expect


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_sass_momentum_vectorized(arch):
    """Both momentum kernels, every dtype: 16-byte loads of target and source and 16-byte stores."""
    _require_arch(arch)
    kernels = {n: b for (a, n), b in _sass_functions().items() if a == arch and "momentum_" in n}
    assert len(kernels) == 8, sorted(kernels)
    for name, body in kernels.items():
        assert _count(r"\bLDG\.E\.128\.CONSTANT\b", body) > 0, name  # the source, read-only path
        assert _count(r"\b(?:LDG|LD)\.E\.128\b", body) > 0, name  # the target
        assert _count(r"\b(?:STG|ST)\.E\.128\b", body) > 0, name
