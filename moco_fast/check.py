"""``python -m moco_fast.check``: is moco_fast correct, and how fast, on this machine?

    python -m moco_fast.check                 # environment, correctness, speed (large sizes too)
    python -m moco_fast.check --quick         # the same without the large sizes (B=4096)
    python -m moco_fast.check --out DIR       # also DIR/check_<date>.jsonl, one JSON record per result
    python -m moco_fast.check --sections correctness --backends torch --ops info_nce --seed 3

Three sections, printed as they run:

1. **environment**: Python, torch, triton, numpy, CUDA and driver versions, the GPU (name, SMs,
   compute capability), the fp32 matmul precision in force, and every backend: runnable here or
   the exact reason it is not ("built, no CUDA device" for a built extension on a machine without a GPU).
2. **correctness**: every op (info_nce forward and backward, the negatives-gradient path too;
   momentum_update and MomentumEncoder.update; KeyQueue.enqueue with wrap-around and its NaN/Inf
   rejection) on every backend that can run here, in fp32/bf16/fp16 and mixes (fp32 q with a bf16
   queue, ...), at small odd sizes (B = 1, 37; K = 0, 1, 1000; d = 16, 96, 128), against float64
   math (``moco_fast.reference`` run on float64 copies of the same inputs). Random inputs (``--seed``
   reproduces a run). A PASS/FAIL table with the largest measured error and the tolerance: fp32
   1e-5 (IEEE dots), 2e-3 (fp32 dots on CUDA under TF32), 1e-2 when a bf16/fp16 operand or
   storage is involved. NaN/Inf never passes; a raised exception is a FAIL.
3. **speed** (median after warm-up; CUDA events on a GPU): InfoNCE fwd+bwd at B = 256 and 4096
   (``--quick``: 256), K = 65536, d = 128, bf16 and fp32; the momentum update of ResNet-50's
   parameter set (161 tensors, 25.6 M fp32 values) with the single flat ``lerp_`` as the speed of
   light; the enqueue of 256 keys. Achieved TFLOP/s or GB/s and, on a GPU of
   ``moco_fast.benchmarking.KNOWN_GPUS``, the fraction of the datasheet floor (docs/design.md, "Floors").
   Each InfoNCE row's loss is compared with the reference row's (a mismatch is a FAIL too).

Errors are relative, in float64: ‖got − ref‖₂ / ‖scale‖₂. For the elementwise ops (momentum,
enqueue) scale = ref and the largest elementwise error relative to max|ref| must pass too. For
InfoNCE, whose outputs are differences of larger terms (loss = lse − pos, dq ∝ O − k, dk ∝ p₀ − 1),
scale is the size of those terms (|lse| + |pos|, |O| + |k|, (p₀ + 1)·|q|), so that the exact
cancellation of a dominant positive is not mistaken for an error; rank must lie between the counts
of negatives above the positive by more than ± the tolerance times the logits' size.

On a CPU machine the "torch" and "reference" backends run, and the Triton kernels too, in the
interpreter at tiny sizes, when ``TRITON_INTERPRET=1`` is set in the environment; it says plainly
that there is no GPU. Needs torch, triton and numpy only. Exit status: 0 when every check passed,
1 when one failed, 130 when interrupted (what was measured is in the JSONL file).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import backends, reference
from . import benchmarking as mb
from .numerics import fp32_matmul_precision

SECTIONS = ("environment", "correctness", "speed")
OPS = ("info_nce", "momentum", "queue")
TEMPERATURE = 0.07
HALF = (torch.bfloat16, torch.float16)
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16

# InfoNCE sizes and dtype mixes (q, k, negatives).
BATCHES, KEYS, DIMS = (1, 37), (0, 1, 1000), (16, 96, 128)
FULL_GRID = list(itertools.product(BATCHES, KEYS, DIMS))
# Every B, K and d value at least once (compiled Triton pays a JIT compile per new shape class).
COVER_GRID = [(1, 0, 16), (37, 1, 96), (37, 1000, 128), (1, 1000, 96)]
TINY_GRID = [(1, 1, 16), (37, 0, 128), (37, 100, 16)]  # the Triton interpreter (slow: numpy)
MIXES = [
    (FP32, FP32, FP32),
    (BF16, BF16, BF16),
    (FP16, FP16, FP16),
    (FP32, FP32, BF16),
    (FP32, FP32, FP16),
    (BF16, BF16, FP32),
    (BF16, FP32, FP16),
]
TINY_MIXES = [(FP32, FP32, FP32), (BF16, BF16, BF16), (FP32, FP32, BF16)]

# Momentum: tensors of odd shapes (the last one a transposed, non-contiguous view); momenta.
MOMENTUM_SHAPES = [(1,), (37,), (16, 96), (3, 5, 7), (1000, 16), (96, 37)]
MOMENTA = (0.6, 0.999)
MOMENTUM_DTYPES = {"fp32": [FP32], "bf16": [BF16], "fp16": [FP16], "fp32+bf16+fp16": [FP32, BF16, FP16]}

# Queue: (size K, batch B, dim d) — 50/37 wraps around on the second batch; (queue, keys) dtypes.
QUEUE_GEOMETRIES = [(1, 1, 16), (50, 37, 96), (1000, 37, 128)]
QUEUE_DTYPES = [(FP32, FP32), (BF16, BF16), (FP16, FP16), (BF16, FP32), (FP32, BF16)]
TINY_QUEUE_DTYPES = [(FP32, FP32), (BF16, FP32)]


def dtypes_label(dtypes: Sequence[torch.dtype], names: Sequence[str]) -> str:
    if len(set(dtypes)) == 1:
        return SHORT[dtypes[0]]
    return " ".join(f"{n}={SHORT[t]}" for n, t in zip(names, dtypes))


# ------------------------------------------------------------------------------------------------
# Output: printed tables and a JSON Lines file written as it goes
# ------------------------------------------------------------------------------------------------


class Recorder:
    """Appends one JSON object per line to ``DIR/check_<date>.jsonl`` (flushed at once) when ``out`` is set."""

    def __init__(self, out: str | None):
        self.path = None
        self._file = None
        if out:
            os.makedirs(out, exist_ok=True)
            stamp = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
            self.path = os.path.join(out, f"check_{stamp}.jsonl")
            self._file = open(self.path, "w")  # noqa: SIM115 - kept open for the whole run

    def write(self, kind: str, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({"kind": kind, **record}, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def say(text: str = "") -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------
# 1. Environment
# ------------------------------------------------------------------------------------------------


@dataclass
class Backend:
    """A concrete backend as the check sees it: runnable here (reason None) or why not."""

    name: str
    reason: str | None
    interpreted: bool = False

    @property
    def label(self) -> str:
        return f"{self.name} (interpreter)" if self.interpreted else self.name


def backend_states(device: torch.device) -> list[Backend]:
    """Every concrete backend, runnable on ``device`` or with the reason it is not."""
    states = []
    for name, reason in backends.availability().items():
        interpreted = False
        if reason is None and name == "cuda" and device.type != "cuda":
            reason = "built, no CUDA device" if torch.cuda.is_available() is False else "built; checking on the CPU"
        if reason is None and name == "triton":
            interpreted = bool(getattr(backends.module("triton"), "INTERPRETED", False))
            if device.type != "cuda" and not interpreted:
                reason = (
                    "importable, no CUDA device (set TRITON_INTERPRET=1 before starting Python "
                    "to run its kernels in the interpreter)"
                )
            elif device.type == "cuda" and interpreted:
                reason = "TRITON_INTERPRET=1 is set on a machine with a GPU: unset it to check the compiled kernels"
        states.append(Backend(name, reason, interpreted))
    return states


def environment(device: torch.device) -> dict[str, Any]:
    info = mb.machine_info(device)
    info["cuda_available"] = torch.cuda.is_available()
    info["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if torch.cuda.is_available():
        try:
            info["driver_cuda_version"] = torch._C._cuda_getDriverVersion()
        except Exception:  # noqa: BLE001 - a private API; the driver string is in info["driver"]
            pass
    info["platform"] = platform.platform()
    info["backends"] = {
        b.name: ("ok" + (" (interpreter)" if b.interpreted else "")) if b.reason is None else b.reason
        for b in backend_states(device)
    }
    if device.type == "cuda":
        floors = mb.gpu_floors(info.get("gpu"))
        info["floors"] = None if floors is None else floors.__dict__
    return info


def print_environment(info: dict[str, Any]) -> None:
    say("== environment")
    say(
        f"python {info['python']}  torch {info['torch']} (CUDA {info['torch_cuda']})  triton {info['triton']}  "
        f"numpy {info['numpy']}  moco_fast {info['moco_fast']} {info['git_commit'] or ''}".rstrip()
    )
    say(f"CPU: {info['cpu']}, {info['cpu_count']} cores, torch threads {info['torch_threads']}")
    if info["device"].startswith("cuda"):
        say(
            f"GPU: {info['gpu']}, {info['gpu_sm_count']} SMs, compute capability {info['gpu_capability']}, "
            f"{info['gpu_memory_gib']} GiB; driver {info.get('driver') or '?'}"
        )
        floors = info.get("floors")
        if floors:
            say(
                f"floors ({floors['label']} datasheet): {floors['bf16_tflops']:.0f} TFLOP/s bf16 dense, "
                f"{floors['memory_tbps']} TB/s"
            )
        else:
            say("floors: this GPU is not in moco_fast.benchmarking.KNOWN_GPUS: achieved figures only")
    else:
        say(
            "GPU: none — torch.cuda.is_available() is False: checking on the CPU "
            "(no GPU kernel is compiled or timed here)"
        )
    say(
        f"fp32 matmul precision: {info['float32_matmul_precision']}"
        f"  TRITON_INTERPRET={info['triton_interpret'] or 'unset'}"
    )
    for name, state in info["backends"].items():
        say(f"  backend {name:9s} {state}")
    say()


# ------------------------------------------------------------------------------------------------
# 2. Correctness
# ------------------------------------------------------------------------------------------------


def tolerance(dtypes: Iterable[torch.dtype], device: torch.device, matmul: bool = True) -> float:
    """1e-2 with a bf16/fp16 operand; 2e-3 for fp32 dots on CUDA under TF32; 1e-5 otherwise (fp32 IEEE)."""
    if any(dt in HALF for dt in dtypes):
        return 1e-2
    if matmul and device.type == "cuda" and fp32_matmul_precision() == "tf32":
        return 2e-3
    return 1e-5


def rel_error(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """‖got − ref‖₂ / ‖scale‖₂ (scale defaults to ref) in float64; inf for NaN/Inf or a shape mismatch.

    When the scale is 0 (e.g. K = 0, where the loss and dq are exactly 0) the absolute ‖got − ref‖₂.
    """
    got = got.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    diff = float((got - ref).norm())
    den = float((ref if scale is None else scale.detach().to("cpu", torch.float64)).norm())
    return diff / den if den > 0 else diff


def elementwise_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max(‖got − ref‖₂ / ‖ref‖₂, max|got − ref| / max|ref|): a single wrong element cannot hide."""
    err = rel_error(got, ref)
    if not math.isfinite(err) or ref.numel() == 0:
        return err
    diff = (got.detach().to("cpu", torch.float64) - ref.detach().to("cpu", torch.float64)).abs().max()
    top = float(ref.detach().abs().max())
    return max(err, float(diff) / top if top > 0 else float(diff))


