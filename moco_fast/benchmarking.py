"""The one timing / memory / machine-info harness of moco_fast's check and benchmarks.

Used by ``python -m moco_fast.check`` and by every script in benchmarks/ (which keep only their rows,
tables, JSON and command-line options). Needs torch alone (triton optionally, for ``do_bench``).

Timing (docs/design.md, "Testing and measuring"): the median of many repeats after warm-up, with
``time.perf_counter`` on the CPU and CUDA events around each call on a GPU (or
``triton.testing.do_bench``'s median). Report ratios inside one run: these machines are noisy.

Peak memory: on the CPU, tracemalloc does not see torch's allocator, so we read the process
high-water mark (VmHWM in /proc/self/status) after resetting it (``echo 5 > /proc/self/clear_refs``)
in a FRESH process per variant (``run_child``), on its first call, above the RSS once the inputs exist
(a warm-up in the same process would hide the allocator's reuse). On a GPU,
``torch.cuda.max_memory_allocated`` above the memory allocated before the call.

Also here, because the check and the benchmarks share them: the datasheet floors of known GPUs
(``gpu_floors``), the parameter sets of ResNet-18/50 and ViT-B/16 as shape tables (no torchvision
needed), the momentum-update rows and the official enqueue.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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
    method: str = "events",
) -> dict[str, float]:
    """Median (and min, mean, count) seconds of ``fn()`` after ``warmup`` untimed calls.

    With ``budget_s`` the number of repeats shrinks (to no fewer than ``min_repeats``) so that the
    timed calls take about that long: slow rows get few repeats, fast rows many. On a GPU,
    ``method="do_bench"`` uses ``triton.testing.do_bench`` (its median; warm-up and repeats are
    then given to it in milliseconds: 25 and ``budget_s`` or 100).
    """
    if method == "do_bench" and device.type == "cuda":
        from triton.testing import do_bench

        rep_ms = 1e3 * budget_s if budget_s else 100.0
        median_ms = do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
        return {"median_s": median_ms / 1e3, "min_s": math.nan, "mean_s": math.nan, "repeats": -1, "warmup": -1}
    if method not in ("events", "do_bench"):
        raise ValueError(f"method must be 'events' or 'do_bench', got {method!r}")
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


def cache_rotation(nbytes_per_set: int, device: torch.device, factor: float = 3.0, most: int = 8) -> int:
    """How many input sets to cycle through so the timed calls do not run from the GPU's L2 cache.

    1 on the CPU and for inputs larger than ``factor`` × L2; else enough sets to exceed that.
    """
    if device.type != "cuda" or nbytes_per_set <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0
    return max(1, min(most, math.ceil(factor * l2 / nbytes_per_set)))


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
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(args: Sequence[str], timeout: float = 900) -> dict:
    """Run ``python *args`` in a fresh process; it must print one JSON object as its last ``{`` line.

    Returns that object, or {"error": ...} if the child failed (its stderr tail is kept).
    """
    cmd = [sys.executable, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------------------
# Machine info
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
    """git in the folder above the moco_fast package (the repo for an editable install, else None)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None; never imports it."""
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # noqa: BLE001 - not installed
        return None


def driver_version() -> str | None:
    """The NVIDIA driver version (e.g. "580.159.03") from NVML or nvidia-smi; None without one."""
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def gpu_info(device: torch.device) -> dict[str, Any]:
    """Name, memory, SM count, compute capability and L2 size of a CUDA device."""
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "gpu_sm_count": props.multi_processor_count,
        "gpu_capability": f"{props.major}.{props.minor}",
        "gpu_l2_bytes": getattr(props, "L2_cache_size", None),
    }


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU/GPU, library versions, commit and date: stored with every result."""
    from .numerics import fp32_matmul_precision

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
        "triton": package_version("triton"),
        "numpy": package_version("numpy"),
        "moco_fast": package_version("moco_fast"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "float32_matmul_precision": fp32_matmul_precision(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    if device.type == "cuda":
        info.update(gpu_info(device))
        info["driver"] = driver_version()
    return info


# ------------------------------------------------------------------------------------------------
# Floors: datasheet rates of known GPUs (leads, not measurements)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFloors:
    """Dense datasheet rates: TFLOP/s of bf16 tensor cores, TF32 tensor cores and plain fp32; TB/s of memory."""

    label: str
    bf16_tflops: float
    tf32_tflops: float
    fp32_tflops: float
    memory_tbps: float

    def matmul_tflops(self, dtype: torch.dtype, fp32_precision: str) -> float:
        """The rate a dot of ``dtype`` operands runs at ("tf32" or "ieee" for fp32)."""
        if dtype in (torch.bfloat16, torch.float16):
            return self.bf16_tflops
        return self.tf32_tflops if fp32_precision == "tf32" else self.fp32_tflops


# (pattern on torch.cuda.get_device_name(), floors); the first match wins, so variants come first.
# H200 and H100 SXM: docs/design.md's 990 TFLOP/s bf16 dense; H200 4.8 TB/s.
KNOWN_GPUS: tuple[tuple[str, GpuFloors], ...] = (
    (r"H200 NVL", GpuFloors("H200 NVL", 835.0, 418.0, 60.0, 4.8)),
    (r"H200", GpuFloors("H200 SXM", 990.0, 495.0, 67.0, 4.8)),
    (r"H100 NVL", GpuFloors("H100 NVL", 835.0, 418.0, 60.0, 3.9)),
    (r"H100 PCIe", GpuFloors("H100 PCIe", 756.0, 378.0, 51.0, 2.0)),
    (r"H100", GpuFloors("H100 SXM", 990.0, 495.0, 67.0, 3.35)),
    (r"A100.*SXM.*80GB", GpuFloors("A100 SXM 80GB", 312.0, 156.0, 19.5, 2.039)),
    (r"A100 80GB PCIe", GpuFloors("A100 PCIe 80GB", 312.0, 156.0, 19.5, 1.935)),
    (r"A100", GpuFloors("A100 40GB", 312.0, 156.0, 19.5, 1.555)),
    (r"L40S", GpuFloors("L40S", 362.0, 183.0, 91.6, 0.864)),
    (r"\bL4\b", GpuFloors("L4", 121.0, 60.0, 30.3, 0.3)),
)


def gpu_floors(name: str | None) -> GpuFloors | None:
    """The datasheet floors of a GPU by its name, or None when it is not in ``KNOWN_GPUS``."""
    if not name:
        return None
    for pattern, floors in KNOWN_GPUS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return floors
    return None


# ------------------------------------------------------------------------------------------------
# Parameter sets (shape tables of torchvision's models, built with weights=None)
# ------------------------------------------------------------------------------------------------


def _bn(channels: int) -> list[tuple[int, ...]]:
    return [(channels,), (channels,)]  # weight, bias


def resnet_shapes(blocks: Sequence[int], bottleneck: bool, num_classes: int = 1000) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's ResNet, in ``parameters()`` order (conv weights have no bias)."""
    shapes = [(64, 3, 7, 7), *_bn(64)]
    expansion = 4 if bottleneck else 1
    inplanes = 64
    for stage, count in enumerate(blocks):
        planes = 64 * 2**stage
        for b in range(count):
            stride_or_width_change = b == 0 and (stage > 0 or inplanes != planes * expansion)
            if bottleneck:
                shapes += [(planes, inplanes, 1, 1), *_bn(planes), (planes, planes, 3, 3), *_bn(planes)]
                shapes += [(planes * 4, planes, 1, 1), *_bn(planes * 4)]
            else:
                shapes += [(planes, inplanes, 3, 3), *_bn(planes), (planes, planes, 3, 3), *_bn(planes)]
            if stride_or_width_change:  # the downsample branch: 1x1 conv + BN
                shapes += [(planes * expansion, inplanes, 1, 1), *_bn(planes * expansion)]
            inplanes = planes * expansion
    return shapes + [(num_classes, inplanes), (num_classes,)]


def vit_shapes(
    layers: int = 12, hidden: int = 768, mlp: int = 3072, patch: int = 16, image: int = 224, num_classes: int = 1000
) -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's VisionTransformer (vit_b_16 by default), in ``parameters()`` order."""
    tokens = (image // patch) ** 2 + 1
    shapes = [(1, 1, hidden), (hidden, 3, patch, patch), (hidden,), (1, tokens, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden,), (3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,), (mlp, hidden), (mlp,), (hidden, mlp), (hidden,)]
    return shapes + [(hidden,), (hidden,), (num_classes, hidden), (num_classes,)]


PARAMETER_SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet18": lambda: resnet_shapes((2, 2, 2, 2), bottleneck=False),  # 62 tensors, 11,689,512 values
    "resnet50": lambda: resnet_shapes((3, 4, 6, 3), bottleneck=True),  # 161 tensors, 25,557,032 values
    "vit_b_16": vit_shapes,  # 152 tensors, 86,567,656 values
}


class ParameterSet(torch.nn.Module):
    """An nn.Module holding random parameters of the given shapes (a model's parameter list, no forward)."""

    def __init__(self, shapes: Sequence[Sequence[int]], *, device=None, dtype=torch.float32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.params = torch.nn.ParameterList(
            torch.nn.Parameter((0.05 * torch.randn(tuple(s), generator=gen)).to(device=device, dtype=dtype))
            for s in shapes
        )


def parameter_set(name: str, device=None, dtype=torch.float32, seed: int = 0) -> ParameterSet:
    """The parameter list of torchvision's ``name`` (a key of PARAMETER_SETS) with random values."""
    if name not in PARAMETER_SETS:
        raise ValueError(f"name must be one of {', '.join(PARAMETER_SETS)}; got {name!r}")
    return ParameterSet(PARAMETER_SETS[name](), device=device, dtype=dtype, seed=seed)


# ------------------------------------------------------------------------------------------------
# Workloads the check and the benchmarks share
# ------------------------------------------------------------------------------------------------

MOMENTUM_KINDS = ("official", "flat_lerp", "list", "encoder")


def perturbed_copy(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The key encoder: a copy whose parameters differ from the online model's (so the update does work)."""
    target = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p), alpha=0.01)
            p.requires_grad_(False)
    return target


def momentum_updater(kind: str, backend: str | None, online: torch.nn.Module, target0: torch.nn.Module, m: float):
    """(update() -> None, read() -> list of target tensors) of one momentum row, on its own copy of ``target0``.

    kind: "official" (the MoCo per-parameter loop, moco_fast.reference), "flat_lerp" (one
    ``flat.lerp_(flat_src, 1 − m)`` over a single buffer of all parameters: the speed of light),
    "list" (moco_fast.momentum_update on the two modules) or "encoder" (MomentumEncoder.update,
    parameters as views of one flat buffer).
    """
    import moco_fast
    from moco_fast.reference import reference_momentum_update

    if kind == "encoder":
        enc = moco_fast.MomentumEncoder(online, momentum=m, backend=backend or "auto")
        with torch.no_grad():  # start from the same target as every other row
            for p, p0 in zip(enc.module.parameters(), target0.parameters(), strict=True):
                p.copy_(p0)
        return enc.update, lambda: [p.data for p in enc.module.parameters()]
    if kind == "flat_lerp":
        flat = torch.cat([p.data.reshape(-1) for p in target0.parameters()])
        flat_src = torch.cat([p.data.reshape(-1) for p in online.parameters()])

        def lerp():
            flat.lerp_(flat_src, 1.0 - m)

        return lerp, lambda: [flat]
    target = copy.deepcopy(target0)
    if kind == "official":
        return (lambda: reference_momentum_update(target, online, m)), lambda: [p.data for p in target.parameters()]
    if kind == "list":
        return (
            (lambda: moco_fast.momentum_update(target, online, m, backend=backend or "auto")),
            lambda: [p.data for p in target.parameters()],
        )
    raise ValueError(f"kind must be one of {', '.join(MOMENTUM_KINDS)}; got {kind!r}")


def flat_values(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """All values of ``tensors`` as one fp32 vector (to compare rows that store parameters differently)."""
    return torch.cat([t.detach().float().reshape(-1) for t in tensors])


class OfficialQueue:
    """The official MoCo enqueue (``moco_fast.reference.reference_enqueue``): a (d, K) buffer written
    transposed, ``queue[:, ptr:ptr+B] = keys.T``, after an ``int(ptr)`` host read; needs K % B == 0."""

    def __init__(self, start: torch.Tensor):
        from moco_fast.reference import reference_enqueue

        self._enqueue = reference_enqueue
        self.queue_t = start.T.contiguous()  # (d, K), as registered by the official code
        self.ptr = torch.zeros(1, dtype=torch.long, device=start.device)

    def enqueue(self, keys: torch.Tensor) -> None:
        self._enqueue(self.queue_t, self.ptr, keys)

    def contents(self) -> torch.Tensor:
        return self.queue_t.T


# ------------------------------------------------------------------------------------------------
# Formatting
# ------------------------------------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
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


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: ``columns`` are (header, key) pairs; values are printed with str()."""
    cells = [[str(row.get(key, "")) for _, key in columns] for row in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (h, _) in enumerate(columns)]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(columns, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip() for cell in cells]
    return "\n".join(lines)
