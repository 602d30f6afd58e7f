# ruff: noqa: B023 - the lambdas built in loops are timed at once, inside their iteration
"""GPU benchmark of the moco_fast kernels, run by benchmarks/gpu_check.sh on a CUDA machine.

Measures, inside one run (ratios, not absolute numbers, are what carry between machines):
  * the GPU's ceilings: bf16 matmul TFLOP/s (8192^3) and copy bandwidth (a 1 GiB clone);
  * InfoNCE fwd+bwd (dq, dk; stop-gradient queue) for B = 256 and 4096, K = 65536, d = 128,
    bf16 and fp32, through moco_fast.info_nce for the "reference", "torch", "triton" and "cuda"
    backends, plus the raw triton launchers (forward alone, backward alone, chosen split count);
  * the momentum update of a ResNet-50 parameter list (161 tensors, 25.6 M fp32 params): the
    official per-parameter loop, torch._foreach, and the triton / cuda kernels (list and flat);
  * enqueue of 256 x 128 keys into a 65536-key queue.
Timing: CUDA events around each call, median of many repeats after warm-up.

    python benchmarks/gpu_bench_kernels.py [--out PATH] [--quick] [--autotune]
    python benchmarks/gpu_bench_kernels.py --dry-run     # CPU, tiny sizes, TRITON_INTERPRET=1

--dry-run exercises every code path on the CPU (the triton kernels in the interpreter) so the
script can be checked on a machine without a GPU; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import moco_fast  # noqa: E402
from moco_fast import backends  # noqa: E402

try:
    import moco_fast.kernels as KN  # noqa: E402
except Exception:  # noqa: BLE001
    KN = None


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def bench(fn, device, warmup=5, reps=30, max_seconds=20.0):
    """Median seconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        t_end = time.perf_counter() + max_seconds
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
            if time.perf_counter() > t_end:
                break
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def safe(label, fn, errors):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a failing backend is recorded, the rest still runs
        errors.append(f"{label}: {type(err).__name__}: {err}")
        traceback.print_exc()
        return None


def fmt_us(s):
    return "-" if s is None else f"{s * 1e6:9.1f}"


# ---------------------------------------------------------------------------------------------
# ceilings
# ---------------------------------------------------------------------------------------------