@dataclass
class Outcome:
    """One correctness case: metrics name -> (error, tolerance); PASS iff every error is finite and ≤ its tolerance."""

    op: str
    backend: str
    dtypes: str
    case: str
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)
    error: str | None = None

    @property
    def passed(self) -> bool:
        if self.error is not None or not self.metrics:
            return False
        return all(math.isfinite(e) and e <= t for e, t in self.metrics.values())

    def worst(self) -> tuple[str, float, float]:
        """(metric, error, tolerance) with the largest error/tolerance among the float metrics (tol > 0)."""
        floats = [(name, e, t) for name, (e, t) in self.metrics.items() if t > 0]
        if not floats:
            return ("-", 0.0, 0.0)
        return max(floats, key=lambda m: math.inf if not math.isfinite(m[1]) else m[1] / m[2])

    def failures(self) -> str:
        if self.error is not None:
            return self.error
        return ", ".join(f"{n} {e:.2e} > {t:g}" for n, (e, t) in self.metrics.items() if not (e <= t))

    def record(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "backend": self.backend,
            "dtypes": self.dtypes,
            "case": self.case,
            "status": "PASS" if self.passed else "FAIL",
            "metrics": {n: {"error": e, "tolerance": t} for n, (e, t) in self.metrics.items()},
            "error": self.error,
        }


