"""What the bench_*.py scripts share beyond the harness: command-line options, dtypes, JSON, progress.

Timing, peak memory, machine info, floors and table formatting are ``moco_fast.benchmarking`` (the one
harness, also used by ``python -m moco_fast.check``); this module adds only what is specific to the
benchmark scripts.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import torch

from moco_fast import benchmarking as mb

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
PEERS = ("lightly", "torchvision", "cut-cross-entropy")  # the other libraries some rows time


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def set_threads(threads: int | None) -> None:
    """--threads: intra-op CPU threads (default: torch's). On a loaded machine 1 thread is steadier:
    every parallel region otherwise waits for a scheduler time slice to wake its second thread."""
    if threads:
        torch.set_num_threads(threads)


def pick_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked but torch.cuda.is_available() is False")
    return device


def machine_info(device: torch.device) -> dict[str, Any]:
    """The harness's machine info plus the versions of the peer libraries the benchmarks time."""
    info = mb.machine_info(device)
    info.update({name.replace("-", "_"): mb.package_version(name) for name in PEERS})
    return info


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    print(f"wrote {path}")


def announce(benchmark: str, device: torch.device, details: str = "") -> dict[str, Any]:
    """Print the run's one-line header (machine, versions, threads, load) and return the machine info."""
    machine = machine_info(device)
    print(
        f"# bench_{benchmark} on {machine.get('gpu', machine['cpu'])} ({device}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {machine['loadavg']}" + (f"; {details}" if details else "")
    )
    return machine


def finish(benchmark: str, results: list, table_text: str, machine: dict, timing: dict, args, argv) -> int:
    """Print the table, note the load at the end, write ``--json`` if asked; the exit status."""
    print(table_text)
    machine["loadavg_end"] = list(os.getloadavg())
    if args.json:
        argv = sys.argv[1:] if argv is None else list(argv)
        payload = {"benchmark": benchmark, "machine": machine, "timing": timing, "argv": argv, "results": results}
        write_json(args.json, payload)
    return 0


def progress(iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
    """tqdm when installed (on stderr), else the iterable with a one-line counter."""
    try:
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:

        def counted():
            for i, item in enumerate(iterable, 1):
                print(f"\r{desc} {i}/{total or '?'}", end="", file=sys.stderr, flush=True)
                yield item
            print(file=sys.stderr)

        return counted()


def add_run_args(parser, *, repeats: str, warmup: str, budget: str, quick: str = "fewer repeats") -> None:
    """The options every benchmark shares; the strings describe each script's defaults in --help."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, default=None, help=f"max timed repeats ({repeats})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed calls first ({warmup})")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds of timed calls per row ({budget})")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default torch's)")
    parser.add_argument("--json", metavar="PATH", help="write results and machine info as JSON")
