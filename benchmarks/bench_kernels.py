#!/usr/bin/env python
# ruff: noqa: B023 - the lambdas built in loops are timed at once, inside their iteration
"""The Triton backend's launchers timed below the public API (no autograd, no custom-op dispatch).

For B = 256 and 4096, K = 65536, d = 128, bf16 and fp32 (``--quick``: B = 256): the raw
``moco_fast.kernels`` forward, backward (dq, dk), both, and the negatives' gradient, each with the
tile config and split count the heuristics chose; ``--autotune`` also runs the forward autotuner
(MOCO_FAST_TRITON_AUTOTUNE=1) and gives the best config next to the heuristic's time. The public-API
rows (every backend, the floors, the momentum update, the enqueue) are ``python -m moco_fast.check``
and bench_infonce.py / bench_momentum.py / bench_queue.py.

This script calls the backend contract (``moco_fast.backends``' docstring) and the heuristics of
``moco_fast.kernels`` directly: when they change, a failing row is reported and the others still run.
Timing: moco_fast.benchmarking.time_fn (CUDA events, median after warm-up).

    python benchmarks/bench_kernels.py [--json PATH] [--quick] [--autotune]
    python benchmarks/bench_kernels.py --dry-run     # CPU, tiny sizes, TRITON_INTERPRET=1: code paths only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moco_fast import benchmarking as mb  # noqa: E402
from moco_fast.numerics import fp32_matmul_precision  # noqa: E402


def safe(label, fn, errors):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - a failing row is recorded, the rest still runs
        errors.append(f"{label}: {type(err).__name__}: {err}")
        traceback.print_exc()
        return None


def raw_rows(KN, device, size, timing, errors) -> list[dict]:
    """Forward, backward, both and dn of the raw launchers, with the heuristics' config."""
    from moco_fast.kernels import heuristics as H

    rows = []
    K, d = size["K"], size["d"]
    scale = 1 / 0.07
    for dtype in (torch.bfloat16, torch.float32):
        for B in size["B"]:
            gen = torch.Generator().manual_seed(B)
            q, k, queue = (F.normalize(torch.randn(r, d, generator=gen), dim=1).to(device, dtype) for r in (B, B, K))
            grad = torch.full((B,), 1.0 / B, device=device)
            fwd = lambda: KN.infonce_forward(q, k, queue, scale)
            first = safe(f"fwd B={B} {dtype}", fwd, errors)
            if first is None:
                continue
            loss, lse, delta, _ = first  # contract v3: (loss, lse, delta, rank)
            bwd = lambda: KN.infonce_backward(grad, q, k, loss, delta, scale)
            both = lambda: (fwd(), bwd())
            dn = lambda: KN.infonce_backward_negatives(grad, q, queue, lse, scale)
            name = common.dtype_name(dtype)
            dot = H.dot_dtype_name(str(dtype).replace("torch.", ""), str(queue.dtype).replace("torch.", ""))
            precision = "ieee" if fp32_matmul_precision() == "ieee" else "tf32"
            num_sms, cc = 1, (9, 0)
            if device.type == "cuda":
                props = torch.cuda.get_device_properties(device)
                num_sms, cc = props.multi_processor_count, (props.major, props.minor)
            cfg = H.fwd_config(H.d_pad(d), dot, cc, KN.INTERPRETED, precision)
            splits = H.num_splits(H.cdiv(B, cfg.block_m), H.cdiv(K, cfg.block_n), num_sms)
            config = dict(cfg.__dict__, num_splits=splits, precision=precision)
            flops = 4.0 * B * K * d
            for label, fn, fl in (
                ("fwd+bwd", both, flops),
                ("fwd", fwd, flops),
                ("bwd (dq, dk)", bwd, 0),
                ("dn", dn, flops),
            ):
                t = safe(f"{label} B={B} {name}", lambda: mb.time_fn(fn, device, **timing)["median_s"], errors)
                rows.append(
                    dict(
                        op=f"triton raw {label}",
                        B=B,
                        K=K,
                        d=d,
                        dtype=name,
                        time_s=t,
                        tflops=(fl / t / 1e12) if (t and fl) else None,
                        config=config,
                    )
                )
    return rows