def _run_case(outcome: Outcome, fn: Callable[[Outcome], None]) -> Outcome:
    try:
        fn(outcome)
    except Exception as exc:  # noqa: BLE001 - any exception on a valid input is a FAIL, reported
        outcome.error = _error(exc, 300)
    return outcome


# ---------------------------------------------------------------------------------------- InfoNCE


def _unit(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=1)


def info_nce_oracle(q, k, n, g, temperature, need_dn):
    """float64 loss, lse, logits, dq, dk, dn (or None) and the error scales, from the (rounded) inputs."""
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    n64 = n.detach().double().requires_grad_(need_dn)
    logits = reference.info_nce_logits(q64, k64, n64, temperature)  # (B, 1 + K)
    loss, _, _ = reference.reference_info_nce(q64, k64, n64, temperature, reduction="none")
    wanted = [q64, k64] + ([n64] if need_dn else [])
    grads = torch.autograd.grad((loss * g.double()).sum(), wanted)
    with torch.no_grad():
        logits = logits.detach()
        lse = torch.logsumexp(logits, dim=1)
        prob = torch.softmax(logits, dim=1)
        pos = logits[:, 0]
        s, gs = 1.0 / temperature, g.double()[:, None] / temperature
        out = prob[:, :1] * k64 + prob[:, 1:] @ n64  # O = Σ_j p_j x_j over x = [k_i, n_0, …]
        scales = {
            "loss": lse.abs() + pos.abs(),
            "lse": lse.abs() + logits.abs().amax(dim=1),
            "dq": gs * (out.abs() + k64.abs()),
            "dk": gs * (prob[:, :1] + 1.0) * q64.abs(),
            "dn": s * prob[:, 1:].T @ (g.double()[:, None] * q64.abs()),
        }
    return {
        "loss": loss.detach(),
        "lse": lse,
        "logits": logits,
        "dq": grads[0],
        "dk": grads[1],
        "dn": grads[2] if need_dn else None,
        "scales": scales,
    }


def rank_rows_off(rank: torch.Tensor, logits: torch.Tensor, tol: float) -> int:
    """Rows whose rank lies outside [#negatives above pos + margin, #negatives above pos − margin]."""
    pos = logits[:, :1]
    margin = tol * (pos.abs() + logits.abs().amax(dim=1, keepdim=True))
    lo = (logits[:, 1:] > pos + margin).sum(dim=1)
    hi = (logits[:, 1:] > pos - margin).sum(dim=1)
    rank = rank.detach().to("cpu", torch.int64)
    if rank.shape != lo.shape:
        return int(lo.numel()) or 1
    return int(((rank < lo) | (rank > hi)).sum())


@functools.lru_cache(maxsize=512)
def _info_nce_inputs(dtypes, shape, with_dn: bool, seed: int):
    """CPU inputs in their dtypes, the weights g and the float64 oracle: shared by every backend's case."""
    batch, keys, dim = shape
    gen = torch.Generator().manual_seed(seed)
    q, k, n = (_unit(rows, dim, gen).to(dt) for rows, dt in zip((batch, batch, keys), dtypes))
    g = (0.5 + torch.rand(batch, generator=gen)) / batch  # positive weights, like a mean's
    return q, k, n, g, info_nce_oracle(q, k, n, g, TEMPERATURE, with_dn)


def check_info_nce(o: Outcome, backend: str, device, dtypes, shape, with_dn: bool, seed: int) -> None:
    import moco_fast

    q, k, n, g, ref = _info_nce_inputs(dtypes, shape, with_dn, seed)
    q, k, n = q.to(device), k.to(device), n.to(device)
    tol = tolerance(dtypes, device)
    sc = ref["scales"]

    # The training path: per-row losses, backward with weights g (no stats: the fastest kernels).
    qg, kg = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    ng = n.clone().requires_grad_(with_dn)
    loss = moco_fast.info_nce(qg, kg, ng, TEMPERATURE, reduction="none", backend=backend)
    grads = torch.autograd.grad((loss * g.to(device)).sum(), [qg, kg] + ([ng] if with_dn else []))
    suffix = " (dn path)" if with_dn else ""
    o.metrics["loss" + suffix] = (rel_error(loss, ref["loss"], sc["loss"]), tol)
    o.metrics["dq" + suffix] = (rel_error(grads[0], ref["dq"], sc["dq"]), tol)
    o.metrics["dk" + suffix] = (rel_error(grads[1], ref["dk"], sc["dk"]), tol)
    if with_dn:
        o.metrics["dn"] = (rel_error(grads[2], ref["dn"], sc["dn"]), tol)
        return
    # The logging path: mean loss with stats (rank counted: another kernel variant on some backends).
    mean, stats = moco_fast.info_nce(q, k, n, TEMPERATURE, backend=backend, return_stats=True)
    o.metrics["loss (mean, stats)"] = (rel_error(mean, ref["loss"].mean(), sc["loss"].mean()), tol)
    o.metrics["lse"] = (rel_error(stats.lse, ref["lse"], sc["lse"]), tol)
    o.metrics["rank rows off"] = (float(rank_rows_off(stats.rank, ref["logits"], tol)), 0.0)


