"""The Triton kernels the launchers pick build for Hopper (sm_90a, 132 SMs as H100/H200) and Ampere
(sm_80, 108 SMs as A100) on a machine with no GPU, under this environment's triton and (when
MOCO_FAST_TRITON36_PYTHON names a python with triton 3.6, as .ci/run sets it) under triton 3.6, the
GPU machine's version: no local-memory spills, shared memory within the chip's limit, the programs
per SM the heuristics count on, tensor cores (HGMMA on sm_90, HMMA on sm_80) for the InfoNCE dots,
asynchronous copies in the sm_90 forward, 128-bit accesses in the momentum kernels.

What is compiled is exactly what the launchers launch: a worker subprocess (TRITON_INTERPRET=0, this
file with --worker) replaces every kernel object of moco_fast.kernels by a recorder, calls the real
launchers on CPU tensors of the headline shapes (with the device's SM count / compute capability and
the fp32 precision patched in), and compiles each recorded launch with triton's own binder (the same
argument specialization as a launch: alignment, divisibility by 16, ints equal to 1) through
triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)); triton's bundled cuobjdump reads
the SASS and resource usage. The worker needs triton, torch and moco_fast (a side venv reaches the
last two through a .pth line placed after its own site-packages).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# Shared memory per SM and per block (bytes), registers per SM, threads per SM, per compute capability.
CHIP = {
    90: dict(smem_sm=233472, smem_block=232448, regs=65536, threads=2048),
    80: dict(smem_sm=167936, smem_block=166912, regs=65536, threads=2048),
}
SMS = {90: 132, 80: 108}
K_HEADLINE = 65536
TEMP = 0.07
DTYPE_MIXES = {  # name: (q, k, negatives dtype names, fp32 precision)
    "bf16": ("bfloat16", "bfloat16", "bfloat16", "ieee"),
    "fp16": ("float16", "float16", "float16", "ieee"),
    "fp32_tf32": ("float32", "float32", "float32", "tf32"),
    "fp32_ieee": ("float32", "float32", "float32", "ieee"),
    "fp32q_bf16n_tf32": ("float32", "float32", "bfloat16", "tf32"),
}
RESNET50_PARAMS = 25_557_032  # not a multiple of 16: the flat kernel's masked tail


def cases() -> list[dict]:
    """Every problem the worker plans and compiles (pure Python: the parent parametrizes on it)."""
    out = []
    for cc in (90, 80):
        for B in (1, 256, 4096):
            for d in (16, 96, 128, 256):
                for mix in DTYPE_MIXES:
                    out.append(
                        dict(
                            name=f"infonce_B{B}_d{d}_{mix}_sm{cc}", op="infonce", cc=cc, B=B, K=K_HEADLINE, d=d, mix=mix
                        )
                    )
    # So many rows that a single split fills the chip: the fused (FINALIZE) forward, with a ragged K.
    for d in (96, 128):
        for mix in ("bf16", "fp16"):
            out.append(
                dict(name=f"infonce_B32768_K4000_d{d}_{mix}_sm90", op="infonce", cc=90, B=32768, K=4000, d=d, mix=mix)
            )
    for dt in ("float32", "bfloat16"):
        out.append(dict(name=f"momentum_flat_{dt}_sm90", op="momentum_flat", cc=90, dtype=dt))
        out.append(dict(name=f"momentum_multi_{dt}_sm90", op="momentum_multi", cc=90, dtype=dt, offset=0))
    out.append(
        dict(name="momentum_multi_float32_unaligned_sm90", op="momentum_multi", cc=90, dtype="float32", offset=1)
    )
    for kd, qd, norm in (("float32", "float32", True), ("float32", "bfloat16", True), ("bfloat16", "float16", False)):
        out.append(dict(name=f"enqueue_256x128_{kd}_to_{qd}_sm90", op="enqueue", cc=90, kd=kd, qd=qd, normalize=norm))
    return out


# ---------------------------------------------------------------------------------------------
# worker (subprocess, TRITON_INTERPRET=0)
# ---------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.fn, grid, args, kwargs))


def _record_case(case: dict, KN) -> list[tuple]:
    """Run the launchers of ``case`` with recorders in place of the kernels; the recorded launches."""
    import torch
    from moco_fast.kernels import enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum, runtime

    log: list = []
    saved = {}
    for mod in (enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum):
        for name in dir(mod):
            if name.endswith("_kernel"):
                saved[(mod, name)] = getattr(mod, name)
                setattr(mod, name, _Recorder(getattr(mod, name), log))
    cc = case["cc"]
    saved_info, saved_prec = runtime.device_info, runtime.fp32_precision
    runtime.device_info = lambda device: (SMS[cc], (cc // 10, cc % 10))
    prec = DTYPE_MIXES[case["mix"]][3] if case["op"] == "infonce" else "ieee"
    runtime.fp32_precision = lambda: prec
    try:
        dt = lambda name: getattr(torch, name)  # noqa: E731
        if case["op"] == "infonce":
            qd, kd, nd, _ = DTYPE_MIXES[case["mix"]]
            B, d = case["B"], case["d"]
            q, k = torch.empty(B, d, dtype=dt(qd)), torch.empty(B, d, dtype=dt(kd))
            n = torch.empty(case["K"], d, dtype=dt(nd))
            loss, lse, delta, _ = KN.infonce_forward(q, k, n, 1 / TEMP)
            grad = torch.empty(B)
            KN.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
            KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
        elif case["op"] == "momentum_flat":
            t = torch.empty(RESNET50_PARAMS, dtype=dt(case["dtype"]))
            KN.momentum_update_([t], [torch.empty_like(t)], 0.999)
        elif case["op"] == "momentum_multi":
            o = case["offset"]
            sizes = [64 * 3 * 7 * 7, 64, 2048 * 1000, 1000, 70001]
            bt = torch.empty(sum(sizes) + 64, dtype=dt(case["dtype"]))
            bs = torch.empty_like(bt)
            ts, ss, pos = [], [], o
            for n_el in sizes:  # views with gaps: not back to back, so the multi-tensor kernel runs
                ts.append(bt[pos : pos + n_el])
                ss.append(bs[pos : pos + n_el])
                pos += n_el + 8
            KN.momentum_update_(ts, ss, 0.999)
        elif case["op"] == "enqueue":
            queue = torch.empty(K_HEADLINE, 128, dtype=dt(case["qd"]))
            keys = torch.empty(256, 128, dtype=dt(case["kd"]))
            ptr = torch.zeros(1, dtype=torch.int64)
            KN.enqueue_(queue, ptr, ptr.clone(), keys, case["normalize"])
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
        runtime.device_info, runtime.fp32_precision = saved_info, saved_prec
    return log


def _sass_stats(cubin: bytes, cuobjdump: str, tmp: str, name: str) -> dict:
    path = os.path.join(tmp, name + ".cubin")
    with open(path, "wb") as fh:
        fh.write(cubin)
    sass = subprocess.run([cuobjdump, "--dump-sass", path], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    grab = lambda key: int(m.group(1)) if (m := re.search(key + r":(\d+)", usage.stdout)) else -1  # noqa: E731
    count = lambda pat: len(re.findall(pat, sass))  # noqa: E731
    return dict(
        regs=grab("REG"),
        local=grab("LOCAL"),
        stack=grab("STACK"),
        ldl_stl=count(r"\b(?:LDL|STL)\b"),
        ldgsts=count(r"\bLDGSTS\b"),
        utmaldg=count(r"\bUTMALDG\b"),
        hgmma=count(r"\bHGMMA\b"),
        hmma=count(r"\bHMMA\b"),
        ldg128=count(r"\bLDG\.E\.128\b"),
        stg128=count(r"\bSTG\.E\.128\b"),
        sass_lines=sass.count("\n"),
    )


def _worker(out_path: str, shard: int, num_shards: int) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    import moco_fast.kernels as KN
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    assert KN.AVAILABLE and not KN.INTERPRETED, KN.IMPORT_ERROR
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cuobjdump = bundled if os.path.exists(bundled) else os.environ["MOCO_FAST_CUOBJDUMP"]
    only = re.compile(os.environ.get("MOCO_FAST_CASE_FILTER", ""))
    backends = {}
    launches: dict[str, tuple] = {}  # key -> (fn, target, signature, constexprs, attrs, options)
    per_case = {}
    for case in cases():
        if not only.search(case["name"]):
            continue
        cc = case["cc"]
        target = GPUTarget("cuda", cc, 32)
        backend = backends.setdefault(cc, make_backend(target))
        keys = []
        for fn, grid, args, kwargs in _record_case(case, KN):
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
            launch_opts = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg")}
            key = json.dumps(
                [fn.__name__, cc, signature, sorted(map(repr, constexprs.items())), repr(attrs), launch_opts],
                default=str,
            )
            launches.setdefault(key, (fn, target, signature, constexprs, attrs, launch_opts))
            keys.append(
                dict(
                    key=key,
                    kernel=fn.__name__,
                    grid=list(grid),
                    consts={p.name: str(v) for p, v in zip(fn.params, bound.values()) if p.is_constexpr},
                    **launch_opts,
                )
            )
        per_case[case["name"]] = keys
    results = {}
    tmp = tempfile.mkdtemp(prefix="moco_sass_")
    for i, key in enumerate(sorted(launches)):
        if i % num_shards != shard:
            continue
        fn, target, signature, constexprs, attrs, launch_opts = launches[key]
        t0 = time.time()
        res = dict(kernel=fn.__name__, cc=target.arch, num_warps=launch_opts.get("num_warps", 4))
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=launch_opts)
            res["shared"] = int(compiled.metadata.shared)
            res.update(_sass_stats(compiled.asm["cubin"], cuobjdump, tmp, f"k{i}"))
        except Exception as err:  # noqa: BLE001 - reported per case by the tests
            res["error"] = f"{type(err).__name__}: {err}"[:3000]
        res["seconds"] = round(time.time() - t0, 2)
        results[key] = res
    with open(out_path, "w") as fh:
        json.dump(dict(triton=triton.__version__, cases=per_case, results=results), fh, indent=1)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def ctas_per_sm(r: dict) -> int:
    """Resident programs per SM that the registers, shared memory and threads of a kernel allow."""
    chip = CHIP[r["cc"]]
    per_warp = -(-max(r["regs"], 1) * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = (chip["regs"] // per_warp) // r["num_warps"]
    by_smem = chip["smem_sm"] // (r["shared"] + 1024)  # + the 1 KB the driver reserves per block
    by_threads = chip["threads"] // (32 * r["num_warps"])
    return min(by_regs, by_smem, by_threads, 32)


def _compile_all(python: str, tmp: str) -> dict:
    """Run the worker shards under ``python``; merged {triton, cases, results}."""
    from conftest import find_cuobjdump

    env = dict(os.environ, TRITON_INTERPRET="0", MOCO_FAST_CUOBJDUMP=find_cuobjdump() or "")
    shards = max(1, min(4, os.cpu_count() or 1))  # ptxas and LLVM are single-threaded
    procs = [
        subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", os.path.join(tmp, f"{i}.json"), str(i), str(shards)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(shards)
    ]
    merged: dict = dict(results={})
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"worker {i} under {python} failed:\n{err[-4000:]}"
        with open(os.path.join(tmp, f"{i}.json")) as fh:
            part = json.load(fh)
        merged["triton"], merged["cases"] = part["triton"], part["cases"]
        merged["results"].update(part["results"])
    report = os.environ.get("MOCO_FAST_SASS_REPORT")
    if report:  # one JSON per triton version, e.g. for docs/roofline.md
        with open(report.replace(".json", f"_triton{merged['triton']}.json"), "w") as fh:
            json.dump(merged, fh, indent=1)
    return merged


def _skip_without_offline_toolchain():
    pytest.importorskip("triton")
    from conftest import find_cuobjdump

    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"triton without the NVIDIA backend / ASTSource API: {err!r}")
    if find_cuobjdump() is None:
        pytest.skip("no cuobjdump (triton's backends/nvidia/bin or a CUDA toolkit)")


@pytest.fixture(scope="module", params=["main", "triton36"])
def compiled(request, tmp_path_factory):
    """{triton, cases, results} compiled by this environment's triton ("main") or triton 3.6."""
    if request.param == "main":
        _skip_without_offline_toolchain()
        return _compile_all(sys.executable, str(tmp_path_factory.mktemp("main")))
    python = os.environ.get("MOCO_FAST_TRITON36_PYTHON")
    if not python:
        pytest.skip("MOCO_FAST_TRITON36_PYTHON is not set (.ci/run sets it to a venv with triton==3.6.0)")
    merged = _compile_all(python, str(tmp_path_factory.mktemp("triton36")))
    assert merged["triton"].startswith("3.6"), f"{python} imports triton {merged['triton']}, not 3.6"
    return merged