def autotune_rows(KN, device, size, timing, errors) -> list[dict]:
    """MOCO_FAST_TRITON_AUTOTUNE=1: the best forward config per B (bf16), next to the heuristic's time."""
    from moco_fast.kernels import infonce_fwd

    rows = []
    scale = 1 / 0.07
    previous = os.environ.get("MOCO_FAST_TRITON_AUTOTUNE")
    try:
        for B in size["B"]:
            q, k, queue = (
                F.normalize(torch.randn(r, size["d"], device=device), dim=1).bfloat16() for r in (B, B, size["K"])
            )
            os.environ["MOCO_FAST_TRITON_AUTOTUNE"] = "1"
            t0 = time.perf_counter()
            best = safe(f"autotune B={B}", lambda: infonce_fwd._autotuned_fwd(q, k, queue, scale), errors)
            tune_s = time.perf_counter() - t0
            if not best or best[0] is None:
                continue
            cfg, splits = best
            tuned = mb.time_fn(
                lambda: KN.infonce_forward(q, k, queue, scale, num_splits=splits, config=cfg), device, **timing
            )
            os.environ["MOCO_FAST_TRITON_AUTOTUNE"] = "0"
            heuristic = mb.time_fn(lambda: KN.infonce_forward(q, k, queue, scale), device, **timing)
            rows.append(
                dict(
                    op="triton fwd autotuned",
                    B=B,
                    dtype="bf16",
                    time_s=tuned["median_s"],
                    heuristic_s=heuristic["median_s"],
                    tune_s=tune_s,
                    config=dict(cfg.__dict__, num_splits=splits),
                )
            )
    finally:
        if previous is None:
            os.environ.pop("MOCO_FAST_TRITON_AUTOTUNE", None)
        else:
            os.environ["MOCO_FAST_TRITON_AUTOTUNE"] = previous
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the rows and machine info as JSON")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreter: exercise the code paths")
    p.add_argument("--quick", action="store_true", help="B=256 only, fewer repeats")
    p.add_argument("--autotune", action="store_true", help="also run the triton forward autotuner (bf16)")
    args = p.parse_args(argv)
    try:
        import moco_fast.kernels as KN
    except Exception as exc:  # noqa: BLE001
        print(f"moco_fast.kernels does not import: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        device = torch.device("cpu")
        size = dict(B=(7,), K=300, d=16)
        timing = dict(warmup=0, repeats=1, min_repeats=1)
    else:
        if not torch.cuda.is_available():
            print("bench_kernels.py needs a CUDA GPU (use --dry-run to check it on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        size = dict(B=(256,) if args.quick else (256, 4096), K=65536, d=128)
        timing = dict(warmup=5, repeats=20 if args.quick else 50, min_repeats=5, budget_s=0.3)
    errors: list[str] = []
    rows = raw_rows(KN, device, size, timing, errors)
    if args.autotune and not args.dry_run:
        rows += autotune_rows(KN, device, size, timing, errors)
    table = [
        dict(
            op=r["op"],
            case=f"B={r['B']} {r['dtype']}",
            t=mb.fmt_time(r.get("time_s")),
            tf="-" if not r.get("tflops") else f"{r['tflops']:.1f}",
            heur=mb.fmt_time(r.get("heuristic_s")),
            config=r.get("config", ""),
        )
        for r in rows
    ]
    cols = [
        ("op", "op"),
        ("case", "case"),
        ("time", "t"),
        ("TFLOP/s", "tf"),
        ("heuristic", "heur"),
        ("config", "config"),
    ]
    print(mb.format_table(table, cols))
    if errors:
        print(f"\n{len(errors)} errors:\n  " + "\n  ".join(errors))
    if args.json:
        common.write_json(
            args.json,
            {
                "benchmark": "kernels",
                "machine": common.machine_info(device),
                "dry_run": args.dry_run,
                "results": rows,
                "errors": errors,
            },
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
