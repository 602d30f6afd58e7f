#!/usr/bin/env python
"""InfoNCE over a key queue: moco_fast against what users would pick instead.

Every row computes the same MoCo loss (mean over the batch of logsumexp(row) - row[0], row =
[q_i·k_i, q_i·n_0, ..., q_i·n_{K-1}] / T) and its gradient dq on the same inputs, and is checked
against the reference before it is timed:

* ``reference``: the official MoCo formulation (moco_fast.reference: einsum, cat, /T,
  cross_entropy; fp32 logits), autograd backward. The baseline of every ratio.
* ``ref-autocast``: the same under torch.autocast (bf16; fp16 when --dtype fp16). The row says
  which dtype the logits and the loss came out in.
* ``lightly``: lightly's ``NTXentLoss(T, memory_bank_size=(K, d))`` whose bank (a (K, d) fp32
  buffer, returned transposed as (d, K)) is filled with the same negatives. It L2-normalizes its
  inputs (our unit-norm inputs make that a no-op for the loss; its dq is the reference dq with the
  component along q removed, and is compared that way), clones the whole bank on every call and
  enqueues the keys after the forward (a MoCo step's enqueue, included in its time).
* ``sdpa-flash``: PyTorch's fused attention used as an InfoNCE: V = K = negatives, one call
  returns O and the logsumexp; the positive is merged analytically (lse = logaddexp(lse_neg, pos),
  O = w_neg·O_neg + w_pos·k) and dq = g/T·(O - k), as moco_fast's backward. CPU:
  aten._scaled_dot_product_flash_attention_for_cpu; GPU: aten._scaled_dot_product_flash_attention
  (bf16/fp16) or aten._scaled_dot_product_efficient_attention with compute_log_sumexp (fp32), with
  the keys split over the batch dimension so the whole GPU is busy (partials merged by logsumexp).
* ``cce-exact`` (GPU, when cut-cross-entropy is installed): linear_cross_entropy(q/T, negatives,
  impl="cce_exact", reduction="none") gives lse over the queue; the positive is merged with
  logaddexp and autograd runs CCE's backward.
* ``moco_fast[<backend>]``: moco_fast.info_nce for every available backend ("triton" only on CUDA:
  its CPU interpreter is far too slow to time).

Metrics: median fwd+bwd and forward-alone times (perf_counter on the CPU, CUDA events on a GPU),
peak extra memory (CPU: VmHWM of a fresh process per row, first call, above its RSS once the inputs
exist; GPU: max_memory_allocated above the inputs), error vs the reference (|loss diff| and
||dq - dq_ref|| / ||dq_ref||), speedup and memory ratio vs the reference, and achieved TFLOP/s and
GB/s (useful work: 4·B·K·d flops for fwd+bwd — the two B×K×d matmuls q·N^T and P·N, or the
reference's q·N^T and its backward dlogits·N; bytes: read N, q, k once and write dq).

Examples::

    python benchmarks/bench_infonce.py                       # B=256, K=65536, d=128, fp32, CPU
    python benchmarks/bench_infonce.py --json benchmarks/results/cpu_infonce.json --plot
    python benchmarks/bench_infonce.py --sweep --quick --json benchmarks/results/cpu_infonce_sweep.json --plot
    python benchmarks/bench_infonce.py --device cuda --dtype bf16 --sweep --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moco_fast import benchmarking as mb  # noqa: E402

SWEEP_B = (256, 1024, 4096)
SWEEP_K = (4096, 16384, 65536, 262144)
SWEEP_D = (128, 256)
SWEEP_DTYPES = ("fp32", "bf16")
# --sweep --quick: the grid a 2-core CPU can run in minutes.
QUICK_B = (256, 1024)
QUICK_K = (4096, 16384, 65536, 262144)
QUICK_D = (128,)
QUICK_DTYPES = {"cpu": ("fp32",), "cuda": ("bf16",)}

ROW_NAMES = ("reference", "ref-autocast", "lightly", "sdpa-flash", "cce-exact", "moco_fast")
LOGITS_ROWS = ("reference", "ref-autocast", "lightly")  # rows that materialize B×(K+1) logits


@dataclass(frozen=True)
class Case:
    batch: int
    keys: int
    dim: int
    dtype: torch.dtype
    device: torch.device
    temperature: float = 0.07

    @property
    def scale(self) -> float:
        return 1.0 / self.temperature

    def label(self) -> str:
        return f"B={self.batch} K={self.keys} d={self.dim} {common.dtype_name(self.dtype)}"

    def logits_bytes(self) -> int:
        """What the reference needs: about 4 fp32 copies of the B×(K+1) logits."""
        return 4 * 4 * self.batch * (self.keys + 1)

    def flops(self) -> float:
        return 4.0 * self.batch * self.keys * self.dim

    def min_bytes(self) -> float:
        size = torch.empty((), dtype=self.dtype).element_size()
        return float(size * (self.keys * self.dim + 3 * self.batch * self.dim))


def make_inputs(case: Case, seed: int = 0):
    """Unit-norm q, k (B, d) and negatives (K, d) like MoCo's, in case.dtype; q requires grad."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(case.batch, case.dim, generator=gen), dim=1)
    # Positives correlated with the queries, as after some training: the loss is not ~log(K+1).
    k = F.normalize(q + 0.8 * torch.randn(case.batch, case.dim, generator=gen), dim=1)
    negatives = F.normalize(torch.randn(case.keys, case.dim, generator=gen), dim=1)
    q = q.to(case.device, case.dtype).requires_grad_(True)
    k = k.to(case.device, case.dtype)
    negatives = negatives.to(case.device, case.dtype)
    return q, k, negatives