def ceilings(device, size):
    n = size["matmul_n"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    b = torch.randn_like(a)
    t_mm = bench(lambda: a @ b, device, warmup=3, reps=20)
    x = torch.empty(size["copy_bytes"] // 4, device=device, dtype=torch.float32).uniform_()
    t_cp = bench(lambda: x.clone(), device, warmup=3, reps=20)
    return dict(
        matmul_n=n,
        matmul_s=t_mm,
        bf16_matmul_tflops=2 * n**3 / t_mm / 1e12,
        copy_bytes=x.numel() * 4,
        copy_s=t_cp,
        copy_gbps=2 * x.numel() * 4 / t_cp / 1e9,
    )


# ---------------------------------------------------------------------------------------------
# InfoNCE
# ---------------------------------------------------------------------------------------------


def infonce_cases(device, size, ceil, errors, backend_names):
    rows = []
    K, d = size["K"], size["d"]
    for dtype in (torch.bfloat16, torch.float32):
        for B in size["B"]:
            g = torch.Generator(device=device).manual_seed(B)
            q = F.normalize(torch.randn(B, d, device=device, generator=g), dim=1).to(dtype).requires_grad_(True)
            k = F.normalize(torch.randn(B, d, device=device, generator=g), dim=1).to(dtype).requires_grad_(True)
            queue = F.normalize(torch.randn(K, d, device=device, generator=g), dim=1).to(dtype)
            flops = 4 * B * K * d
            ref_t = None
            for name in backend_names:

                def step(name=name):
                    loss = moco_fast.info_nce(q, k, queue, 0.07, backend=name)
                    return torch.autograd.grad(loss, (q, k))

                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                t = safe(f"info_nce {name} B={B} {dtype}", lambda: bench(step, device, reps=size["reps"]), errors)
                peak = (torch.cuda.max_memory_allocated() - base) if device.type == "cuda" and t else None
                if name == "reference":
                    ref_t = t
                rows.append(
                    dict(
                        op="info_nce fwd+bwd",
                        backend=name,
                        B=B,
                        K=K,
                        d=d,
                        dtype=str(dtype).replace("torch.", ""),
                        seconds=t,
                        tflops=(flops / t / 1e12) if t else None,
                        frac_of_matmul=(flops / t / 1e12 / ceil["bf16_matmul_tflops"]) if t else None,
                        speedup_vs_reference=(ref_t / t) if (t and ref_t) else None,
                        peak_extra_bytes=peak,
                    )
                )
            if KN is not None and KN.AVAILABLE:
                rows += raw_triton(q.detach(), k.detach(), queue, device, size, ceil, errors, flops)
    return rows


def raw_triton(q, k, queue, device, size, ceil, errors, flops):
    """The triton launchers without autograd / custom-op overhead, and their split count."""
    from moco_fast.kernels import heuristics as H

    B, d = q.shape
    scale = 1 / 0.07
    grad = torch.full((B,), 1.0 / B, device=device)
    fwd = lambda: KN.infonce_forward(q, k, queue, scale)  # noqa: E731
    lse, out, _ = fwd()
    bwd = lambda: KN.infonce_backward(grad, q, k, lse, out, scale)  # noqa: E731
    both = lambda: (fwd(), bwd())  # noqa: E731
    dn = lambda: KN.infonce_backward_negatives(grad, q, queue, lse, scale)  # noqa: E731
    dtype = str(q.dtype).replace("torch.", "")
    name = H.dot_dtype_name(dtype, str(queue.dtype).replace("torch.", ""))
    prec = "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    num_sms, cc = (1, (9, 0))
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        num_sms, cc = p.multi_processor_count, (p.major, p.minor)
    cfg = H.fwd_config(H.d_pad(d), name, cc, KN.INTERPRETED, prec)
    splits = H.num_splits(H.cdiv(B, cfg.block_m), H.cdiv(queue.shape[0], cfg.block_n), num_sms)
    out_rows = []
    for label, fn, fl in (
        ("triton raw fwd+bwd", both, flops),
        ("triton raw fwd", fwd, flops // 2),
        ("triton raw bwd (dq,dk)", bwd, 0),
        ("triton raw dn", dn, flops),
    ):
        t = safe(f"{label} B={B} {dtype}", lambda fn=fn: bench(fn, device, reps=size["reps"]), errors)
        out_rows.append(
            dict(
                op=label,
                backend="triton",
                B=B,
                K=queue.shape[0],
                d=d,
                dtype=dtype,
                seconds=t,
                tflops=(fl / t / 1e12) if (t and fl) else None,
                frac_of_matmul=(fl / t / 1e12 / ceil["bf16_matmul_tflops"]) if (t and fl) else None,
                config=dict(
                    block_m=cfg.block_m,
                    block_n=cfg.block_n,
                    num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages,
                    num_splits=splits,
                    precision=prec,
                ),
            )
        )
    return out_rows


def autotune_cases(device, size, errors):
    """MOCO_FAST_TRITON_AUTOTUNE=1: the best config per case, next to the heuristic's time."""
    from moco_fast.kernels import launch

    rows = []
    os.environ["MOCO_FAST_TRITON_AUTOTUNE"] = "1"
    try:
        for B in size["B"]:
            q = F.normalize(torch.randn(B, size["d"], device=device), dim=1).bfloat16()
            k = F.normalize(torch.randn(B, size["d"], device=device), dim=1).bfloat16()
            queue = F.normalize(torch.randn(size["K"], size["d"], device=device), dim=1).bfloat16()
            t0 = time.perf_counter()
            best = safe(f"autotune B={B}", lambda: launch._autotuned_fwd(q, k, queue, 1 / 0.07), errors)
            tune_s = time.perf_counter() - t0
            if not best or best[0] is None:
                continue
            cfg, s = best
            t = bench(lambda: KN.infonce_forward(q, k, queue, 1 / 0.07, num_splits=s, config=cfg), device)
            os.environ["MOCO_FAST_TRITON_AUTOTUNE"] = "0"
            t_h = bench(lambda: KN.infonce_forward(q, k, queue, 1 / 0.07), device)
            os.environ["MOCO_FAST_TRITON_AUTOTUNE"] = "1"
            rows.append(
                dict(
                    op="triton fwd autotuned",
                    B=B,
                    dtype="bfloat16",
                    seconds=t,
                    heuristic_seconds=t_h,
                    tune_seconds=tune_s,
                    config=dict(
                        block_m=cfg.block_m,
                        block_n=cfg.block_n,
                        num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages,
                        num_splits=s,
                    ),
                )
            )
    finally:
        os.environ["MOCO_FAST_TRITON_AUTOTUNE"] = "0"
    return rows


# ---------------------------------------------------------------------------------------------
# momentum
# ---------------------------------------------------------------------------------------------


def resnet50_shapes(width=64, layers=(3, 4, 6, 3), num_classes=1000):
    """Parameter shapes of torchvision's resnet50 (161 tensors, 25,557,032 values), no torchvision."""
    shapes = [(width, 3, 7, 7), (width,), (width,)]
    inplanes = width
    for i, blocks in enumerate(layers):
        planes = width * 2**i
        for b in range(blocks):
            shapes += [
                (planes, inplanes, 1, 1),
                (planes,),
                (planes,),
                (planes, planes, 3, 3),
                (planes,),
                (planes,),
                (planes * 4, planes, 1, 1),
                (planes * 4,),
                (planes * 4,),
            ]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(num_classes, inplanes), (num_classes,)]
    return shapes


def momentum_cases(device, size, ceil, errors, backend_names):
    shapes = resnet50_shapes() if size["resnet"] else [(64, 3, 7, 7), (64,), (1000, 2048), (7,)]
    n = sum(torch.Size(s).numel() for s in shapes)
    tgt = [torch.randn(s, device=device) for s in shapes]
    src = [torch.randn(s, device=device) for s in shapes]
    m = 0.999
    rows = []

    def official():
        for pk, pq in zip(tgt, src):
            pk.data = pk.data * m + pq.data * (1.0 - m)

    cases = [
        ("official loop", official),
        ("torch._foreach", lambda: (torch._foreach_mul_(tgt, m), torch._foreach_add_(tgt, src, alpha=1 - m))),
    ]
    for name in backend_names:
        if name != "reference":
            cases.append(
                (
                    f"moco_fast.momentum_update[{name}]",
                    lambda name=name: moco_fast.momentum_update(tgt, src, m, backend=name),
                )
            )
    if KN is not None and KN.AVAILABLE:
        cases.append(("triton list (raw)", lambda: KN.momentum_update_(tgt, src, m)))
        flat_t, flat_s = torch.randn(n, device=device), torch.randn(n, device=device)
        cases.append(("triton flat (raw)", lambda: KN.momentum_update_([flat_t], [flat_s], m)))
    if "cuda" in backend_names:
        from moco_fast import cuda_ext

        flat_t2, flat_s2 = torch.randn(n, device=device), torch.randn(n, device=device)
        cases.append(("cuda flat (raw)", lambda: cuda_ext.momentum_update_([flat_t2], [flat_s2], m)))
    for label, fn in cases:
        t = safe(f"momentum {label}", lambda fn=fn: bench(fn, device, reps=size["reps"]), errors)
        gbps = 12 * n / t / 1e9 if t else None
        rows.append(
            dict(
                op="momentum",
                impl=label,
                tensors=len(shapes),
                params=n,
                seconds=t,
                gbps=gbps,
                frac_of_copy=(gbps / ceil["copy_gbps"]) if gbps else None,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------
# enqueue
# ---------------------------------------------------------------------------------------------


def enqueue_cases(device, size, errors, backend_names):
    K, d, B = size["K"], size["d"], size["enqueue_B"]
    keys = torch.randn(B, d, device=device)
    rows = []
    qbuf = torch.randn(d, K, device=device)
    state = {"ptr": 0}

    def official():  # the official MoCo code: (d, K) queue, host-side int pointer
        ptr = state["ptr"]
        qbuf[:, ptr : ptr + B] = keys.T
        state["ptr"] = (ptr + B) % K

    cases = [("official (host ptr)", official)]
    for name in backend_names:
        if name == "reference":
            continue
        for qdt in (torch.float32, torch.bfloat16):
            queue = moco_fast.KeyQueue(
                K, d, dtype=qdt, gather_distributed=False, device=device, backend=name, normalize=True
            )
            cases.append(
                (
                    f"KeyQueue[{name}] {str(qdt).replace('torch.', '')} +normalize",
                    lambda queue=queue: queue.enqueue(keys),
                )
            )
    if KN is not None and KN.AVAILABLE:
        raw_q = torch.randn(K, d, device=device)
        ptr = torch.zeros(1, dtype=torch.int64, device=device)
        cnt = torch.zeros(1, dtype=torch.int64, device=device)
        cases.append(("triton enqueue_ (raw)", lambda: KN.enqueue_(raw_q, ptr, cnt, keys, True)))
    for label, fn in cases:
        t = safe(f"enqueue {label}", lambda fn=fn: bench(fn, device, reps=size["reps"]), errors)
        rows.append(dict(op="enqueue", impl=label, B=B, K=K, d=d, seconds=t))
    return rows


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def git_commit():
    try:
        return (
            subprocess.run(
                ["git", "-C", os.path.dirname(HERE), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_<date>.json)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreter: exercise the code paths")
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--autotune", action="store_true", help="also run the triton forward autotuner (bf16)")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to skip: infonce momentum enqueue")
    args = ap.parse_args()

    if args.dry_run:
        device = torch.device("cpu")
        size = dict(B=(7,), K=300, d=16, matmul_n=256, copy_bytes=1 << 20, reps=2, resnet=False, enqueue_B=5)
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_bench_kernels.py needs a CUDA GPU (use --dry-run to check it on CPU)")
        device = torch.device("cuda")
        size = dict(
            B=(256, 4096),
            K=65536,
            d=128,
            matmul_n=8192,
            copy_bytes=1 << 30,
            reps=10 if args.quick else 50,
            resnet=True,
            enqueue_B=256,
        )
    torch.set_float32_matmul_precision("high")  # TF32 allowed: the usual training setting
    names = [b for b in ("reference", "torch", "triton", "cuda") if backends.is_available(b)]
    if device.type == "cpu":
        names = [b for b in names if b != "cuda"]
    errors = []
    t0 = time.time()
    ceil = ceilings(device, size)
    print(
        f"ceilings: bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, copy {ceil['copy_gbps']:.0f} GB/s", flush=True
    )
    results = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor()}) dry-run",
        torch=torch.__version__,
        triton=getattr(sys.modules.get("triton"), "__version__", None),
        cuda=torch.version.cuda,
        git_commit=git_commit(),
        backends=names,
        dry_run=args.dry_run,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        ceilings=ceil,
        infonce=[],
        momentum=[],
        enqueue=[],
        autotune=[],
        errors=errors,
    )
    if "infonce" not in args.skip:
        results["infonce"] = infonce_cases(device, size, ceil, errors, names)
    if "momentum" not in args.skip:
        results["momentum"] = momentum_cases(device, size, ceil, errors, names)
    if "enqueue" not in args.skip:
        results["enqueue"] = enqueue_cases(device, size, errors, names)
    if args.autotune and KN is not None and KN.AVAILABLE and device.type == "cuda":
        results["autotune"] = autotune_cases(device, size, errors)
    results["total_seconds"] = round(time.time() - t0, 1)

    r = results
    print(f"\n{r['gpu']}  torch {r['torch']}  triton {r['triton']}  commit {r['git_commit']}")
    head = ("op", "backend/impl", "B", "dtype", "us", "TFLOP/s", "%mm", "xref")
    print("{:26s} {:34s} {:>5s} {:>8s} {:>9s} {:>8s} {:>5s} {:>6s}".format(*head))
    for r in results["infonce"]:
        print(
            f"{r['op']:26s} {r['backend']:34s} {r['B']:5d} {r['dtype']:>8s} {fmt_us(r['seconds'])} "
            f"{(r['tflops'] or 0):8.1f} {100 * (r['frac_of_matmul'] or 0):5.1f} "
            f"{(r.get('speedup_vs_reference') or 0):6.1f}"
        )
    for r in results["momentum"]:
        print(
            f"{'momentum':26s} {r['impl']:34s} {'':5s} {'fp32':>8s} {fmt_us(r['seconds'])} "
            f"{(r['gbps'] or 0):7.0f}GB/s {100 * (r['frac_of_copy'] or 0):4.0f}% of copy"
        )
    for r in results["enqueue"]:
        print(f"{'enqueue':26s} {r['impl']:34s} {r['B']:5d} {'':>8s} {fmt_us(r['seconds'])}")
    for r in results["autotune"]:
        tuned, heur = fmt_us(r["seconds"]), fmt_us(r["heuristic_seconds"])
        print(f"autotune B={r['B']}: {tuned} us (heuristic {heur}) {r['config']}")
    if errors:
        print(f"\n{len(errors)} errors:\n  " + "\n  ".join(errors))

    out = args.out
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        if args.dry_run:  # not a measurement: keep it out of benchmarks/results
            import tempfile

            out = os.path.join(tempfile.gettempdir(), f"moco_fast_dryrun_{stamp}.json")
        else:
            out = os.path.join(HERE, "results", f"gpu_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1, default=str)
    print(f"\nwrote {out} ({results['total_seconds']} s)")
    if os.environ.get("OUT") and os.path.isdir(os.environ["OUT"]):
        import shutil

        shutil.copy(out, os.path.join(os.environ["OUT"], os.path.basename(out)))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
