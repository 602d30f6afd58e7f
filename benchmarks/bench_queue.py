#!/usr/bin/env python
"""Enqueue into MoCo's key queue: the official ring buffer vs moco_fast.KeyQueue.enqueue.

Rows, each checked (same queue contents after a few steps from the same start) before timing:

* ``official queue[:, ptr:ptr+B] = keys.T``: moco_fast.reference.reference_enqueue (through
  moco_fast.benchmarking.OfficialQueue) — the MoCo code's (dim, K) buffer, written transposed,
  ``int(ptr)`` host read, ``K % B == 0`` assert (rows whose B does not divide K are skipped: the
  official code cannot run them). The baseline of the "speedup vs official" column (its time / the
  row's time: >= 1.00x means KeyQueue is at least as fast).
* ``KeyQueue.enqueue[<backend>, raise]`` (the default): (K, d) buffer, device-side ptr/count,
  all-or-nothing NaN/Inf check; "raise" counts a refusal on the device and reads it back
  asynchronously (pinned memory + event; the error comes at the next enqueue): no host sync on a GPU.
* ``KeyQueue.enqueue[<backend>, skip]``: drops a bad batch on the device; no host sync once the queue is full.

Metrics: median time per call (perf_counter on the CPU, CUDA events on a GPU) and host syncs per
call. On CUDA the syncs are counted with torch.cuda.set_sync_debug_mode("warn") (one warning per
synchronizing call); on the CPU there is no device to sync with, so the column says "n/a" and the
structural count (host reads of device values per call) is given next to it.

    python benchmarks/bench_queue.py [--device cuda] [-B 256] [-K 65536] [-d 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moco_fast import benchmarking as mb  # noqa: E402

OFFICIAL = "official queue[:, ptr:ptr+B] = keys.T"
# Host reads of device values per call, by construction of the code (see the module docstring).
STRUCTURAL_SYNCS = {"official": "1 (int(ptr))", "raise": "0 (refusal read back async)", "skip": "0 once full"}


def make_keys(steps: int, batch: int, dim: int, device, dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device, dtype) for _ in range(steps)]


def rows_for(device: torch.device, wanted: list[str] | None) -> list[tuple[str, str | None, str]]:
    import moco_fast

    rows = [(OFFICIAL, None, "official")]
    backends = [b for b in moco_fast.available_backends() if b != "reference"]
    if device.type != "cuda":
        backends = [b for b in backends if b == "torch"]  # triton: interpreter far too slow; cuda: GPU only
    for b in backends:
        for mode in ("raise", "skip"):
            rows.append((f"KeyQueue.enqueue[{b}, {mode}]", b, mode))
    if wanted and wanted != ["all"]:
        rows = [r for r in rows if r[0] in wanted or r[2] in wanted or (r[1] is not None and r[1] in wanted)]
    return rows


class Moco:
    def __init__(self, start: torch.Tensor, backend: str, mode: str):
        import moco_fast

        size, dim = start.shape
        self.q = moco_fast.KeyQueue(
            size,
            dim,
            dtype=start.dtype,
            gather_distributed=False,
            init="random",
            on_nonfinite=mode,
            device=start.device,
            backend=backend,
        )
        with torch.no_grad():
            self.q.keys.copy_(start)

    def enqueue(self, keys):
        self.q.enqueue(keys)

    def contents(self):
        return self.q.keys


def _enqueue_next(impl, keys_cycle) -> None:
    impl.enqueue(next(keys_cycle))


def count_syncs(fn, device: torch.device, calls: int = 5):
    """Synchronizing CUDA calls per fn() (sync debug mode "warn"); "n/a" off CUDA."""
    if device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize(device)
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(syncs) / calls


def run_case(batch, size, dim, dtype, device, args, timing) -> list[dict]:
    start = F.normalize(torch.randn(size, dim, generator=torch.Generator().manual_seed(1)), dim=1).to(device, dtype)
    check_keys = make_keys(3, batch, dim, device, dtype, seed=2)
    bench_keys = make_keys(8, batch, dim, device, dtype, seed=3)
    expected = None
    results = []
    for row, backend, mode in rows_for(device, args.backends):
        result = {
            "row": row,
            "B": batch,
            "K": size,
            "d": dim,
            "dtype": common.dtype_name(dtype),
            "structural_syncs": STRUCTURAL_SYNCS[mode],
        }
        results.append(result)
        if mode == "official" and size % batch != 0:
            result["status"] = "skipped: K % B != 0 (the official code asserts)"
            continue
        try:
            impl = mb.OfficialQueue(start) if mode == "official" else Moco(start, backend, mode)
            for keys in check_keys:
                impl.enqueue(keys)
            got = impl.contents().float().clone()
            if expected is None:
                expected = got
            err = float((got - expected).abs().max())
            result.update(max_abs_err=err, status="ok" if err == 0 else "FAIL (contents differ)")
            call = functools.partial(_enqueue_next, impl, itertools.cycle(bench_keys))
            t = mb.time_fn(call, device, **timing)
            result.update(
                time_s=t["median_s"], min_s=t["min_s"], repeats=t["repeats"], host_syncs=count_syncs(call, device)
            )
        except Exception as exc:  # noqa: BLE001
            result.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    base = next((r for r in results if r["row"] == OFFICIAL and "time_s" in r), None)
    for r in results:
        if base and "time_s" in r:
            r["speedup_vs_official"] = base["time_s"] / r["time_s"]
    return results


def table(results: list[dict]) -> str:
    rows = [
        {
            "case": f"{r['B']}/{r['K']}/{r['d']}/{r['dtype']}",
            "row": r["row"],
            "t": mb.fmt_time(r.get("time_s")),
            "n": r.get("repeats", "-"),
            "sp": mb.fmt_ratio(r.get("speedup_vs_official")),
            "sync": r.get("host_syncs", "-"),
            "struct": r["structural_syncs"],
            "status": r.get("status", ""),
        }
        for r in results
    ]
    cols = [
        ("case B/K/d/dtype", "case"),
        ("row", "row"),
        ("time/call", "t"),
        ("n", "n"),
        ("speedup vs official", "sp"),
        ("host syncs/call", "sync"),
        ("by construction", "struct"),
        ("check", "status"),
    ]
    return mb.format_table(rows, cols)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_run_args(p, repeats="CPU 200, GPU 500", warmup="CPU 3, GPU 20", budget="default 0.5")
    p.add_argument("--dtype", nargs="+", default=["fp32"])
    p.add_argument("-B", "--batch", type=int, nargs="+", default=None, help="keys per enqueue (default 256)")
    p.add_argument("-K", "--keys", type=int, nargs="+", default=None, help="queue size (default 65536)")
    p.add_argument("-d", "--dim", type=int, nargs="+", default=None, help="key dim (default 128)")
    p.add_argument("--backends", nargs="+", default=None, help="rows: official raise skip torch triton cuda")
    p.add_argument("--sweep", action="store_true", help="B in {64, 256, 1000, 4096} x K in {4096, 65536}")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    timing = {
        "warmup": args.warmup if args.warmup is not None else (20 if gpu else 3),
        "repeats": args.repeats or (50 if args.quick else (500 if gpu else 200)),
        "min_repeats": 5,
        "budget_s": args.budget or (0.2 if args.quick else 0.5),
    }
    batches = args.batch or ([64, 256, 1000, 4096] if args.sweep else [256])
    sizes = args.keys or ([4096, 65536] if args.sweep else [65536])
    dims = args.dim or [128]
    machine = common.announce("queue", device)
    results = []
    for t, d, k, b in itertools.product(args.dtype, dims, sizes, batches):
        if b > k:
            continue
        results += run_case(b, k, d, common.parse_dtype(t), device, args, timing)
    return common.finish("queue", results, table(results), machine, timing, args, argv)


if __name__ == "__main__":
    sys.exit(main())
