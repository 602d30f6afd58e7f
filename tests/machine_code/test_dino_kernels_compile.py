"""The DINO kernels (kernels/dino_fwd.py, dino_bwd.py) build for Hopper (sm_90a) with no GPU, in every tile
the launchers pick at d = 256 (the DINO bottleneck) and d = 64: within shared memory, no local-memory spills,
and tensor-core dots (HGMMA, or HMMA where a tile is too small for a warpgroup) wherever the dot dtype
allows (bf16/fp16, TF32).

As tests/test_triton_offline_compile.py does for the InfoNCE kernels: triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32)) in a subprocess with TRITON_INTERPRET=0 (this file doubles as the
worker), then cuobjdump on the cubins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

SMEM_LIMIT_SM90 = 232448
# (features dtype, prototypes dtype, fp32 precision): the dot dtype follows moco_fast's promotion rule.
MIXES = [("bfloat16", "bfloat16", "tf32"), ("float32", "float32", "tf32"), ("float32", "float32", "ieee"),
         ("bfloat16", "float32", "tf32")]  # fmt: skip
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def specs() -> list[dict]:
    from moco_fast.kernels import heuristics as H
    from moco_fast.kernels.dino_bwd import bwd_config
    from moco_fast.kernels.dino_fwd import fwd_config

    out = []
    for d, mixes in ((256, MIXES), (64, MIXES[:2])):
        dp = H.d_pad(d)
        for xd, wd, prec in mixes:
            x, w = "*" + SHORT[xd], "*" + SHORT[wd]
            dot = H.dot_dtype_name(xd, wd)
            tc = dot != "float32" or prec == "tf32"
            for teacher in (True, False):  # teacher pass: bias, values = another matrix, split partials
                cfg = fwd_config(dp, dot, dot, same_kv=not teacher, precision=prec)
                out.append(
                    dict(
                        name=f"fwd_{'teacher' if teacher else 'student'}_d{d}_{SHORT[xd]}_{SHORT[wd]}_{prec}",
                        kernel="dino_softmax_pass_kernel",
                        types=dict(x_ptr=x, k_ptr=w, v_ptr=w, bias_ptr="*fp32", m_ptr="*fp32", l_ptr="*fp32",
                                   o_ptr="*fp32", R="i32", P="i32", d="i32", keys_per_split="i32", qk_scale="fp32"),
                        consts=dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_PAD=dp, HAS_BIAS=teacher,
                                    SAME_KV=not teacher, EVEN_P=not teacher, FINALIZE=not teacher, QK_DTYPE=dot,
                                    PV_DTYPE=dot, PRECISION=prec, EMULATE=False),
                        cfg=cfg,
                        tensor_cores=tc,
                    )
                )  # fmt: skip
            cfg = bwd_config(dp, dot, precision=prec)
            out.append(
                dict(
                    name=f"bwd_d{d}_{SHORT[xd]}_{SHORT[wd]}_{prec}",
                    kernel="dino_prototype_grad_kernel",
                    types=dict(xs_ptr=x, ws_ptr=w, lses_ptr="*fp32", ys_ptr="*fp32", xt_ptr=x, wt_ptr=w,
                               bias_ptr="*fp32", lset_ptr="*fp32", yt_ptr="*fp32", dw_ptr=w, Rs="i32", Rt="i32",
                               P="i32", d="i32", qk_scale_s="fp32", qk_scale_t="fp32", grad_scale="fp32"),
                    consts=dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, D_PAD=dp, SAME_W=False, DOT_DTYPE_S=dot,
                                DOT_DTYPE_T=dot, PRECISION=prec, EMULATE=False),
                    cfg=cfg,
                    tensor_cores=tc,
                )
            )  # fmt: skip
    return out


def _worker(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    import triton
    import triton.language as tl
    from moco_fast.kernels import dino_bwd, dino_fwd
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernels = {"dino_softmax_pass_kernel": dino_fwd.dino_softmax_pass_kernel}
    kernels["dino_prototype_grad_kernel"] = dino_bwd.dino_prototype_grad_kernel
    dtypes = {"float32": tl.float32, "bfloat16": tl.bfloat16, "float16": tl.float16}
    results, tmp = [], tempfile.mkdtemp(prefix="dino_sass_")
    for spec in specs():
        fn = kernels[spec["kernel"]]
        consts = {k: dtypes[v] if "DTYPE" in k else v for k, v in spec["consts"].items()}
        signature, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                signature[name] = "constexpr"
                continue
            signature[name] = spec["types"][name]
            if signature[name].startswith("*") or name in ("R", "P", "Rs", "Rt", "d", "keys_per_split"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        res = dict(name=spec["name"], tensor_cores=spec["tensor_cores"])
        try:
            cfg = spec["cfg"]
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs=consts, attrs=attrs),
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
            )
            res["shared"] = int(compiled.metadata.shared)
            cubin = os.path.join(tmp, spec["name"] + ".cubin")
            with open(cubin, "wb") as fh:
                fh.write(compiled.asm["cubin"])
            tool = os.environ["MOCO_FAST_CUOBJDUMP"]
            sass = subprocess.run([tool, "--dump-sass", cubin], capture_output=True, text=True).stdout
            res["ldl_stl"] = len(re.findall(r"\b(?:LDL|STL)\b", sass))
            res["hgmma"] = len(re.findall(r"\bHGMMA\b", sass))
            res["hmma"] = len(re.findall(r"\bHMMA\b", sass))  # mma.sync: tiles too small for a warpgroup
            res["sass_lines"] = sass.count("\n")
        except Exception as err:  # noqa: BLE001 - reported per config by the test
            res["error"] = f"{type(err).__name__}: {err}"[:2000]
        results.append(res)
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)


triton = pytest.importorskip("triton")


@pytest.fixture(scope="module", params=["main", "triton36"])
def compiled(request, tmp_path_factory):
    """Build results of every spec, by this environment's triton ("main") or triton 3.6."""
    from conftest import compile_python, find_cuobjdump

    python = compile_python(request.param)
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError:
        pytest.skip("this triton cannot target a GPU offline")
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (triton's bundled one or a CUDA toolkit's)")
    out = str(tmp_path_factory.mktemp("dino_sass") / "results.json")
    env = dict(os.environ, TRITON_INTERPRET="0", MOCO_FAST_CUOBJDUMP=cuobjdump)
    proc = subprocess.run([python, __file__, "--worker", out], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as fh:
        return {r["name"]: r for r in json.load(fh)}


def test_every_launcher_config_builds_for_sm90(compiled):
    assert len(compiled) == len(specs())
    for name, r in compiled.items():
        assert "error" not in r, f"{name}: {r['error']}"
        assert r["shared"] <= SMEM_LIMIT_SM90, (name, r["shared"])
        assert r["ldl_stl"] == 0, f"{name} spills to local memory ({r['ldl_stl']} LDL/STL)"
        if r["tensor_cores"]:
            assert r["hgmma"] + r["hmma"] > 0, f"{name}: no HGMMA/HMMA (tensor cores) in its SASS"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker(sys.argv[2])
