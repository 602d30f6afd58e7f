#!/usr/bin/env python
"""Momentum (EMA) update of a key encoder: θk ← m·θk + (1 − m)·θq over real parameter sets.

Parameter sets: the parameter lists of torchvision's resnet18, resnet50 and vit_b_16 as shape tables
(``moco_fast.benchmarking.PARAMETER_SETS``; no torchvision needed, a test checks the tables against
torchvision), random values. Rows, each checked against the official loop on one step before timing:

* ``official loop``: moco_fast.reference.reference_momentum_update, the MoCo code's per-parameter
  ``param_k.data = param_k.data * m + param_q.data * (1 - m)`` (new tensors every step).
* ``flat lerp_``: one ``flat.lerp_(flat_src, 1 − m)`` over a single fp32 buffer holding all the
  parameters: the speed of light of the update (one pass, one launch). Every row's time is also
  given as a ratio to this row ("vs flat lerp_": its time / the row's time; 1.00x is the goal).
* ``lightly``: lightly.models.utils.update_momentum (torch._foreach_mul_ + _foreach_add_).
* ``_foreach_lerp_``: torch._foreach_lerp_(targets, sources, 1 − m).
* ``moco_fast.momentum_update[<backend>]``: on the two modules' parameter lists.
* ``MomentumEncoder.update[<backend>]``: the flat-buffer encoder (parameters are views of one buffer).

Metrics: median time per update (perf_counter on the CPU, CUDA events on a GPU), achieved GB/s
(3 tensors' bytes per parameter: read target and source, write target — 12 bytes in fp32), speed vs
the official loop and vs the flat lerp_, and the max |difference| from the official loop after one step.

    python benchmarks/bench_momentum.py [--device cuda] [--models resnet18 resnet50 vit_b_16] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402

from moco_fast import benchmarking as mb  # noqa: E402

MODELS = tuple(mb.PARAMETER_SETS)
FLAT = "flat lerp_"


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The online encoder: a module with the parameter list of torchvision's ``name`` (random values)."""
    return mb.parameter_set(name, device=device, dtype=dtype, seed=0)


def perturbed_copy(model: torch.nn.Module) -> torch.nn.Module:
    return mb.perturbed_copy(model)


def rows_for(device: torch.device, wanted: list[str] | None) -> list[tuple[str, str, str | None]]:
    """(row name, kind, backend) in table order."""
    import moco_fast

    rows = [
        ("official loop", "official", None),
        (FLAT, "flat_lerp", None),
        ("lightly", "lightly", None),
        ("_foreach_lerp_", "lerp", None),
    ]
    backends = [b for b in moco_fast.available_backends() if b != "reference"]
    if device.type != "cuda":
        backends = [b for b in backends if b == "torch"]  # triton: CPU interpreter far too slow; cuda: GPU only
    for b in backends:
        rows.append((f"moco_fast.momentum_update[{b}]", "list", b))
    for b in backends:
        rows.append((f"MomentumEncoder.update[{b}]", "encoder", b))
    if wanted and wanted != ["all"]:
        rows = [r for r in rows if r[0] in wanted or r[1] in wanted or (r[2] is not None and r[2] in wanted)]
    return rows


def make_updater(kind: str, backend: str | None, online: torch.nn.Module, target0: torch.nn.Module, momentum: float):
    """(update() -> None, read() -> list of target tensors) for one row on its own copy of the target.

    The peers (lightly, torch._foreach_lerp_) are here; moco_fast's rows and the official loop come
    from moco_fast.benchmarking.momentum_updater, shared with ``python -m moco_fast.check``.
    """
    if kind in mb.MOMENTUM_KINDS:
        return mb.momentum_updater(kind, backend, online, target0, momentum)
    import copy

    target = copy.deepcopy(target0)
    targets = [p.data for p in target.parameters()]
    if kind == "lightly":
        from lightly.models.utils import update_momentum

        return (lambda: update_momentum(online, target, momentum)), lambda: targets
    if kind == "lerp":
        sources = [p.data for p in online.parameters()]

        def lerp():
            with torch.no_grad():
                torch._foreach_lerp_(targets, sources, 1.0 - momentum)

        return lerp, lambda: targets
    raise ValueError(kind)


