"""Every Triton kernel configuration the heuristics can pick builds for Hopper (sm_90a) and Ampere
(sm_80) on a machine with no GPU, fits the chip's shared memory, does not spill to local memory,
and -- for the InfoNCE dots -- runs on tensor cores (HGMMA on sm_90, HMMA on sm_80).

How: triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))
produces the cubin; triton's bundled cuobjdump dumps its SASS (LDL/STL = spills) and resource usage.
conftest.py sets TRITON_INTERPRET=1 in this process (no GPU), which turns @triton.jit kernels into
interpreter objects, so the compiling runs in a subprocess with TRITON_INTERPRET=0: this file
doubles as that worker (``python tests/test_triton_offline_compile.py --worker OUT.json``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SMEM_LIMIT = {90: 232448, 80: 166912}  # max dynamic shared memory per block (227 KB / 163 KB)

# ---------------------------------------------------------------------------------------------
# configurations (shared by the worker and the tests; pure Python)
# ---------------------------------------------------------------------------------------------

TL_NAME = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}


def specs():
    """Every (kernel, types, constexprs, warps, stages, expectations) to build.

    sm_90 (the target, H100/H200): every forward / dn config the heuristics pick, the small kernels
    at d_pad 16, 128, 256. sm_80: the forward and dn configs (the ones whose tiles differ).
    """
    from moco_fast.kernels import heuristics as H

    out = []
    for cc in (90, 80):
        cap = (cc // 10, cc % 10)
        for d, qd, nd, prec in H.all_fwd_keys():
            dp = H.d_pad(d)
            dot = H.dot_dtype_name(qd, nd)
            if cc == 80 and (d in (16, 32, 96) or (dot == "float32" and prec == "ieee" and d != 256)):
                continue  # sm_80 is the secondary target: its distinct tiles only
            cfg = H.fwd_config(dp, dot, cap, precision=prec)
            variants = [dict(FINALIZE=False, EVEN_K=True)]
            if H.fuse_single_split(dp, dot, cap):
                variants.append(dict(FINALIZE=True, EVEN_K=False))
            for var in variants:
                out.append(
                    dict(
                        name=f"fwd_d{d}_{qd}_{nd}_{prec}{'_final' if var['FINALIZE'] else ''}_sm{cc}",
                        kernel="infonce_fwd_split_kernel",
                        cc=cc,
                        types=dict(
                            q_ptr="*" + TL_NAME[qd],
                            k_ptr="*" + TL_NAME[qd],
                            n_ptr="*" + TL_NAME[nd],
                            m_ptr="*fp32",
                            l_ptr="*fp32",
                            o_ptr="*fp32",
                            r_ptr="*i64" if var["FINALIZE"] else "*i32",
                            pos_ptr="*fp32",
                            B="i32",
                            K="i32",
                            d="i32",
                            keys_per_split="i32",
                            qk_scale="fp32",
                        ),
                        divisible=["B", "K", "keys_per_split"] + (["d"] if d % 16 == 0 else []),
                        consts=dict(
                            BLOCK_M=cfg.block_m,
                            BLOCK_N=cfg.block_n,
                            D_PAD=dp,
                            EVEN_D=(d == dp),
                            DOT_DTYPE=("tl", dot),
                            PRECISION=prec,
                            EMULATE=False,
                            **var,
                        ),
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        tensor_cores=(prec != "ieee" or dot != "float32"),
                    )
                )
            if d in ((16, 128, 256) if cc == 90 else (128, 256)):
                dcfg = H.bwd_dn_config(dp, dot, cap, precision=prec)
                out.append(
                    dict(
                        name=f"dn_d{d}_{qd}_{nd}_{prec}_sm{cc}",
                        kernel="infonce_bwd_negatives_kernel",
                        cc=cc,
                        types=dict(
                            g_ptr="*fp32",
                            q_ptr="*" + TL_NAME[qd],
                            n_ptr="*" + TL_NAME[nd],
                            lse_ptr="*fp32",
                            dn_ptr="*" + TL_NAME[nd],
                            B="i32",
                            K="i32",
                            d="i32",
                            scale="fp32",
                            qk_scale="fp32",
                        ),
                        divisible=["B", "K"] + (["d"] if d % 16 == 0 else []),
                        consts=dict(
                            BLOCK_M=dcfg.block_m,
                            BLOCK_N=dcfg.block_n,
                            D_PAD=dp,
                            EVEN_D=(d == dp),
                            DOT_DTYPE=("tl", dot),
                            PRECISION=prec,
                            EMULATE=False,
                        ),
                        num_warps=dcfg.num_warps,
                        num_stages=dcfg.num_stages,
                        tensor_cores=(prec != "ieee" or dot != "float32"),
                    )
                )
    cc = 90
    for dp in (16, 128, 256):
        bms = H.combine_block_ms(dp)
        for bm in sorted({bms[0], bms[-1]}):
            out.append(
                dict(
                    name=f"combine_dp{dp}_bm{bm}_sm{cc}",
                    kernel="infonce_combine_kernel",
                    cc=cc,
                    types=dict(
                        m_ptr="*fp32",
                        l_ptr="*fp32",
                        o_ptr="*fp32",
                        r_ptr="*i32",
                        pos_ptr="*fp32",
                        k_ptr="*bf16",
                        lse_ptr="*fp32",
                        out_ptr="*fp32",
                        rank_ptr="*i64",
                        B="i32",
                        d="i32",
                        num_splits="i32",
                        qk_scale="fp32",
                    ),
                    divisible=["B", "d"],
                    consts=dict(BLOCK_M=bm, BLOCK_S=H.combine_block_s(bm, dp), D_PAD=dp),
                    num_warps=4,
                    num_stages=3,
                )
            )
        for dt in ("bf16", "fp32"):
            out.append(
                dict(
                    name=f"bwd_qk_dp{dp}_{dt}_sm{cc}",
                    kernel="infonce_bwd_qk_kernel",
                    cc=cc,
                    types=dict(
                        g_ptr="*fp32",
                        q_ptr="*" + dt,
                        k_ptr="*" + dt,
                        lse_ptr="*fp32",
                        out_ptr="*fp32",
                        dq_ptr="*" + dt,
                        dk_ptr="*" + dt,
                        B="i32",
                        d="i32",
                        scale="fp32",
                    ),
                    divisible=["B", "d"],
                    consts=dict(BLOCK_M=H.bwd_qk_block_m(dp), D_PAD=dp),
                    num_warps=4,
                    num_stages=3,
                )
            )
        for kd, qd, norm in (("fp32", "fp32", True), ("bf16", "fp16", False)):
            out.append(
                dict(
                    name=f"enqueue_dp{dp}_{kd}_to_{qd}_norm{int(norm)}_sm{cc}",
                    kernel="enqueue_kernel",
                    cc=cc,
                    types=dict(
                        queue_ptr="*" + qd,
                        ptr_ptr="*i64",
                        count_ptr="*i64",
                        keys_ptr="*" + kd,
                        ok_ptr="*u1",
                        B="i32",
                        K="i32",
                        d="i32",
                    ),
                    divisible=["B", "K", "d"],
                    consts=dict(NORMALIZE=norm, COMPUTE=("tl", "float32"), BLOCK_R=H.enqueue_block_r(dp), D_PAD=dp),
                    num_warps=8,
                    num_stages=3,
                )
            )
    for dt, long_name in (("fp32", "float32"), ("bf16", "bfloat16")):
        out.append(
            dict(
                name=f"momentum_flat_{dt}_sm{cc}",
                kernel="momentum_flat_kernel",
                cc=cc,
                types=dict(t_ptr="*" + dt, s_ptr="*" + dt, N="i32", momentum="fp32"),
                divisible=["N"],
                consts=dict(BLOCK=H.MOMENTUM_BLOCK),
                num_warps=H.MOMENTUM_WARPS,
                num_stages=3,
                vec128=True,
            )
        )
        for aligned in (True, False) if dt == "fp32" else (True,):
            out.append(
                dict(
                    name=f"momentum_multi_{dt}_aligned{int(aligned)}_sm{cc}",
                    kernel="momentum_multi_kernel",
                    cc=cc,
                    types=dict(table_ptr="*i64", momentum="fp32"),
                    divisible=[],
                    consts=dict(DTYPE=("tl", long_name), BLOCK=H.MOMENTUM_BLOCK, ALIGNED=aligned),
                    num_warps=H.MOMENTUM_WARPS,
                    num_stages=3,
                    vec128=aligned,
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# worker (subprocess, TRITON_INTERPRET=0)
# ---------------------------------------------------------------------------------------------


def _cuobjdump() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else shutil.which("cuobjdump")


def _worker(out_path: str, shard: int = 0, num_shards: int = 1) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    import moco_fast.kernels as KN
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert KN.AVAILABLE and not KN.INTERPRETED, KN.IMPORT_ERROR
    from moco_fast.kernels import enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum

    kernels = {}
    for mod in (enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum):
        for name in dir(mod):
            if name.endswith("_kernel"):
                kernels[name] = getattr(mod, name)
    cuobjdump = _cuobjdump()
    results = []
    tmp = tempfile.mkdtemp(prefix="moco_sass_")
    only = re.compile(os.environ.get("MOCO_FAST_SPEC_FILTER", ""))
    for i, spec in enumerate(specs()):
        if i % num_shards != shard or not only.search(spec["name"]):
            continue
        fn = kernels[spec["kernel"]]
        consts = {k: (getattr(tl, v[1]) if isinstance(v, tuple) else v) for k, v in spec["consts"].items()}
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                signature[name] = "constexpr"
                continue
            ty = spec["types"][name]
            signature[name] = ty
            if ty.startswith("*") or name in spec["divisible"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        res = dict(
            name=spec["name"],
            kernel=spec["kernel"],
            cc=spec["cc"],
            tensor_cores=spec.get("tensor_cores"),
            vec128=spec.get("vec128", False),
            num_warps=spec["num_warps"],
            num_stages=spec["num_stages"],
            consts={k: str(v) for k, v in consts.items()},
        )
        t0 = time.time()
        try:
            src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", spec["cc"], 32),
                options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]),
            )
            res["shared"] = int(compiled.metadata.shared)
            cubin = os.path.join(tmp, spec["name"] + ".cubin")
            with open(cubin, "wb") as fh:
                fh.write(compiled.asm["cubin"])
            sass = subprocess.run([cuobjdump, "--dump-sass", cubin], capture_output=True, text=True).stdout
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
            res["regs"] = int(m.group(1)) if (m := re.search(r"REG:(\d+)", usage)) else -1
            res["local"] = int(m.group(1)) if (m := re.search(r"LOCAL:(\d+)", usage)) else -1
            res["stack"] = int(m.group(1)) if (m := re.search(r"STACK:(\d+)", usage)) else -1
            res["ldl_stl"] = len(re.findall(r"\b(?:LDL|STL)\b", sass))
            res["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
            res["hmma"] = len(re.findall(r"\bHMMA\b", sass))
            res["ffma"] = len(re.findall(r"\bFFMA\b", sass))
            res["ldg128"] = len(re.findall(r"\bLDG\.E\.128\b", sass))
            res["sass_lines"] = sass.count("\n")
        except Exception as err:  # noqa: BLE001 - reported per config by the tests
            res["error"] = f"{type(err).__name__}: {err}"[:2000]
        res["seconds"] = round(time.time() - t0, 2)
        results.append(res)
    shutil.rmtree(tmp, ignore_errors=True)
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

triton = pytest.importorskip("triton")


@pytest.fixture(scope="module")
def compiled():
    try:
        import triton.backends.nvidia  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"triton without the NVIDIA backend / ASTSource API: {err!r}")
    if _cuobjdump() is None:
        pytest.skip("no cuobjdump (triton's backends/nvidia/bin or PATH)")
    tmp = tempfile.mkdtemp(prefix="moco_offline_")
    env = dict(os.environ, TRITON_INTERPRET="0")
    shards = max(1, min(4, os.cpu_count() or 1))  # ptxas and LLVM are single-threaded
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                os.path.join(tmp, f"{i}.json"),
                str(i),
                str(shards),
            ],
            env=env,
            cwd=os.path.dirname(HERE),
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
    out = os.path.join(tmp, "results.json")
    with open(out, "w") as fh:
        json.dump(list(results.values()), fh, indent=1)
    report = os.environ.get("MOCO_FAST_SASS_REPORT")
    if report:
        shutil.copy(out, report)
    return results


SPEC_NAMES = [s["name"] for s in specs()]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_config_builds_fits_and_does_not_spill(compiled, name):
    r = compiled[name]
    assert "error" not in r, r.get("error")
    limit = SMEM_LIMIT[r["cc"]]
    assert r["shared"] <= limit, f"{name}: {r['shared']} B shared memory > {limit}"
    assert r["ldl_stl"] == 0 and r["local"] == 0, f"{name}: spills (LDL/STL {r['ldl_stl']}, LOCAL {r['local']})"
    assert r["sass_lines"] > 10


@pytest.mark.parametrize("name", [n for n, s in zip(SPEC_NAMES, specs()) if s.get("tensor_cores")])
def test_infonce_dots_use_tensor_cores(compiled, name):
    r = compiled[name]
    assert "error" not in r, r.get("error")
    if r["cc"] >= 90 and r["kernel"] == "infonce_fwd_split_kernel":
        assert r["hgmma"] > 0, f"{name}: no HGMMA (wgmma) in the sm_90 SASS (HMMA {r['hmma']})"
    else:
        assert r["hgmma"] + r["hmma"] > 0, f"{name}: no tensor-core instruction in the SASS"


@pytest.mark.parametrize("name", [n for n, s in zip(SPEC_NAMES, specs()) if s.get("vec128")])
def test_momentum_is_vectorized(compiled, name):
    r = compiled[name]
    assert "error" not in r, r.get("error")
    assert r["ldg128"] > 0, f"{name}: no 128-bit global loads (LDG.E.128)"


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--worker":
        sys.path.insert(0, os.path.dirname(HERE))
        _worker(sys.argv[2], *(int(a) for a in sys.argv[3:5]))
    else:
        sys.exit(pytest.main([__file__, "-q"]))
