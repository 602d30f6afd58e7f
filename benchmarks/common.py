"""Shared helpers of the moco_fast benchmarks: timing, peak memory, machine info, tables, JSON.

One job per helper; the bench_*.py scripts hold only what is specific to their op.

Timing (DESIGN.md, "Testing and measuring"): the median of many repeats after warm-up, with
``time.perf_counter`` on the CPU and CUDA events on a GPU. Report ratios inside one run: these
machines are shared and noisy.

Peak memory: on the CPU, tracemalloc does not see torch's allocator, so we read the process
high-water mark (VmHWM in /proc/self/status) after resetting it (``echo 5 > /proc/self/clear_refs``)
in a FRESH process per variant, on its first call, above the RSS once the inputs exist (a warm-up in
the same process would hide the allocator's reuse). On a GPU, ``torch.cuda.max_memory_allocated``
above the memory allocated before the call.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
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


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_time(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (CUDA events on a GPU, perf_counter on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 20,
    min_repeats: int = 3,
    budget_s: float | None = None,
) -> dict[str, float]:
    """Median (and min, mean, count) seconds of ``fn()`` after ``warmup`` untimed calls.

    With ``budget_s`` the number of repeats shrinks (to no fewer than ``min_repeats``) so that the
    timed calls take about that long: slow rows get few repeats, fast rows many.
    """
    for _ in range(max(warmup, 0)):
        fn()
    synchronize(device)
    times = [_one_time(fn, device)]
    count = repeats
    if budget_s is not None and times[0] > 0:
        count = min(repeats, max(min_repeats, int(budget_s / times[0])))
    for _ in range(count - 1):
        times.append(_one_time(fn, device))
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "mean_s": statistics.fmean(times),
        "repeats": len(times),
        "warmup": warmup,
    }


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_supported() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")


def reset_hwm() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def cpu_peak_extra(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(bytes the process high-water mark rose above the RSS before ``fn``, fn's result).

    Call it once per FRESH process, on the first call of the measured function, after the inputs exist.
    """
    import gc

    gc.collect()
    reset_hwm()
    base = rss_bytes()
    result = fn()
    peak = _status_kib("VmHWM") * 1024
    return max(peak - base, 0), result


def cuda_peak_extra(fn: Callable[[], Any], device: torch.device) -> tuple[int, Any]:
    """(bytes max_memory_allocated rose above the memory allocated before ``fn``, fn's result)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return max(torch.cuda.max_memory_allocated(device) - base, 0), result


def available_memory_bytes(device: torch.device) -> int:
    """Memory a case may use: MemAvailable on the CPU, free device memory on a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(script: str, args: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python script *args`` in a fresh process; it must print one JSON object as its last line.

    Returns that object, or {"error": ...} if the child failed (its stderr tail is kept).
    """
    cmd = [sys.executable, script, *args]
    env = dict(os.environ)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# Machine info and output
# ------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU/GPU, library versions, commit and date: stored with every JSON result."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_available_gib": round(available_memory_bytes(torch.device("cpu")) / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "lightly": _version("lightly"),
        "torchvision": _version("torchvision"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "moco_fast": _version("moco_fast"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sm_count=props.multi_processor_count,
            gpu_capability=f"{props.major}.{props.minor}",
        )
    return info


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_err(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` are (header, key) pairs; values are printed with str()."""
    cells = [[str(row.get(key, "")) for _, key in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)
        f.write("\n")
    print(f"wrote {path}")


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


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def add_run_args(parser, *, repeats: str, warmup: str, budget: str, quick: str = "fewer repeats") -> None:
    """The options every benchmark shares; the strings describe each script's defaults in --help."""
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--repeats", type=int, default=None, help=f"max timed repeats ({repeats})")
    parser.add_argument("--warmup", type=int, default=None, help=f"untimed calls first ({warmup})")
    parser.add_argument("--budget", type=float, default=None, help=f"seconds of timed calls per row ({budget})")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default torch's)")
    parser.add_argument("--json", metavar="PATH", help="write results and machine info as JSON")