CASES = cases()


def _launches(compiled, name):
    launches = compiled["cases"][name]
    assert launches, f"{name}: the launchers launched nothing"
    return [(launch, compiled["results"][launch["key"]]) for launch in launches]


@pytest.mark.parametrize("name", [c["name"] for c in CASES])
def test_builds_fits_and_does_not_spill(compiled, name):
    for launch, r in _launches(compiled, name):
        what = f"{name} / {launch['kernel']} {launch['consts']} (triton {compiled['triton']})"
        assert "error" not in r, f"{what}: {r.get('error')}"
        assert r["shared"] <= CHIP[r["cc"]]["smem_block"], f"{what}: {r['shared']} B shared memory"
        assert r["ldl_stl"] == 0 and r["local"] == 0, f"{what}: spills (LDL/STL {r['ldl_stl']}, LOCAL {r['local']})"
        assert r["sass_lines"] > 10


INFONCE = [c for c in CASES if c["op"] == "infonce"]


@pytest.mark.parametrize("name", [c["name"] for c in INFONCE])
def test_infonce_dots_use_tensor_cores(compiled, name):
    case = next(c for c in INFONCE if c["name"] == name)
    if DTYPE_MIXES[case["mix"]][3] == "ieee" and case["mix"].startswith("fp32"):
        pytest.skip("IEEE fp32 dots run on CUDA cores by design")
    for launch, r in _launches(compiled, name):
        if launch["kernel"] not in ("infonce_fwd_split_kernel", "infonce_bwd_negatives_kernel"):
            continue
        what = f"{name} / {launch['kernel']} (triton {compiled['triton']})"
        if case["cc"] >= 90 and launch["kernel"] == "infonce_fwd_split_kernel":
            assert r["hgmma"] > 0, f"{what}: no HGMMA (wgmma) in the sm_90 SASS (HMMA {r['hmma']})"
        else:
            assert r["hgmma"] + r["hmma"] > 0, f"{what}: no tensor-core instruction in the SASS"