def run_model(name: str, args, device, dtype, timing) -> list[dict]:
    online = build_model(name, device, dtype)
    target0 = perturbed_copy(online)
    numel = sum(p.numel() for p in online.parameters())
    count = sum(1 for _ in online.parameters())
    bytes_per_step = 3 * numel * torch.empty((), dtype=dtype).element_size()
    expected = None
    results = []
    for row, kind, backend in rows_for(device, args.backends):
        result = {"model": name, "row": row, "params": numel, "tensors": count, "dtype": common.dtype_name(dtype)}
        results.append(result)
        try:
            if kind == "lightly":
                import lightly.models.utils  # noqa: F401
            update, read = make_updater(kind, backend, online, target0, args.momentum)
            update()  # one step from target0: the check
            mb.synchronize(device)
            got = mb.flat_values(read())
            if expected is None:
                expected = got  # the official loop runs first
            err = float((got - expected).abs().max())
            tol = 0.0 if kind == "official" else (1e-6 if dtype == torch.float32 else 1e-2)
            result.update(max_abs_err=err, status="ok" if err <= tol else f"FAIL (tol {tol:g})")
            t = mb.time_fn(update, device, **timing)
            result.update(
                time_s=t["median_s"], min_s=t["min_s"], repeats=t["repeats"], gbps=bytes_per_step / t["median_s"] / 1e9
            )
            del update, read
        except ImportError as exc:
            result.update(status=f"skipped: {exc.name or exc} not installed")
        except Exception as exc:  # noqa: BLE001
            result.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    for key, base_row in (("speedup_vs_official", "official loop"), ("speed_vs_flat_lerp", FLAT)):
        base = next((r for r in results if r["row"] == base_row and "time_s" in r), None)
        for r in results:
            if base and "time_s" in r:
                r[key] = base["time_s"] / r["time_s"]
    return results


def table(results: list[dict]) -> str:
    rows = [
        {
            "model": f"{r['model']} {r['dtype']} ({r['params'] / 1e6:.1f}M, {r['tensors']} tensors)",
            "row": r["row"],
            "t": mb.fmt_time(r.get("time_s")),
            "n": r.get("repeats", "-"),
            "gb": "-" if "gbps" not in r else f"{r['gbps']:.1f}",
            "sp": mb.fmt_ratio(r.get("speedup_vs_official")),
            "flat": mb.fmt_ratio(r.get("speed_vs_flat_lerp")),
            "err": mb.fmt_err(r.get("max_abs_err")),
            "status": r.get("status", ""),
        }
        for r in results
    ]
    cols = [
        ("model", "model"),
        ("row", "row"),
        ("time/update", "t"),
        ("n", "n"),
        ("GB/s", "gb"),
        ("speedup vs official", "sp"),
        ("vs flat lerp_", "flat"),
        ("max |err| vs official", "err"),
        ("check", "status"),
    ]
    return mb.format_table(rows, cols)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_run_args(p, repeats="CPU 20, GPU 100", warmup="CPU 2, GPU 10", budget="CPU 1, GPU 0.5")
    p.add_argument("--dtype", nargs="+", default=["fp32"], help="parameter dtype(s): fp32, bf16, fp16")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--momentum", type=float, default=0.999)
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="rows: official flat_lerp lightly lerp list encoder, or a backend: torch triton cuda",
    )
    # Accepted for a uniform CLI across the benchmarks (gpu_check.sh); they do not apply here.
    for flag in ("-B", "--batch", "-K", "--keys", "-d", "--dim"):
        p.add_argument(flag, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--sweep", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    timing = {
        "warmup": args.warmup if args.warmup is not None else (10 if gpu else 2),
        "repeats": args.repeats or (100 if gpu else (5 if args.quick else 20)),
        "min_repeats": 3 if args.quick else 5,
        "budget_s": args.budget or (0.25 if args.quick else (0.5 if gpu else 1.0)),
    }
    details = f"m={args.momentum}, {' '.join(args.dtype)}"
    machine = common.announce("momentum", device, details)
    results = []
    for dtype_name in args.dtype:
        for name in args.models:
            results += run_model(name, args, device, common.parse_dtype(dtype_name), timing)
    return common.finish("momentum", results, table(results), machine, timing, args, argv)


if __name__ == "__main__":
    sys.exit(main())