def info_nce_cases(b: Backend, device) -> list[tuple[tuple, tuple, bool]]:
    """(dtypes, shape, negatives-gradient path?) to run on backend ``b``."""
    if b.interpreted:
        grid = {mix: TINY_GRID for mix in TINY_MIXES}
    elif b.name == "reference":  # the oracle's twin (naive PyTorch): the covering shapes are enough
        grid = {mix: COVER_GRID for mix in MIXES}
    else:  # the full B x K x d grid for fp32 and bf16; every B, K and d value for the other mixes
        grid = {mix: (FULL_GRID if i < 2 else COVER_GRID) for i, mix in enumerate(MIXES)}
    cases = []
    for mix, shapes in grid.items():
        for shape in shapes:
            cases.append((mix, shape, False))
        dn_shapes = [s for s in shapes if s[1] > 0]
        if b.interpreted or b.name == "triton":
            dn_shapes = dn_shapes[-1:]  # the recomputing column pass: one shape per mix is enough there
        for shape in dn_shapes:
            cases.append((mix, shape, True))
    return cases


# ---------------------------------------------------------------------------------------- momentum


def _momentum_tensors(dtypes: Sequence[torch.dtype], device, gen, strided_last: bool = True):
    """(targets, sources): random tensors of MOMENTUM_SHAPES, dtypes cycled; the last target a non-contiguous
    view when ``strided_last`` (for backends whose declared support takes strided tensors)."""
    targets, sources = [], []
    for i, shape in enumerate(MOMENTUM_SHAPES):
        dt = dtypes[i % len(dtypes)]
        t = torch.randn(shape, generator=gen)
        if strided_last and i == len(MOMENTUM_SHAPES) - 1:
            t = torch.randn(tuple(reversed(shape)), generator=gen).to(device, dt).t()  # a view, not contiguous
        else:
            t = t.to(device, dt)
        targets.append(t)
        sources.append(torch.randn(shape, generator=gen).to(device, dt))
    return targets, sources


def _group_errors(o: Outcome, got, ref, device, prefix: str = "") -> None:
    """One metric per storage dtype: the elementwise error of the concatenated tensors of that dtype."""
    for dt in sorted({t.dtype for t in got}, key=str):
        g = torch.cat([t.detach().double().reshape(-1).cpu() for t in got if t.dtype == dt])
        r = torch.cat([r.reshape(-1) for t, r in zip(got, ref) if t.dtype == dt])
        o.metrics[f"{prefix}{SHORT[dt]}"] = (elementwise_error(g, r), tolerance([dt], device, matmul=False))


def check_momentum_list(o: Outcome, backend: str, device, dtypes, momentum: float, seed: int) -> None:
    import moco_fast

    declared = backends.support(backend, "momentum_update")
    strided = declared is not None and not declared.contiguous  # kernels take contiguous lists (their Support)
    targets, sources = _momentum_tensors(dtypes, device, torch.Generator().manual_seed(seed), strided)
    t64 = [t.double().cpu() for t in targets]
    s64 = [s.double().cpu() for s in sources]
    moco_fast.momentum_update(targets, sources, momentum, backend=backend)
    ref = [t + (1.0 - momentum) * (s - t) for t, s in zip(t64, s64)]
    _group_errors(o, targets, ref, device)
    changed = any(not torch.equal(s.double().cpu(), s0) for s, s0 in zip(sources, s64))
    o.metrics["sources untouched"] = (float(changed), 0.0)


def check_momentum_encoder(o: Outcome, backend: str, device, dtype, momentum: float, seed: int) -> None:
    import moco_fast

    torch.manual_seed(seed)
    online = torch.nn.Sequential(torch.nn.Linear(16, 96), torch.nn.BatchNorm1d(96), torch.nn.Linear(96, 37))
    online = online.to(device, dtype)
    enc = moco_fast.MomentumEncoder(online, momentum=momentum, backend=backend)
    with torch.no_grad():  # the online model moves on after the copy: the update has work to do
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.detach().double().cpu() for p in enc.module.parameters()]
    src = [p.detach().double().cpu() for p in online.parameters()]
    buffers = [b.detach().clone() for b in enc.module.buffers()]
    used = enc.update()
    ref = [t + (1.0 - momentum) * (s - t) for t, s in zip(before, src)]
    _group_errors(o, list(enc.module.parameters()), ref, device, prefix="params ")
    o.metrics["online untouched"] = (
        float(any(not torch.equal(p.double().cpu(), s) for p, s in zip(online.parameters(), src))),
        0.0,
    )
    o.metrics["buffers untouched"] = (
        float(any(not torch.equal(a, b) for a, b in zip(enc.module.buffers(), buffers))),
        0.0,
    )
    o.metrics["momentum returned"] = (float(used != momentum), 0.0)


# ---------------------------------------------------------------------------------------- queue