@pytest.mark.parametrize("name", [c["name"] for c in INFONCE if c["cc"] == 90 and c["mix"] != "fp32_ieee"])
def test_sm90_forward_is_pipelined_and_fills_the_sm(compiled, name):
    """The sm_90 forward streams the negatives with asynchronous copies (LDGSTS / TMA), fp32 tf32
    included, and holds as many programs per SM as the split model counts on (2 for bf16/fp16)."""
    case = next(c for c in INFONCE if c["name"] == name)
    for launch, r in _launches(compiled, name):
        if launch["kernel"] != "infonce_fwd_split_kernel":
            continue
        what = f"{name} / {launch['consts']} (triton {compiled['triton']})"
        if case["mix"] != "fp32q_bf16n_tf32":  # an upcast bf16 tile goes through registers by design
            assert r["ldgsts"] + r["utmaldg"] > 0, f"{what}: no asynchronous copy (LDGSTS/UTMALDG) in the SASS"
        from moco_fast.kernels import heuristics as H

        qd, _, nd, prec = DTYPE_MIXES[case["mix"]]
        dot = H.dot_dtype_name(qd, nd)
        want = H.fwd_config(H.d_pad(case["d"]), dot, (9, 0), precision=H.dot_precision(dot, prec)).ctas_per_sm
        if case["mix"] in ("bf16", "fp16") and case["d"] <= 128:
            assert want >= 2, f"{what}: the heuristics plan 1 program per SM for a half-precision forward"
        assert ctas_per_sm(r) >= want, (
            f"{what}: {r['regs']} registers x {32 * r['num_warps']} threads, {r['shared']} B shared memory "
            f"allow {ctas_per_sm(r)} programs per SM, the plan counts on {want}"
        )


@pytest.mark.parametrize("name", [c["name"] for c in CASES if c["op"].startswith("momentum")])
def test_momentum_is_vectorized(compiled, name):
    case = next(c for c in CASES if c["name"] == name)
    for launch, r in _launches(compiled, name):
        what = f"{name} / {launch['kernel']} (triton {compiled['triton']})"
        assert "error" not in r, r.get("error")
        if case.get("offset", 0) == 0:
            assert r["ldg128"] > 0 and r["stg128"] > 0, f"{what}: no 128-bit global loads/stores"


def test_every_case_was_compiled(compiled):
    assert sorted(compiled["cases"]) == sorted(c["name"] for c in CASES)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, ROOT)
        _worker(sys.argv[2], *(int(a) for a in sys.argv[3:5]))
    else:
        sys.exit(pytest.main([__file__, "-q"]))
