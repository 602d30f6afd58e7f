"""The contrastive cross-entropy and memory-bank kernels build for Hopper (sm_90a) on a machine without a
GPU, with the tiles their launchers pick: no local-memory spills, shared memory within the chip's limit,
tensor-core dots (HGMMA) where the dot dtype is half or TF32.

The compiling runs in a subprocess with TRITON_INTERPRET=0 (conftest.py sets the interpreter in this
process); this file doubles as that worker (``python tests/machine_code/test_contrast_kernels_compile.py
--worker OUT.json``), which also runs under another triton (e.g. 3.6) given its interpreter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SMEM_LIMIT_SM90 = 232448
TL = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
if __name__ == "__main__":  # the worker (maybe under another triton's interpreter): this checkout's moco_fast
    sys.path.insert(0, REPO)


def specs() -> list[dict]:
    """(kernel, argument types, constexprs, warps, stages) for the sm_90 configs the launchers pick."""
    from moco_fast.kernels import heuristics as H
    from moco_fast.kernels.contrast_bwd import keys_config
    from moco_fast.kernels.contrast_fwd import sweep_config

    out = []
    # d = 128 in every dot mode, d = 256 (the largest D_PAD) in bf16 and tf32. (d = 256 IEEE fp32 and the
    # unexcluded split sweeps were built too, spill-free under triton 3.8 and 3.6; left out to keep this fast.)
    for d, dt, prec in [
        (128, "bfloat16", "ieee"),
        (128, "float32", "tf32"),
        (128, "float32", "ieee"),
        (256, "bfloat16", "ieee"),
        (256, "float32", "tf32"),
    ]:
        dp = H.d_pad(d)
        dot = H.dot_dtype_name(dt, dt)
        tensor_cores = prec != "ieee" or dot != "float32"
        cfg = sweep_config(dp, dot, (9, 0), False, prec)
        finals = [False, True] if H.fuse_single_split(dp, dot, (9, 0)) else [False]
        for final, excl in [(f, True) for f in finals] if dt == "bfloat16" and d == 128 else [(False, True)]:
            out.append(
                dict(
                    name=f"contrast_fwd_d{d}_{dt}_{prec}{'_final' if final else ''}{'_excl' if excl else ''}",
                    kernel="contrast_fwd_kernel",
                    types=dict(
                        q_ptr="*" + TL[dt],
                        k_ptr="*" + TL[dt],
                        t_ptr="*i64",
                        e_ptr="*i64",
                        m_ptr="*fp32",
                        l_ptr="*fp32",
                        o_ptr="*fp32",
                        r_ptr="*i64" if final else "*i32",
                        pos_ptr="*fp32",
                        M="i32",
                        N="i32",
                        d="i32",
                        keys_per_split="i32",
                        scale="fp32",
                        qk_scale="fp32",
                    ),
                    consts=dict(
                        BLOCK_M=cfg.block_m,
                        BLOCK_N=cfg.block_n,
                        D_PAD=dp,
                        HAS_EXCL=excl,
                        FINALIZE=final,
                        DOT_DTYPE=("tl", dot),
                        PRECISION=prec,
                        EMULATE=False,
                    ),
                    warps=cfg.num_warps,
                    stages=cfg.num_stages,
                    tensor_cores=tensor_cores,
                )
            )
        bcfg = keys_config(dp, dot, (9, 0), False, prec)
        out.append(
            dict(
                name=f"contrast_bwd_keys_d{d}_{dt}_{prec}",
                kernel="contrast_bwd_keys_kernel",
                types=dict(
                    g_ptr="*fp32",
                    q_ptr="*" + TL[dt],
                    k_ptr="*" + TL[dt],
                    t_ptr="*i64",
                    e_ptr="*i64",
                    lse_ptr="*fp32",
                    dk_ptr="*" + TL[dt],
                    M="i32",
                    N="i32",
                    d="i32",
                    scale="fp32",
                    qk_scale="fp32",
                ),
                consts=dict(
                    BLOCK_M=bcfg.block_m,
                    BLOCK_N=bcfg.block_n,
                    D_PAD=dp,
                    HAS_EXCL=True,
                    DOT_DTYPE=("tl", dot),
                    PRECISION=prec,
                    EMULATE=False,
                ),
                warps=bcfg.num_warps,
                stages=bcfg.num_stages,
                tensor_cores=tensor_cores,
            )
        )
        if d != 128 or dt != "bfloat16":
            continue  # the combine and the bank update have no dots: one build each
        # The splits merge in InfoNCE's combine kernel (built for InfoNCE's plans by test_triton_offline_compile):
        # here at the 32-row block that only the contrast's many rows (2N = 16384 on 132 SMs) reach.
        bm = H.combine_block_m(1 << 20, 1, dp)
        out.append(
            dict(
                name=f"contrast_combine_d{d}_{dt}",
                kernel="infonce_combine_kernel",
                types=dict(
                    m_ptr="*fp32",
                    l_ptr="*fp32",
                    o_ptr="*fp32",
                    r_ptr="*i32",
                    pos_ptr="*fp32",
                    k_ptr="*" + TL[dt],
                    loss_ptr="*fp32",
                    lse_ptr="*fp32",
                    delta_ptr="*fp32",
                    rank_ptr="*i64",
                    B="i32",
                    d="i32",
                    num_splits="i32",
                    scale="fp32",
                    qk_scale="fp32",
                ),
                consts=dict(BLOCK_M=bm, BLOCK_S=H.combine_block_s(bm, dp), D_PAD=dp),
                warps=4,
                stages=3,
                tensor_cores=False,
            )
        )
        out.append(
            dict(
                name=f"memory_bank_update_d{d}_{dt}",
                kernel="memory_bank_update_kernel",
                types=dict(
                    bank_ptr="*" + TL[dt],
                    idx_ptr="*i64",
                    f_ptr="*" + TL[dt],
                    ok_ptr="*u1",
                    B="i32",
                    d="i32",
                    momentum="fp32",
                ),
                consts=dict(BLOCK_R=max(1, min(64, 4096 // dp)), BLOCK_B=256, D_PAD=dp),
                warps=4,
                stages=3,
                tensor_cores=False,
            )
        )
    return out


def _worker(out_path: str, shard: int = 0, num_shards: int = 1) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    import triton
    import triton.language as tl
    from moco_fast.kernels import contrast_bwd, contrast_fwd, infonce_combine, memory_bank
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {
        n: getattr(m, n)
        for m in (contrast_bwd, contrast_fwd, infonce_combine, memory_bank)
        for n in dir(m)
        if n.endswith("_kernel")
    }
    cuobjdump, tmp, results = os.environ["MOCO_FAST_CUOBJDUMP"], tempfile.mkdtemp(prefix="contrast_sass_"), []
    for spec in specs()[shard::num_shards]:
        fn = kernels[spec["kernel"]]
        consts = {k: (getattr(tl, v[1]) if isinstance(v, tuple) else v) for k, v in spec["consts"].items()}
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                signature[name] = "constexpr"
                continue
            signature[name] = spec["types"][name]
            if signature[name].startswith("*") or name in ("M", "N", "d", "B", "keys_per_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        res = dict(name=spec["name"], tensor_cores=spec["tensor_cores"], triton=triton.__version__)
        try:
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=spec["warps"], num_stages=spec["stages"]),
            )
            cubin = os.path.join(tmp, spec["name"] + ".cubin")
            with open(cubin, "wb") as fh:
                fh.write(compiled.asm["cubin"])
            sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
            res.update(
                shared=int(compiled.metadata.shared),
                regs=int(m.group(1)) if (m := re.search(r"REG:(\d+)", usage)) else -1,
                local=int(m.group(1)) if (m := re.search(r"LOCAL:(\d+)", usage)) else -1,
                ldl_stl=len(re.findall(r"\b(?:LDL|STL)\b", sass)),
                hgmma=len(re.findall(r"\bHGMMA\b", sass)),
                hmma=len(re.findall(r"\bHMMA\b", sass)),
                sass_lines=sass.count("\n"),
            )
        except Exception as err:  # noqa: BLE001 - reported per config by the tests
            res["error"] = f"{type(err).__name__}: {err}"[:2000]
        results.append(res)
    shutil.rmtree(tmp, ignore_errors=True)
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)


triton = pytest.importorskip("triton")


@pytest.fixture(scope="module", params=["main", "triton36"])
def compiled(request):
    """Build results of every spec, by this environment's triton ("main") or triton 3.6."""
    from conftest import compile_python

    python = compile_python(request.param)
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"triton without the NVIDIA backend / ASTSource API: {err!r}")
    from conftest import find_cuobjdump

    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (triton's bundled one or a CUDA toolkit's)")
    tmp = tempfile.mkdtemp(prefix="contrast_offline_")
    shards = max(1, min(4, os.cpu_count() or 1))  # ptxas and LLVM are single-threaded
    procs = [
        subprocess.Popen(
            [python, os.path.abspath(__file__), "--worker", os.path.join(tmp, f"{i}.json"), str(i), str(shards)],
            env=dict(os.environ, TRITON_INTERPRET="0", MOCO_FAST_CUOBJDUMP=cuobjdump),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(shards)
    ]
    results = {}
    for i, proc in enumerate(procs):
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        with open(os.path.join(tmp, f"{i}.json")) as fh:
            results.update({r["name"]: r for r in json.load(fh)})
    return results


NAMES = [s["name"] for s in specs()]


@pytest.mark.parametrize("name", NAMES)
def test_kernel_builds_fits_and_does_not_spill(compiled, name):
    r = compiled[name]
    assert "error" not in r, r.get("error")
    assert r["shared"] <= SMEM_LIMIT_SM90, f"{name}: {r['shared']} B shared memory"
    assert r["ldl_stl"] == 0 and r["local"] == 0, f"{name}: spills (LDL/STL {r['ldl_stl']}, LOCAL {r['local']})"
    assert r["sass_lines"] > 10


@pytest.mark.parametrize("name", [s["name"] for s in specs() if s["tensor_cores"]])
def test_dots_use_tensor_cores(compiled, name):
    r = compiled[name]
    assert "error" not in r, r.get("error")
    assert r["hgmma"] + r["hmma"] > 0, f"{name}: no tensor-core instruction in the sm_90 SASS"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], *(int(a) for a in sys.argv[3:5]))
    else:
        sys.exit(pytest.main([__file__, "-q"]))