def _autocast_dtype(case: Case) -> torch.dtype:
    return torch.float16 if case.dtype == torch.float16 else torch.bfloat16


def _dq_of(loss: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    (dq,) = torch.autograd.grad(loss, q)
    return dq


# ------------------------------------------------------------------------------------------------
# Rows. Each: available(case) -> reason or None; setup(case, q, k, n) -> state;
# forward(state, q, k, n) -> loss; fwd_bwd(state, q, k, n) -> (loss, dq).
# ------------------------------------------------------------------------------------------------


class Row:
    name = ""
    materializes_logits = False
    low_precision = False  # computes in bf16/fp16 somewhere: looser check

    def __init__(self):
        self.note = ""

    def available(self, case: Case) -> str | None:
        return None

    def setup(self, case: Case, q, k, n):
        return None

    def forward(self, state, q, k, n):
        raise NotImplementedError

    def fwd_bwd(self, state, q, k, n):
        loss = self.forward(state, q, k, n)
        return loss.detach(), _dq_of(loss, q)

    def expected_dq(self, dq_ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return dq_ref


class Reference(Row):
    name = "reference"
    materializes_logits = True

    def setup(self, case, q, k, n):
        from moco_fast.reference import reference_info_nce

        self.note = "official: einsum, cat, /T, cross_entropy (fp32 logits), autograd"
        self.fn = reference_info_nce
        self.temperature = case.temperature

    def forward(self, state, q, k, n):
        return self.fn(q, k, n, self.temperature)[0]


class ReferenceAutocast(Reference):
    name = "ref-autocast"
    low_precision = True

    def available(self, case):
        if case.device.type == "cpu" and _autocast_dtype(case) == torch.float16:
            return "CPU autocast runs bf16 here"
        return None

    def setup(self, case, q, k, n):
        super().setup(case, q, k, n)
        from moco_fast.reference import info_nce_logits

        self.autocast_dtype = _autocast_dtype(case)
        self.device_type = case.device.type
        with torch.no_grad(), self._autocast():
            logits = info_nce_logits(q[:2], k[:2], n[:3], self.temperature)
            loss = F.cross_entropy(logits, torch.zeros(2, dtype=torch.long, device=q.device))
        self.note = (
            f"official under autocast({self.device_type}, {common.dtype_name(self.autocast_dtype)}): "
            f"logits {common.dtype_name(logits.dtype)}, cross_entropy {common.dtype_name(loss.dtype)}"
        )

    def _autocast(self):
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def forward(self, state, q, k, n):
        with self._autocast():
            return super().forward(state, q, k, n)


class Lightly(Row):
    name = "lightly"
    materializes_logits = True

    def available(self, case):
        try:
            import lightly.loss  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"lightly not importable ({type(exc).__name__})"
        return None

    def setup(self, case, q, k, n):
        from lightly.loss import NTXentLoss

        loss_fn = NTXentLoss(temperature=case.temperature, memory_bank_size=(case.keys, case.dim)).to(case.device)
        bank = loss_fn.memory_bank.bank
        if tuple(bank.shape) != (case.keys, case.dim):
            raise RuntimeError(f"lightly's bank has shape {tuple(bank.shape)}, expected (K, d)")
        with torch.no_grad():
            bank.copy_(n.float())
            loss_fn.memory_bank.bank_ptr.zero_()
        self.autocast = case.dtype != torch.float32
        self.device_type = case.device.type
        self.low_precision = self.autocast
        self.note = (
            f"lightly {mb.package_version('lightly')} NTXentLoss: normalizes q,k; "
            "bank (K,d) fp32 cloned per call, "
            "enqueues k after the forward"
            + (
                f"; autocast({self.device_type}, {common.dtype_name(case.dtype)}) for its fp32 bank"
                if self.autocast
                else ""
            )
        )
        return loss_fn

    def forward(self, loss_fn, q, k, n):
        ctx = torch.autocast(self.device_type, dtype=q.dtype) if self.autocast else contextlib.nullcontext()
        with ctx:
            return loss_fn(q, k)

    def expected_dq(self, dq_ref, q):
        # d/dq of L(q/|q|) = (I - y y^T) dL/dy / |q| with y = q/|q|: the radial part is removed.
        qf = q.detach().float()
        norm = qf.norm(dim=1, keepdim=True)
        y = qf / norm
        g = dq_ref.float()
        return (g - y * (y * g).sum(dim=1, keepdim=True)) / norm


class SdpaFlash(Row):
    """PyTorch's fused attention (V = K = negatives) returning (O, lse), the positive merged analytically."""

    name = "sdpa-flash"

    def setup(self, case, q, k, n):
        self.scale = case.scale
        self.splits = 1
        if case.device.type == "cpu":
            self.kernel = "aten._scaled_dot_product_flash_attention_for_cpu"
            self.low_precision = case.dtype != torch.float32
        else:
            # Flash attention parallelizes over (batch, heads, query blocks of 128): split the keys over the
            # batch dimension so about 2 CTAs per SM run; partials are merged by logsumexp.
            sms = torch.cuda.get_device_properties(case.device).multi_processor_count
            want = max(1, (2 * sms) // max(1, math.ceil(case.batch / 128)))
            splits = 1
            while splits * 2 <= want and case.keys % (splits * 2) == 0 and case.keys // (splits * 2) >= 512:
                splits *= 2
            self.splits = splits
            if case.dtype in (torch.bfloat16, torch.float16):
                self.kernel = "aten._scaled_dot_product_flash_attention"
                self.low_precision = True
            else:
                self.kernel = "aten._scaled_dot_product_efficient_attention"
        self.note = f"{self.kernel}(q, N, N) -> (O, lse), positive merged analytically" + (
            f", keys split {self.splits}x over batch" if self.splits > 1 else ""
        )
        # Probe: the kernel must exist and accept these shapes.
        self._attend(q.detach()[:2], n[: max(self.splits, 2) * 2] if self.splits > 1 else n[:4])
        return None

    def _attend(self, q, n):
        splits = self.splits if n.shape[0] % self.splits == 0 else 1
        rows = q.shape[0]
        qq = q.reshape(1, 1, rows, -1).expand(splits, 1, rows, q.shape[1]).contiguous()
        nn_ = n.reshape(splits, 1, n.shape[0] // splits, n.shape[1])
        if self.kernel.endswith("_for_cpu"):
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qq, nn_, nn_, scale=self.scale)
        elif self.kernel.endswith("_efficient_attention"):
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                qq, nn_, nn_, None, True, scale=self.scale
            )[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qq, nn_, nn_, scale=self.scale)[:2]
        out = out[:, 0].float()  # (S, B, d)
        lse = lse[:, 0, :rows].float()  # (S, B); efficient attention pads the query length
        if splits == 1:
            return out[0], lse[0]
        total = torch.logsumexp(lse, dim=0)
        weights = torch.exp(lse - total)  # (S, B)
        return (weights[..., None] * out).sum(dim=0), total

    def _merge(self, q, k, n):
        with torch.no_grad():
            out_neg, lse_neg = self._attend(q.detach(), n)
            kf = k.float()
            pos = (q.detach().float() * kf).sum(dim=1) * self.scale
            lse = torch.logaddexp(lse_neg, pos)
            out = torch.exp(lse_neg - lse)[:, None] * out_neg + torch.exp(pos - lse)[:, None] * kf
            loss = (lse - pos).mean()
        return loss, out, kf

    def forward(self, state, q, k, n):
        return self._merge(q, k, n)[0]

    def fwd_bwd(self, state, q, k, n):
        loss, out, kf = self._merge(q, k, n)
        dq = ((self.scale / q.shape[0]) * (out - kf)).to(q.dtype)
        return loss, dq


class CutCrossEntropy(Row):
    name = "cce-exact"

    def available(self, case):
        if case.device.type != "cuda":
            return "GPU only"
        try:
            import cut_cross_entropy  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"cut-cross-entropy not installed ({type(exc).__name__})"
        return None

    def setup(self, case, q, k, n):
        from cut_cross_entropy import linear_cross_entropy

        self.fn = linear_cross_entropy
        self.scale = case.scale
        self.low_precision = case.dtype != torch.float32
        self.targets = torch.zeros(case.batch, dtype=torch.long, device=case.device)
        version = mb.package_version("cut-cross-entropy")
        self.note = f"cut-cross-entropy {version} cce_exact: lse over the queue, positive merged"

    def forward(self, state, q, k, n):
        qs = q * self.scale
        # CCE returns lse - logit[target]: target 0 is negative n_0; add its logit back to get lse over N.
        nll0 = self.fn(qs, n, self.targets, impl="cce_exact", reduction="none").float()
        lse_neg = nll0 + (qs.float() * n[0].float()).sum(dim=1)
        pos = (qs.float() * k.float()).sum(dim=1)
        return (torch.logaddexp(lse_neg, pos) - pos).mean()


class MocoFast(Row):
    def __init__(self, backend: str, stats: bool = False):
        super().__init__()
        self.backend = backend
        self.stats = stats  # return_stats=True: the rank (acc@1/acc@5) too, as MoCoHead asks for
        self.name = f"moco_fast[{backend}{'+stats' if stats else ''}]"

    def available(self, case):
        import moco_fast.backends as backends

        if self.backend == "triton" and case.device.type != "cuda":
            return "CUDA only (the CPU interpreter is far too slow to time)"
        if self.backend == "cuda" and case.device.type != "cuda":
            return "CUDA only"
        if not backends.is_available(self.backend):
            return "not available in this installation"
        return None

    def setup(self, case, q, k, n):
        import moco_fast

        self.fn = moco_fast.info_nce
        self.temperature = case.temperature
        self.low_precision = case.dtype != torch.float32 and self.backend != "torch"
        notes = {
            "torch": "without stats: PyTorch's fused CPU attention + positive merge (moco_fast/chunked.py)"
            if case.device.type == "cpu"
            else "single pass, blockwise PyTorch ops (moco_fast/chunked.py)",
            "torch+stats": "single pass with rank, blockwise PyTorch ops (moco_fast/chunked.py)",
            "triton": "single pass, Triton kernels",
            "cuda": "single pass, CUDA extension moco_fast._C",
        }
        self.note = notes.get(self.backend + ("+stats" if self.stats and self.backend == "torch" else ""), "")

    def forward(self, state, q, k, n):
        if self.stats:
            return self.fn(q, k, n, self.temperature, backend=self.backend, return_stats=True)[0]
        return self.fn(q, k, n, self.temperature, backend=self.backend)


def all_rows(device: torch.device) -> list[Row]:
    rows: list[Row] = [Reference(), ReferenceAutocast(), Lightly(), SdpaFlash(), CutCrossEntropy()]
    try:
        import moco_fast

        backends = [b for b in moco_fast.available_backends() if b != "reference"]
    except Exception:  # noqa: BLE001
        backends = ["torch"]
    for b in ("cuda", "triton", "torch"):
        if b in backends or (b == "triton" and device.type == "cpu"):
            rows.append(MocoFast(b))
    rows.append(MocoFast("torch", stats=True))
    return rows


def select_rows(rows: list[Row], wanted: list[str] | None) -> list[Row]:
    if not wanted or wanted == ["all"]:
        return rows
    chosen = []
    for row in rows:
        short = row.name.removeprefix("moco_fast[").removesuffix("]").removesuffix("+stats")
        if row.name in wanted or short in wanted or (row.name.startswith("moco_fast") and "moco_fast" in wanted):
            chosen.append(row)
    return chosen


# ------------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------------


def _tolerances(row: Row, case: Case) -> tuple[float, float]:
    """(max |loss error|, max dq relative error) for a row to pass its check."""
    if row.low_precision:
        return 5e-2, 3e-2
    if case.device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return 2e-3, 2e-3  # TF32
    return 1e-4, 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def measure_memory(row: Row, case: Case, q, k, n, state, args) -> dict:
    """Peak extra bytes of the row's first fwd+bwd: a fresh process on the CPU, in-process on a GPU."""
    if case.device.type == "cuda":
        peak, _ = mb.cuda_peak_extra(lambda: row.fwd_bwd(state, q, k, n), case.device)
        return {"peak_extra_bytes": peak}
    if not mb.hwm_supported():
        return {"error": "no /proc/self/clear_refs"}
    child = [
        "--_memory-child",
        row.name,
        "--device",
        "cpu",
        "--dtype",
        common.dtype_name(case.dtype),
        "-B",
        str(case.batch),
        "-K",
        str(case.keys),
        "-d",
        str(case.dim),
        "--temperature",
        str(case.temperature),
        "--threads",
        str(torch.get_num_threads()),
    ]
    return mb.run_child([os.path.abspath(__file__), *child])


def memory_child(args) -> None:
    """In a fresh process: inputs, setup, a tiny warm-up at another size, then the first real call."""
    case = _cases(args)[0]
    row = next(r for r in all_rows(case.device) if r.name == args._memory_child)
    # Load code paths (kernels, thread pools, autograd engine) on tiny inputs, so the measurement is
    # the first call at this size, not library start-up.
    tiny = Case(3, 5, case.dim, case.dtype, case.device, case.temperature)
    tq, tk, tn = make_inputs(tiny, seed=1)
    row.fwd_bwd(row.setup(tiny, tq, tk, tn), tq, tk, tn)
    del tq, tk, tn
    q, k, n = make_inputs(case)
    state = row.setup(case, q, k, n)
    peak, _ = mb.cpu_peak_extra(lambda: row.fwd_bwd(state, q, k, n))
    print(json.dumps({"peak_extra_bytes": peak, "rss_base_bytes": mb.rss_bytes()}))


def run_case(case: Case, rows: list[Row], args, timing: dict) -> list[dict]:
    """Check, time and measure every row on one case; returns result dicts (reference first)."""
    q, k, n = make_inputs(case)
    # 4 fp32 copies of the logits (measured: 4.35 at B=256, K=65536 on the CPU), with a 20% margin.
    fits = case.logits_bytes() <= 0.8 * mb.available_memory_bytes(case.device)
    need = f"skipped: needs {case.logits_bytes() / 2**30:.1f} GiB"
    results = []

    # The reference is computed for the checks even when it is not a timed row.
    ref_row = Reference()
    ref_loss = ref_dq = None
    if fits:
        ref_row.setup(case, q, k, n)
        ref_loss, ref_dq = ref_row.fwd_bwd(None, q, k, n)
    ref_name = "reference"
    for row in rows:
        result = {"row": row.name, **_case_fields(case)}
        results.append(result)
        reason = row.available(case)
        if reason is None and row.materializes_logits and not fits:
            reason = need
        if reason is not None:
            result.update(status=reason if reason.startswith("skipped") else f"skipped: {reason}")
            continue
        try:
            state = row.setup(case, q, k, n)
            if row.name == "reference" and ref_loss is not None:
                loss, dq = ref_loss, ref_dq  # the check call was made above
            else:
                loss, dq = row.fwd_bwd(state, q, k, n)
            if ref_loss is None:  # no reference fits: the first row that runs is the baseline
                ref_loss, ref_dq, ref_name = loss, row.expected_dq(dq, q), row.name
            loss_err = abs(float(loss) - float(ref_loss))
            dq_err = _rel(dq, row.expected_dq(ref_dq, q))
            tol_loss, tol_dq = _tolerances(row, case)
            ok = math.isfinite(loss_err) and loss_err <= tol_loss and dq_err <= tol_dq
            result.update(
                note=row.note,
                checked_against=ref_name,
                loss=float(loss),
                loss_abs_err=loss_err,
                dq_rel_err=dq_err,
                status="ok" if ok else f"FAIL (tol {tol_loss:g}/{tol_dq:g})",
            )
            # The check call above is the first warm-up call; the forward runs warm after the fwd+bwd calls.
            fb_timing = dict(timing, warmup=max(timing["warmup"] - 1, 0))
            fw_timing = dict(timing, warmup=timing["warmup"] // 2, min_repeats=min(3, timing["min_repeats"]))
            fb = mb.time_fn(functools.partial(row.fwd_bwd, state, q, k, n), case.device, **fb_timing)
            fw = mb.time_fn(functools.partial(row.forward, state, q, k, n), case.device, **fw_timing)
            result.update(
                fwd_bwd_s=fb["median_s"],
                fwd_bwd_min_s=fb["min_s"],
                fwd_s=fw["median_s"],
                repeats=fb["repeats"],
                fwd_repeats=fw["repeats"],
                warmup=timing["warmup"],
                tflops=case.flops() / fb["median_s"] / 1e12,
                gbps=case.min_bytes() / fb["median_s"] / 1e9,
            )
            if not args.no_memory:
                mem = measure_memory(row, case, q, k, n, state, args)
                result["peak_extra_bytes"] = mem.get("peak_extra_bytes")
                if "error" in mem:
                    result["memory_error"] = mem["error"]
            del state
        except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the run
            result.update(status=f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    base = next((r for r in results if r["row"] == "reference" and "fwd_bwd_s" in r), None)
    for r in results:
        if base is not None and "fwd_bwd_s" in r:
            r["speedup_vs_ref"] = mb.ratio(base["fwd_bwd_s"], r["fwd_bwd_s"])
            r["fwd_speedup_vs_ref"] = mb.ratio(base["fwd_s"], r["fwd_s"])
            r["memory_vs_ref"] = mb.ratio(r.get("peak_extra_bytes"), base.get("peak_extra_bytes"))
    return results


def _unavailable(result: dict) -> bool:
    status = str(result.get("status", ""))
    return status.startswith("skipped") and "needs" not in status


def _case_fields(case: Case) -> dict:
    return {
        "B": case.batch,
        "K": case.keys,
        "d": case.dim,
        "dtype": common.dtype_name(case.dtype),
        "temperature": case.temperature,
    }


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def table(results: list[dict], device: torch.device, with_case: bool = False) -> str:
    rows = []
    for r in results:
        rows.append(
            {
                "case": f"{r['B']}/{r['K']}/{r['d']}/{r['dtype']}",
                "row": r["row"],
                "fb": mb.fmt_time(r.get("fwd_bwd_s")),
                "fw": mb.fmt_time(r.get("fwd_s")),
                "n": r.get("repeats", "-"),
                "mem": mb.fmt_bytes(r.get("peak_extra_bytes")),
                "speed": mb.fmt_ratio(r.get("speedup_vs_ref")),
                "memr": "-" if r.get("memory_vs_ref") is None else f"{r['memory_vs_ref']:.3f}",
                "lerr": mb.fmt_err(r.get("loss_abs_err")),
                "qerr": mb.fmt_err(r.get("dq_rel_err")),
                "tf": "-" if "tflops" not in r else f"{r['tflops']:.1f}",
                "gb": "-" if "gbps" not in r else f"{r['gbps']:.0f}",
                "status": r.get("status", ""),
            }
        )
    columns = [("case B/K/d/dtype", "case")] if with_case else []
    columns += [
        ("row", "row"),
        ("fwd+bwd", "fb"),
        ("fwd", "fw"),
        ("n", "n"),
        ("peak extra mem", "mem"),
        ("speedup vs ref", "speed"),
        ("mem / ref", "memr"),
        ("|loss err|", "lerr"),
        ("dq rel err", "qerr"),
    ]
    if device.type == "cuda":
        columns += [("TFLOP/s", "tf"), ("GB/s", "gb")]
    columns += [("check", "status")]
    return mb.format_table(rows, columns)


def notes(results: list[dict]) -> str:
    seen = {}
    for r in results:
        if r.get("note") and r["row"] not in seen:
            seen[r["row"]] = r["note"]
    return "\n".join(f"  {name}: {note}" for name, note in seen.items())


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def _cases(args) -> list[Case]:
    device = common.pick_device(args.device)
    quick = args.sweep and args.quick
    batches = args.batch or (QUICK_B if quick else SWEEP_B) if args.sweep else (args.batch or [256])
    keys = args.keys or (QUICK_K if quick else SWEEP_K) if args.sweep else (args.keys or [65536])
    dims = args.dim or (QUICK_D if quick else SWEEP_D) if args.sweep else (args.dim or [128])
    dtypes = (
        args.dtype or (QUICK_DTYPES[device.type] if quick else SWEEP_DTYPES) if args.sweep else (args.dtype or ["fp32"])
    )
    return [
        Case(b, kk, dd, common.parse_dtype(t), device, args.temperature)
        for t, dd, b, kk in itertools.product(dtypes, dims, batches, keys)
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_run_args(
        p,
        repeats="per row: CPU 20, GPU 100; less with --quick/--sweep",
        warmup="the check call included: CPU 1, GPU 10",
        budget="per row and metric: CPU 1.5, GPU 1",
        quick="fewer repeats; with --sweep a small d=128 grid (fp32 on CPU, bf16 on GPU)",
    )
    p.add_argument("--dtype", nargs="+", default=None, help="input dtype(s): fp32 (default), bf16, fp16")
    p.add_argument("-B", "--batch", type=int, nargs="+", default=None, help="batch size(s) (default 256)")
    p.add_argument("-K", "--keys", type=int, nargs="+", default=None, help="queue size(s) (default 65536)")
    p.add_argument("-d", "--dim", type=int, nargs="+", default=None, help="key dim(s) (default 128)")
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument(
        "--backends",
        nargs="+",
        default=None,
        help="rows to run (default all): reference ref-autocast lightly sdpa-flash cce-exact "
        "moco_fast torch triton cuda",
    )
    p.add_argument("--sweep", action="store_true", help="B x K x d x dtype grid (axes given explicitly are kept)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PREFIX",
        help="write PNG plots (default prefix benchmarks/results/<cpu|gpu>_infonce)",
    )
    p.add_argument("--plot-from", metavar="JSON", help="only plot an existing JSON result")
    p.add_argument("--_memory-child", dest="_memory_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    if args._memory_child:
        memory_child(args)
        return 0
    if args.plot_from:
        import plot

        with open(args.plot_from) as f:
            payload = json.load(f)
        plot.plot_infonce(payload, args.plot or _default_prefix(payload["machine"]["device"]))
        return 0
    warnings.filterwarnings("ignore", message=".*TRITON_INTERPRET.*")
    cases = _cases(args)
    device = cases[0].device
    gpu = device.type == "cuda"
    quick = args.quick
    # Defaults: slow rows get min_repeats, fast rows up to `repeats`, about budget_s of timed calls each.
    # A sweep has many cases: shorter budgets (the GPU sweep is ~48 cases x 8 rows).
    light = quick or args.sweep
    timing = {
        "warmup": args.warmup if args.warmup is not None else ((3 if light else 10) if gpu else 1),
        "repeats": args.repeats or ((30 if light else 100) if gpu else (5 if quick else 20)),
        "min_repeats": 3 if light else 5,
        "budget_s": args.budget or ((0.2 if light else 1.0) if gpu else (0.5 if quick else 1.5)),
    }
    rows = select_rows(all_rows(device), args.backends)
    if not rows:
        print(f"no rows match --backends {args.backends}", file=sys.stderr)
        return 2
    machine = common.machine_info(device)
    print(
        f"# bench_infonce on {machine.get('gpu', machine['cpu'])} ({device}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load {machine['loadavg']}"
    )
    results: list[dict] = []
    iterator = common.progress(cases, total=len(cases), desc="cases") if len(cases) > 1 else cases
    for case in iterator:
        case_results = run_case(case, rows, args, timing)
        results += case_results
        if len(cases) == 1:
            print(f"# {case.label()}, T={case.temperature}; median of n repeats after {timing['warmup']} warm-up")
            print(table(case_results, device))
    if len(cases) > 1:  # rows this device cannot run are left out of the sweep table (kept in the JSON)
        shown = [r for r in results if not _unavailable(r)]
        print(table(shown, device, with_case=True))
    print("rows:\n" + notes(results))
    failed = [r["row"] for r in results if str(r.get("status", "")).startswith(("FAIL", "error"))]
    if failed:
        print(f"WARNING: rows failed their check or errored: {sorted(set(failed))}")
    payload = {
        "benchmark": "infonce",
        "machine": machine,
        "timing": timing,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "results": results,
    }
    payload["machine"]["loadavg_end"] = list(os.getloadavg())
    if args.json:
        common.write_json(args.json, payload)
    if args.plot is not None:
        import plot

        plot.plot_infonce(payload, args.plot or _default_prefix(str(device)))
    return 0


def _default_prefix(device: str) -> str:
    return os.path.join(common.RESULTS, ("gpu" if device.startswith("cuda") else "cpu") + "_infonce")


if __name__ == "__main__":
    sys.exit(main())