def check_enqueue(o: Outcome, backend: str, device, dtypes, geometry, normalize: bool, seed: int) -> None:
    """Three batches (wrapping around when B does not divide K) against a float64 ring buffer."""
    import moco_fast

    qdt, kdt = dtypes
    size, batch, dim = geometry
    gen = torch.Generator().manual_seed(seed)
    queue = moco_fast.KeyQueue(
        size, dim, dtype=qdt, gather_distributed=False, normalize=normalize, device=device, backend=backend
    )
    ref = torch.zeros(size, dim, dtype=torch.float64)
    ptr = count = 0
    for _ in range(3):
        keys = (3.0 * torch.randn(batch, dim, generator=gen)).to(device, kdt)  # not unit: normalize matters
        queue.enqueue(keys)
        k64 = keys.double().cpu()
        if normalize:
            k64 = k64 / k64.norm(dim=1, keepdim=True)
        ref[(ptr + torch.arange(batch)) % size] = k64
        ptr, count = (ptr + batch) % size, min(count + batch, size)
    o.metrics["keys"] = (elementwise_error(queue.keys, ref), tolerance([qdt], device, matmul=False))
    state = (int(queue.ptr.item()), int(queue.count.item()), tuple(queue.negatives().shape))
    o.metrics["ptr, count, negatives()"] = (float(state != (ptr, count, (count, dim))), 0.0)


def check_enqueue_nonfinite(o: Outcome, backend: str, device, dtype, seed: int) -> None:
    """A batch with NaN or Inf: "raise" raises NonFiniteKeysError, "skip" counts it; the queue stays as it was."""
    import moco_fast

    size, batch, dim = 50, 37, 96
    gen = torch.Generator().manual_seed(seed)
    for mode in ("raise", "skip"):
        queue = moco_fast.KeyQueue(
            size, dim, dtype=dtype, gather_distributed=False, on_nonfinite=mode, device=device, backend=backend
        )
        queue.enqueue(torch.randn(batch, dim, generator=gen).to(device, dtype))
        for bad_value in (math.nan, math.inf):
            before = [b.detach().clone() for b in (queue.keys, queue.ptr, queue.count)]
            bad = torch.randn(batch, dim, generator=gen)
            bad[int(torch.randint(batch, (1,), generator=gen)), int(torch.randint(dim, (1,), generator=gen))] = (
                bad_value
            )
            raised = False
            try:
                queue.enqueue(bad.to(device, dtype))
            except moco_fast.NonFiniteKeysError:
                raised = True
            same = all(torch.equal(a, b) for a, b in zip(before, (queue.keys, queue.ptr, queue.count)))
            label = f"{mode} {bad_value}"
            o.metrics[f"{label}: {'raised' if mode == 'raise' else 'no raise'}"] = (
                float(raised != (mode == "raise")),
                0.0,
            )
            o.metrics[f"{label}: queue unchanged"] = (float(not same), 0.0)
        if mode == "skip":
            o.metrics["skip: num_skipped == 2"] = (float(int(queue.num_skipped.item()) != 2), 0.0)


# ---------------------------------------------------------------------------------------- driver


def correctness_plan(b: Backend, device, ops: Sequence[str], seed: int) -> list[tuple[Outcome, Callable]]:
    """Every (Outcome, fn) pair to run for backend ``b``; fn(outcome) fills the outcome's metrics."""
    plan: list[tuple[Outcome, Callable]] = []

    def add(op, dtypes, case, fn, *args):
        case_seed = zlib.crc32(f"{seed} {op} {dtypes} {case}".encode())  # the same inputs on every backend
        plan.append((Outcome(op, b.label, dtypes, case), lambda o: fn(o, b.name, device, *args, case_seed)))

    if "info_nce" in ops:
        for mix, shape, with_dn in info_nce_cases(b, device):
            case = f"B={shape[0]} K={shape[1]} d={shape[2]}" + (" negatives.requires_grad" if with_dn else "")
            add("info_nce", dtypes_label(mix, ("q", "k", "n")), case, check_info_nce, mix, shape, with_dn)
    if b.name == "reference":
        return plan  # momentum and enqueue have no reference kernel: backend="reference" runs "torch"
    if "momentum" in ops:
        for label, dts in MOMENTUM_DTYPES.items():
            if b.interpreted and label == "fp16":
                continue
            for m in MOMENTA:
                add("momentum_update", label, f"{len(MOMENTUM_SHAPES)} tensors m={m}", check_momentum_list, dts, m)
        for dt in (FP32, BF16):
            add("MomentumEncoder.update", SHORT[dt], "Linear-BN-Linear m=0.6", check_momentum_encoder, dt, 0.6)
    if "queue" in ops:
        dtypes_list = TINY_QUEUE_DTYPES if b.interpreted else QUEUE_DTYPES
        geometries = QUEUE_GEOMETRIES[:2] if b.interpreted else QUEUE_GEOMETRIES
        for (qdt, kdt), geometry, normalize in itertools.product(dtypes_list, geometries, (False, True)):
            case = f"K={geometry[0]} B={geometry[1]} d={geometry[2]} x3" + (" normalize" if normalize else "")
            label = dtypes_label((qdt, kdt), ("queue", "keys"))
            add("KeyQueue.enqueue", label, case, check_enqueue, (qdt, kdt), geometry, normalize)
        for dt in (FP32, BF16) if not b.interpreted else (FP32,):
            add("KeyQueue.enqueue", SHORT[dt], "NaN/Inf batch (raise, skip)", check_enqueue_nonfinite, dt)
    return plan


def run_correctness(states: list[Backend], device, ops, seed: int, rec: Recorder) -> list[Outcome]:
    say(f"== correctness (float64 reference, seed {seed})")
    outcomes: list[Outcome] = []
    for b in states:
        if b.reason is not None:
            continue
        t0 = time.perf_counter()
        plan = correctness_plan(b, device, ops, seed)
        for outcome, fn in plan:
            _run_case(outcome, fn)
            rec.write("correctness", outcome.record())
            outcomes.append(outcome)
        done = [o for o in outcomes if o.backend == b.label]
        failed = sum(not o.passed for o in done)
        say(f"  {b.label}: {len(done)} cases, {failed} failed ({time.perf_counter() - t0:.1f} s)")
    say()
    print_correctness(outcomes)
    return outcomes


def print_correctness(outcomes: list[Outcome]) -> None:
    groups: dict[tuple[str, str, str], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.op, o.backend, o.dtypes), []).append(o)
    rows = []
    for (op, backend, dtypes), items in groups.items():
        worst = max(
            (o.worst() for o in items),
            key=lambda w: math.inf if not math.isfinite(w[1]) else (w[1] / w[2] if w[2] else 0),
        )
        failed = sum(not o.passed for o in items)
        rows.append(
            {
                "op": op,
                "backend": backend,
                "dtypes": dtypes,
                "cases": len(items),
                "err": mb.fmt_err(worst[1]) if worst[2] else "-",
                "tol": f"{worst[2]:g}" if worst[2] else "-",
                "metric": worst[0],
                "result": "PASS" if not failed else f"FAIL {failed}/{len(items)}",
            }
        )
    cols = [
        ("op", "op"),
        ("backend", "backend"),
        ("dtypes", "dtypes"),
        ("cases", "cases"),
        ("max rel err", "err"),
        ("tolerance", "tol"),
        ("(worst metric)", "metric"),
        ("result", "result"),
    ]
    say(mb.format_table(rows, cols))
    failures = [o for o in outcomes if not o.passed]
    if failures:
        say(f"\nFAILED ({len(failures)}):")
        for o in failures[:40]:
            say(f"  {o.op} [{o.backend}] {o.dtypes} {o.case}: {o.failures()}")
        if len(failures) > 40:
            say(f"  ... and {len(failures) - 40} more (all in the JSONL file)")
    say()


# ------------------------------------------------------------------------------------------------
# 3. Speed
# ------------------------------------------------------------------------------------------------


@dataclass
class SpeedRow:
    section: str
    row: str
    case: str
    time_s: float | None = None
    rate: float | None = None  # TFLOP/s or GB/s
    unit: str = ""
    floor_s: float | None = None  # the datasheet floor's time, when the GPU is known
    vs: tuple[str, float] | None = None  # (baseline row, speed ratio baseline_time / time)
    status: str = "ok"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        return mb.ratio(self.floor_s, self.time_s)

    def record(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("vs", "extra")}
        out["fraction_of_floor"] = self.fraction
        if self.vs:
            out["baseline"], out["speed_vs_baseline"] = self.vs
        return {**out, **self.extra}


def _timing(device, quick: bool) -> dict[str, Any]:
    if device.type == "cuda":
        return {"warmup": 5, "repeats": 20 if quick else 50, "min_repeats": 5, "budget_s": 0.1 if quick else 0.3}
    return {
        "warmup": 0 if quick else 1,  # every row's check call ran it once already
        "repeats": 5 if quick else 10,
        "min_repeats": 2 if quick else 3,
        "budget_s": 0.3 if quick else 1.0,
    }


def _error(exc: BaseException, limit: int = 160) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()[:limit]


def measure(row: SpeedRow, prepare: Callable[[], Callable[[], Any]], device, timing, work: float, scale: float) -> None:
    """Check, then time one row: ``prepare()`` builds the row, runs its check (setting ``row.status`` on a
    mismatch) and returns the callable to time; rate = work / time / scale. Errors are recorded, not raised."""
    try:
        fn = prepare()
        row.time_s = mb.time_fn(fn, device, **timing)["median_s"]
    except Exception as exc:  # noqa: BLE001 - recorded; the other rows still run
        row.status = f"error: {_error(exc)}"
        return
    row.rate = work / row.time_s / scale if row.time_s else None


def compare_to(rows: list[SpeedRow], baseline: str, label: str) -> None:
    """Each timed row's speed relative to the row named ``baseline`` (its time / the row's time)."""
    base = next((r for r in rows if r.row == baseline and r.time_s), None)
    for r in rows:
        if base and r.time_s:
            r.vs = (label, base.time_s / r.time_s)


def speed_ceilings(device, floors, timing) -> list[SpeedRow]:
    """The GPU's own ceilings: a bf16 8192³ matmul and a 1 GiB device copy (bytes read + written)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    x = torch.rand(2**28, device=device)
    flops, nbytes = 2.0 * n**3, 2.0 * x.numel() * 4
    mm = SpeedRow("ceiling", "bf16 matmul (torch)", f"{n}x{n}x{n}", unit="TFLOP/s")
    mm.floor_s = flops / (floors.bf16_tflops * 1e12) if floors else None
    measure(mm, lambda: lambda: a @ b, device, timing, flops, 1e12)
    cp = SpeedRow("ceiling", "device copy (clone)", "1 GiB fp32", unit="GB/s")
    cp.floor_s = nbytes / (floors.memory_tbps * 1e12) if floors else None
    measure(cp, lambda: x.clone, device, timing, nbytes, 1e9)
    return [mm, cp]


def _info_nce_step(name: str, row: SpeedRow, inputs, ref_loss: list[float], dtype, device) -> Callable[[], None]:
    """Check one InfoNCE speed row (its loss against the reference row's, on the same inputs) and return
    the timed step: fwd+bwd (dq, dk) of ``info_nce`` on the next input set."""
    import moco_fast

    cycle = itertools.cycle(inputs)

    def step():
        q, k, n = next(cycle)
        loss = moco_fast.info_nce(q, k, n, TEMPERATURE, backend=name)
        torch.autograd.grad(loss, (q, k))

    q, k, n = inputs[0]
    loss = float(moco_fast.info_nce(q, k, n, TEMPERATURE, backend=name).detach())
    row.extra["loss"] = loss
    if name == "reference":
        ref_loss.append(loss)
    elif ref_loss:  # the reference's fp32 logits on the same inputs: a check at this size
        err, tol = abs(loss - ref_loss[0]) / abs(ref_loss[0]), tolerance([dtype], device)
        row.extra["loss_rel_vs_reference"] = err
        if not err <= tol:
            row.status = f"FAIL: loss {loss:.6g} vs reference {ref_loss[0]:.6g} (rel {err:.1e} > {tol:g})"
    if device.type == "cuda":
        row.extra["peak_extra_bytes"] = mb.cuda_peak_extra(step, device)[0]
    return step


def speed_info_nce(states, device, floors, timing, quick: bool) -> list[SpeedRow]:
    all_rows: list[SpeedRow] = []
    keys, dim = 65536, 128
    names = [b.name for b in states if b.reason is None and not b.interpreted]
    names = [n for n in ("reference", "cuda", "triton", "torch") if n in names]  # the baseline first
    for dtype, batch in itertools.product((BF16, FP32), (256,) if quick else (256, 4096)):
        elem = torch.empty((), dtype=dtype).element_size()
        gen = torch.Generator().manual_seed(batch)
        inputs = []
        for _ in range(mb.cache_rotation(keys * dim * elem, device)):  # on a GPU: more input than L2
            q, k, n = (_unit(r, dim, gen).to(device, dtype) for r in (batch, batch, keys))
            inputs.append((q.requires_grad_(True), k.requires_grad_(True), n))
        flops = 4.0 * batch * keys * dim
        nbytes = elem * (keys * dim + 3 * batch * dim)
        floor_s = None
        if floors:
            rate = floors.matmul_tflops(dtype, fp32_matmul_precision()) * 1e12
            floor_s = max(flops / rate, nbytes / (floors.memory_tbps * 1e12))
        case = f"B={batch} K={keys} d={dim} {SHORT[dtype]}"
        logits_bytes = 4 * 4 * batch * (keys + 1)  # the reference's ~4 fp32 copies of the logits
        rows: list[SpeedRow] = []
        ref_loss: list[float] = []
        for name in names:
            row = SpeedRow("info_nce fwd+bwd", f"info_nce[{name}]", case, unit="TFLOP/s", floor_s=floor_s)
            rows.append(row)
            if name == "reference" and logits_bytes > 0.5 * mb.available_memory_bytes(device):
                row.status = f"skipped: needs {logits_bytes / 2**30:.1f} GiB"
                continue
            prepare = functools.partial(_info_nce_step, name, row, inputs, ref_loss, dtype, device)
            measure(row, prepare, device, timing, flops, 1e12)
        compare_to(rows, "info_nce[reference]", "reference")
        all_rows += rows
        del inputs
    return all_rows


def speed_momentum(states, device, floors, timing) -> list[SpeedRow]:
    online = mb.parameter_set("resnet50", device=device, seed=0)
    target0 = mb.perturbed_copy(online)
    numel = sum(p.numel() for p in online.parameters())
    nbytes = 12.0 * numel  # fp32: read target and source, write target
    case = f"resnet50 fp32 ({len(list(online.parameters()))} tensors, {numel / 1e6:.1f} M)"
    floor_s = nbytes / (floors.memory_tbps * 1e12) if floors else None
    specs = [("official loop", "official", None), ("flat lerp_", "flat_lerp", None)]
    for b in states:
        if b.reason is None and not b.interpreted and b.name != "reference":
            specs += [
                (f"momentum_update[{b.name}]", "list", b.name),
                (f"MomentumEncoder.update[{b.name}]", "encoder", b.name),
            ]
    rows: list[SpeedRow] = []
    expected: list[torch.Tensor] = []
    for label, kind, backend in specs:
        row = SpeedRow("momentum", label, case, unit="GB/s", floor_s=floor_s)
        rows.append(row)

        def prepare(kind=kind, backend=backend, row=row):
            update, read = mb.momentum_updater(kind, backend, online, target0, 0.999)
            update()  # one step from target0, compared with the official loop's (the first row)
            mb.synchronize(device)
            got = mb.flat_values(read())
            if not expected:  # the first row (the official code) is the baseline
                expected.append(got)
            err = float((got - expected[0]).abs().max())
            row.extra["max_abs_err_vs_official"] = err
            if not err <= 1e-6:
                row.status = f"FAIL: max |err| vs official {err:.1e} > 1e-6"
            return update

        measure(row, prepare, device, timing, nbytes, 1e9)
    compare_to(rows, "flat lerp_", "flat lerp_")
    return rows


def speed_enqueue(states, device, floors, timing) -> list[SpeedRow]:
    import moco_fast

    size, batch, dim = 65536, 256, 128
    gen = torch.Generator().manual_seed(5)
    start = F.normalize(torch.randn(size, dim, generator=gen), dim=1).to(device)
    keys = [F.normalize(torch.randn(batch, dim, generator=gen), dim=1).to(device) for _ in range(4)]
    nbytes = 2.0 * batch * dim * 4
    case = f"B={batch} into K={size} d={dim} fp32"
    official = "official queue[:, ptr:ptr+B] = keys.T"
    specs = [(official, None)]
    specs += [
        (f"KeyQueue.enqueue[{b.name}]", b.name)
        for b in states
        if b.reason is None and not b.interpreted and b.name != "reference"
    ]
    rows: list[SpeedRow] = []
    expected: list[torch.Tensor] = []
    for label, backend in specs:
        row = SpeedRow("enqueue", label, case, unit="GB/s")  # launch-bound: no floor
        rows.append(row)

        def prepare(backend=backend, row=row):
            if backend is None:
                impl = mb.OfficialQueue(start)
                enqueue, contents = impl.enqueue, impl.contents
            else:
                queue = moco_fast.KeyQueue(
                    size, dim, gather_distributed=False, init="random", device=device, backend=backend
                )
                with torch.no_grad():
                    queue.keys.copy_(start)
                enqueue, contents = queue.enqueue, lambda: queue.keys
            for kb in keys[:2]:
                enqueue(kb)
            got = contents()[: 2 * batch].clone()
            if not expected:  # the first row (the official code) is the baseline
                expected.append(got)
            if not torch.equal(got, expected[0]):
                row.status = "FAIL: queue contents differ from the official enqueue's"
            cycle = itertools.cycle(keys)
            return lambda: enqueue(next(cycle))

        measure(row, prepare, device, timing, nbytes, 1e9)
    compare_to(rows, official, "official")
    return rows


def run_speed(states, device, quick: bool, rec: Recorder, ops: Sequence[str]) -> list[SpeedRow]:
    floors = mb.gpu_floors(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    timing = _timing(device, quick)
    say(
        f"== speed (median of up to {timing['repeats']} calls after {timing['warmup']} warm-up; "
        f"{'CUDA events' if device.type == 'cuda' else 'perf_counter'}"
        f"{'; --quick: no B=4096' if quick else ''})"
    )
    if device.type != "cuda":
        say("   CPU timings: the GPU kernels are not timed here (no GPU)")
    elif floors is None:
        say("   this GPU is not in KNOWN_GPUS: no fraction of the floor")
    sections: list[Callable[[], list[SpeedRow]]] = []
    if device.type == "cuda":
        sections.append(lambda: speed_ceilings(device, floors, timing))
    if "info_nce" in ops:
        sections.append(lambda: speed_info_nce(states, device, floors, timing, quick))
    if "momentum" in ops:
        sections.append(lambda: speed_momentum(states, device, floors, timing))
    if "queue" in ops:
        sections.append(lambda: speed_enqueue(states, device, floors, timing))
    rows: list[SpeedRow] = []
    for section in sections:
        new = section()
        for r in new:
            rec.write("speed", r.record())
        rows += new
        print_speed(new)
    return rows


def print_speed(rows: list[SpeedRow]) -> None:
    table = []
    for r in rows:
        rate = "-" if r.rate is None else f"{r.rate:.3g} {r.unit}"
        table.append(
            {
                "section": r.section,
                "case": r.case,
                "row": r.row,
                "t": mb.fmt_time(r.time_s),
                "rate": rate,
                "floor": "-" if r.fraction is None else f"{100 * r.fraction:.1f}%",
                "vs": "-" if not r.vs else f"{r.vs[1]:.2f}x {r.vs[0]}",
                "status": r.status,
            }
        )
    cols = [
        ("section", "section"),
        ("case", "case"),
        ("row", "row"),
        ("time", "t"),
        ("achieved", "rate"),
        ("of floor", "floor"),
        ("speed vs", "vs"),
        ("check", "status"),
    ]
    say(mb.format_table(table, cols))
    say()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m moco_fast.check",
        description=__doc__.split("\n\n")[0] + " Prints environment, correctness and speed tables.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 all checks passed, 1 a check failed, 130 interrupted.",
    )
    p.add_argument("--quick", action="store_true", help="skip the large speed sizes (B=4096), fewer repeats")
    p.add_argument("--out", metavar="DIR", help="write DIR/check_<date>.jsonl, one JSON record per result, as it goes")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=SECTIONS[1:],
        default=list(SECTIONS[1:]),
        help="what to run after the environment (default: correctness speed)",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        choices=("triton", "cuda", "torch", "reference"),
        help="only these backends (default: every one that can run here)",
    )
    p.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="only these ops (default: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: a fresh one, printed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda asked but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "little")
    rec = Recorder(args.out)
    outcomes: list[Outcome] = []
    speed: list[SpeedRow] = []
    interrupted = False
    try:
        info = environment(device)
        info.update(seed=seed, argv=list(sys.argv[1:] if argv is None else argv))
        rec.write("environment", info)
        print_environment(info)
        states = backend_states(device)
        if args.backends:
            states = [b for b in states if b.name in args.backends]
        if "correctness" in args.sections:
            outcomes = run_correctness(states, device, args.ops, seed, rec)
        if "speed" in args.sections:
            speed = run_speed(states, device, args.quick, rec, args.ops)
    except KeyboardInterrupt:
        interrupted = True
        say("\ninterrupted: the results so far are in the JSONL file")
    failed = sum(not o.passed for o in outcomes) + sum(r.status.startswith(("FAIL", "error")) for r in speed)
    errors = sum(r.status.startswith("error") for r in speed)
    wall = time.perf_counter() - t0
    summary = {
        "correctness_cases": len(outcomes),
        "correctness_failed": sum(not o.passed for o in outcomes),
        "speed_rows": len(speed),
        "speed_failed": sum(r.status.startswith("FAIL") for r in speed),
        "speed_errors": errors,
        "interrupted": interrupted,
        "wall_s": round(wall, 1),
        "result": "FAIL" if failed else ("INTERRUPTED" if interrupted else "PASS"),
    }
    rec.write("summary", summary)
    rec.close()
    say(
        f"== {summary['result']}: {len(outcomes)} correctness cases, {summary['correctness_failed']} failed; "
        f"{len(speed)} speed rows, {summary['speed_failed']} failed their check, {errors} errors; {wall:.0f} s"
    )
    if rec.path:
        say(f"results: {rec.path}")
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
