#!/usr/bin/env python
"""NT-Xent (SimCLR) over 2N rows: moco_fast against what users would pick instead.

Every row computes the same loss — the mean over the 2N rows z = [z0; z1] of
lse_{b≠a}(z_a·z_b/T) − z_a·z_pos(a)/T — and its gradients dz0, dz1 on the same unit-norm inputs,
and is checked against the naive formulation before it is timed:

* ``naive``: SimCLR's official formulation (moco_fast.reference.reference_nt_xent): the (2N, 2N)
  similarity matrix, the diagonal pushed down by 1e9, cross_entropy against i ± N; autograd backward.
  The baseline of every ratio (when it fits).
* ``lightly``: ``lightly.loss.NTXentLoss(T)`` (four (N, N) einsums, boolean-mask indexing, cat,
  cross_entropy). It L2-normalizes its inputs: on unit rows the loss is the same and its gradients are
  the naive ones with the radial component removed, and are compared that way.
* ``sdpa-flash`` (CPU): PyTorch's fused CPU attention with V = K = Q = z and the diagonal masked by an
  additive (2N, 2N) fp32 mask (the kernel takes no bool mask), which returns O and lse; the loss is
  lse − z·z_pos/T, dz = (O − z_pos)/T·g + the column term, which is the attention backward's dV for
  grad_out = g·z/T (aten._scaled_dot_product_flash_attention_for_cpu_backward), minus the positive's.
* ``moco_fast[<backend>]``: ``moco_fast.nt_xent`` ("triton" only on CUDA: its CPU interpreter is far
  too slow to time).

Metrics (the shared harness, benchmarks/common.py): median fwd+bwd and forward times, peak extra
memory (CPU: VmHWM of a fresh process per row, first call, above its RSS once the inputs exist; GPU:
max_memory_allocated above the inputs), loss and gradient error vs the naive row, ratios vs lightly.

Examples::

    python benchmarks/bench_ntxent.py --threads 1                         # 2N = 16384, d = 128, fp32
    python benchmarks/bench_ntxent.py --threads 1 --sweep --json benchmarks/results/cpu_ntxent_sweep.json
    python benchmarks/bench_ntxent.py --device cuda --dtype bf16 --sweep
"""

from __future__ import annotations

import argparse
import functools
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

SWEEP_ROWS = (4096, 16384, 65536)


@dataclass(frozen=True)
class Case:
    rows: int  # 2N
    dim: int
    dtype: torch.dtype
    device: torch.device
    temperature: float = 0.5

    def label(self) -> str:
        return f"2N={self.rows} d={self.dim} {common.dtype_name(self.dtype)} T={self.temperature}"

    def fields(self) -> dict:
        return {"2N": self.rows, "d": self.dim, "dtype": common.dtype_name(self.dtype), "T": self.temperature}


def make_inputs(case: Case, seed: int = 0):
    """Unit rows z0 and a correlated second view z1 (N, d), both requiring grad."""
    n = case.rows // 2
    gen = torch.Generator().manual_seed(seed)
    z0 = F.normalize(torch.randn(n, case.dim, generator=gen), dim=1)
    z1 = F.normalize(z0 + 0.7 * torch.randn(n, case.dim, generator=gen), dim=1)
    return [z.to(case.device, case.dtype).requires_grad_(True) for z in (z0, z1)]


class Row:
    """One formulation. ``matrix_copies``: fp32 (2N)² matrices it holds at its peak (None: O(N·d))."""

    name = ""
    matrix_copies: float | None = None
    radial_free = False  # normalizes inside: compare gradients with the radial part removed

    def __init__(self):
        self.note = ""

    def available(self, case: Case) -> str | None:
        return None

    def setup(self, case: Case):
        return None

    def loss(self, state, z0, z1):
        raise NotImplementedError

    def fwd_bwd(self, state, z0, z1):
        loss = self.loss(state, z0, z1)
        return loss.detach(), torch.autograd.grad(loss, (z0, z1))

    def forward(self, state, z0, z1):
        with torch.no_grad():
            return self.loss(state, z0, z1)


class Naive(Row):
    name = "naive"
    matrix_copies = 4

    def setup(self, case):
        from moco_fast.reference import reference_nt_xent

        self.note = "SimCLR's official formulation: (2N)^2 logits, diagonal - 1e9, cross_entropy; autograd"
        return functools.partial(reference_nt_xent, temperature=case.temperature)

    def loss(self, fn, z0, z1):
        return fn(z0, z1)


class Lightly(Row):
    name = "lightly"
    matrix_copies = 4.5
    radial_free = True

    def available(self, case):
        try:
            import lightly.loss  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"lightly not importable ({type(exc).__name__})"
        return None

    def setup(self, case):
        from lightly.loss import NTXentLoss

        self.note = (
            f"lightly {mb.package_version('lightly')} NTXentLoss(T): 4 einsums, mask indexing, cat, cross_entropy"
        )
        return NTXentLoss(case.temperature).to(case.device)

    def loss(self, fn, z0, z1):
        return fn(z0, z1)


class SdpaFlash(Row):
    name = "sdpa-flash"
    matrix_copies = 1.5  # the additive fp32 mask, plus the kernel's blocks

    def available(self, case):
        if case.device.type != "cpu":
            return "CPU only here (the fused GPU kernels take no per-row exclusion either)"
        if case.dtype != torch.float32:
            return "fp32 only (the mask must match the query dtype)"
        return None

    def setup(self, case):
        self.note = "aten flash attention for CPU, V = K = Q = z, additive (2N)^2 fp32 diagonal mask; its backward's dV"
        self.scale = 1.0 / case.temperature
        mask = torch.zeros(case.rows, case.rows, device=case.device)
        mask.fill_diagonal_(float("-inf"))
        return mask[None, None]

    def _forward(self, mask, z0, z1):
        z = torch.cat([z0, z1]).detach()
        zz = z[None, None]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            zz, zz, zz, attn_mask=mask, scale=self.scale
        )
        n2 = z.shape[0]
        pos_idx = (torch.arange(n2) + n2 // 2) % n2
        z_pos = z[pos_idx]
        loss_rows = lse.reshape(n2) - (z * z_pos).sum(1) * self.scale
        return z, zz, out, lse, loss_rows, z_pos, pos_idx

    def fwd_bwd(self, mask, z0, z1):
        z, zz, out, lse, loss_rows, z_pos, pos_idx = self._forward(mask, z0, z1)
        n2 = z.shape[0]
        g = 1.0 / n2
        # Column term s·Σ_c g P_ca z_c = dV of the attention backward with grad_out = s·g·z.
        grad_out = (z * (g * self.scale))[None, None]
        _, _, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, zz, zz, zz, out, lse, 0.0, False, attn_mask=mask, scale=self.scale
        )
        dz = (out.reshape(n2, -1) - z_pos) * (g * self.scale) + dv.reshape(n2, -1)
        dz.index_add_(0, pos_idx, z * (-g * self.scale))  # the positive's key role: −s·g·z_pos(a) for row pos(a)
        return loss_rows.mean(), (dz[: n2 // 2], dz[n2 // 2 :])

    def forward(self, mask, z0, z1):
        return self._forward(mask, z0, z1)[4].mean()


class MocoFast(Row):
    def __init__(self, backend: str):
        super().__init__()
        self.backend = backend
        self.name = f"moco_fast[{backend}]"

    def available(self, case):
        import moco_fast.backends as backends

        if self.backend == "triton" and case.device.type != "cuda":
            return "CUDA only (the CPU interpreter is far too slow to time)"
        if not backends.is_available(self.backend):
            return "not available in this installation"
        return None

    def setup(self, case):
        import moco_fast

        self.note = {
            "torch": "fused core (moco_fast/torch_backend/contrast.py): blockwise sweep + column pass",
            "triton": "fused core, Triton kernels (kernels/contrast_*.py)",
        }.get(self.backend, "")
        return functools.partial(moco_fast.nt_xent, temperature=case.temperature, backend=self.backend)

    def loss(self, fn, z0, z1):
        return fn(z0, z1)


def all_rows() -> list[Row]:
    return [Naive(), Lightly(), SdpaFlash(), MocoFast("torch"), MocoFast("triton")]


# ------------------------------------------------------------------------------------------------
# Running (shared with bench_memory_bank.py)
# ------------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def radial_free(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The gradient through x/|x| at x: (I − y yᵀ) g / |x|, y = x/|x|."""
    xf = x.detach().float()
    norm = xf.norm(dim=1, keepdim=True)
    y = xf / norm
    g = grad.float()
    return (g - y * (y * g).sum(dim=1, keepdim=True)) / norm


def fits(row: Row, matrix_bytes: int, device: torch.device) -> bool:
    return row.matrix_copies is None or row.matrix_copies * matrix_bytes <= 0.8 * mb.available_memory_bytes(device)


def check_and_time(row, case, inputs, state, ref, timing) -> dict:
    """Check a row against ``ref`` ((loss, grads) or None: the row becomes the reference) and time it."""
    loss, grads = row.fwd_bwd(state, *inputs)
    if ref is None:
        ref = (loss, grads)
    ref_grads = [radial_free(g, x) for g, x in zip(ref[1], inputs)] if row.radial_free else ref[1]
    loss_err = abs(float(loss) - float(ref[0]))
    grad_err = max(_rel(g, r) for g, r in zip(grads, ref_grads))
    low = case.dtype != torch.float32
    tol = 5e-2 if low else (2e-3 if case.device.type == "cuda" else 1e-4)
    ok = math.isfinite(loss_err) and loss_err <= tol and grad_err <= tol
    result = dict(loss=float(loss), loss_abs_err=loss_err, grad_rel_err=grad_err, status="ok" if ok else "FAIL")
    fb = mb.time_fn(functools.partial(row.fwd_bwd, state, *inputs), case.device, **timing)
    fw = mb.time_fn(functools.partial(row.forward, state, *inputs), case.device, **dict(timing, min_repeats=3))
    result.update(fwd_bwd_s=fb["median_s"], fwd_bwd_min_s=fb["min_s"], fwd_s=fw["median_s"], repeats=fb["repeats"])
    return result, ref


def memory_in_child(script: str, row_name: str, case_args: list[str]) -> dict:
    return mb.run_child([os.path.abspath(script), "--_memory-child", row_name, *case_args])


def finish(results: list[dict], baseline: str) -> None:
    """Ratios of every row against ``baseline`` (time) and its peak memory."""
    base = next((r for r in results if r["row"] == baseline and "fwd_bwd_s" in r), None)
    for r in results:
        if base is not None and "fwd_bwd_s" in r:
            r[f"speedup_vs_{baseline}"] = mb.ratio(base["fwd_bwd_s"], r["fwd_bwd_s"])
            r[f"memory_saving_vs_{baseline}"] = mb.ratio(base.get("peak_extra_bytes"), r.get("peak_extra_bytes"))


def table(results: list[dict], baseline: str, case_key) -> str:
    rows = [
        {
            "case": case_key(r),
            "row": r["row"],
            "fb": mb.fmt_time(r.get("fwd_bwd_s")),
            "fw": mb.fmt_time(r.get("fwd_s")),
            "n": r.get("repeats", "-"),
            "mem": mb.fmt_bytes(r.get("peak_extra_bytes")),
            "speed": mb.fmt_ratio(r.get(f"speedup_vs_{baseline}")),
            "memr": mb.fmt_ratio(r.get(f"memory_saving_vs_{baseline}")),
            "lerr": mb.fmt_err(r.get("loss_abs_err")),
            "gerr": mb.fmt_err(r.get("grad_rel_err")),
            "status": r.get("status", ""),
        }
        for r in results
    ]
    columns = [
        ("case", "case"),
        ("row", "row"),
        ("fwd+bwd", "fb"),
        ("fwd", "fw"),
        ("n", "n"),
        ("peak extra mem", "mem"),
        (f"speed vs {baseline}", "speed"),
        (f"mem saving vs {baseline}", "memr"),
        ("|loss err|", "lerr"),
        ("grad rel err", "gerr"),
        ("check", "status"),
    ]
    return mb.format_table(rows, columns)


def timing_defaults(args, gpu: bool) -> dict:
    return {
        "warmup": args.warmup if args.warmup is not None else (5 if gpu else 0),
        "repeats": args.repeats or (30 if gpu else (3 if args.quick else 7)),
        "min_repeats": 3,
        "budget_s": args.budget or (0.5 if gpu else (2.0 if args.quick else 6.0)),
    }


# ------------------------------------------------------------------------------------------------
# This benchmark
# ------------------------------------------------------------------------------------------------


def run_case(case: Case, rows: list[Row], args, timing: dict) -> list[dict]:
    results = measure_rows(case, rows, args, timing, make_inputs(case), 4 * case.rows * case.rows, __file__, case_args)
    finish(results, "lightly")
    finish(results, "naive")
    return results


def measure_rows(case, rows, args, timing, inputs, matrix_bytes: int, script: str, args_of) -> list[dict]:
    """One result per row: skipped (unavailable, or its ``matrix_copies`` of ``matrix_bytes`` do not fit),
    else checked against the first row measured and timed, and its peak extra memory (CUDA: in process;
    CPU: in a child process of ``script`` run with ``args_of(case)``). Shared with bench_memory_bank.py."""
    results, ref = [], None
    for row in rows:
        result = {"row": row.name, **case.fields()}
        results.append(result)
        reason = row.available(case)
        if reason is None and not fits(row, matrix_bytes, case.device):
            reason = f"needs ~{row.matrix_copies * matrix_bytes / 2**30:.1f} GiB"
        if reason is not None:
            result["status"] = f"skipped: {reason}"
            continue
        try:
            state = row.setup(case)
            measured, ref = check_and_time(row, case, inputs, state, ref, timing)
            result.update(measured, note=row.note)
            if not args.no_memory:
                if case.device.type == "cuda":
                    result["peak_extra_bytes"] = mb.cuda_peak_extra(
                        functools.partial(row.fwd_bwd, state, *inputs), case.device
                    )[0]
                else:
                    mem = memory_in_child(os.path.abspath(script), row.name, args_of(case))
                    result["peak_extra_bytes"] = mem.get("peak_extra_bytes")
                    if "error" in mem:
                        result["memory_error"] = mem["error"]
            del state
        except Exception as exc:  # noqa: BLE001 - a broken peer must not stop the run
            result["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return results


def case_args(case: Case) -> list[str]:
    return [
        "--device",
        str(case.device),
        "--dtype",
        common.dtype_name(case.dtype),
        "--rows",
        str(case.rows),
        "-d",
        str(case.dim),
        "--temperature",
        str(case.temperature),
        "--threads",
        str(torch.get_num_threads()),
    ]


def memory_child(args) -> None:
    case = cases(args)[0]
    row = next(r for r in all_rows() if r.name == args._memory_child)
    tiny = Case(8, case.dim, case.dtype, case.device, case.temperature)  # load code paths first
    row.fwd_bwd(row.setup(tiny), *make_inputs(tiny, seed=1))
    inputs = make_inputs(case)
    state = row.setup(case)
    peak, _ = mb.cpu_peak_extra(functools.partial(row.fwd_bwd, state, *inputs))
    print(json.dumps({"peak_extra_bytes": peak}))


def cases(args) -> list[Case]:
    device = common.pick_device(args.device)
    sizes = args.rows or (SWEEP_ROWS if args.sweep else [16384])
    return [Case(n, args.dim, common.parse_dtype(args.dtype), device, args.temperature) for n in sizes]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_run_args(p, repeats="CPU 7, GPU 30", warmup="CPU 0, GPU 5", budget="CPU 6, GPU 0.5")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="2N, the rows of both views (default 16384)")
    p.add_argument("-d", "--dim", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--sweep", action="store_true", help=f"2N over {SWEEP_ROWS}")
    p.add_argument("--backends", nargs="+", default=None, help="rows to run (default all)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--plot", metavar="PNG", help="write a PNG of time and memory against 2N")
    p.add_argument("--plot-from", metavar="JSON", help="only plot an existing JSON result (with --plot)")
    p.add_argument("--_memory-child", dest="_memory_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def plot(payload: dict, path: str) -> None:
    """fwd+bwd time and peak extra memory against 2N, one line per row (log-log)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    results = [r for r in payload["results"] if "fwd_bwd_s" in r]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=110)
    for name in dict.fromkeys(r["row"] for r in results):
        rows = sorted((r for r in results if r["row"] == name), key=lambda r: r["2N"])
        axes[0].plot([r["2N"] for r in rows], [r["fwd_bwd_s"] for r in rows], "o-", label=name)
        mem = [r for r in rows if r.get("peak_extra_bytes")]
        axes[1].plot([r["2N"] for r in mem], [r["peak_extra_bytes"] / 2**20 for r in mem], "o-", label=name)
    for ax, label in zip(axes, ("fwd+bwd (s)", "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("2N (rows of both views)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    m = payload["machine"]
    fig.suptitle(
        f"NT-Xent fwd+bwd, d={results[0]['d']} {results[0]['dtype']}, {m.get('gpu', m['cpu'])}, "
        f"{m['torch_threads']} thread(s), {m['date_utc'][:10]}",
        fontsize=8,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*TRITON_INTERPRET.*")
    if args._memory_child:
        memory_child(args)
        return 0
    if args.plot_from:
        with open(args.plot_from) as f:
            plot(json.load(f), args.plot or args.plot_from.replace(".json", ".png"))
        return 0
    todo = cases(args)
    device = todo[0].device
    rows = [
        r
        for r in all_rows()
        if not args.backends or r.name in args.backends or r.name.strip("]").split("[")[-1] in args.backends
    ]
    timing = timing_defaults(args, device.type == "cuda")
    machine = common.announce("ntxent", device)
    results = []
    for case in todo:
        results += run_case(case, rows, args, timing)
    text = table(results, "lightly", lambda r: f"{r['2N']}/{r['d']}/{r['dtype']}")
    text += "\nrows:\n" + "\n".join(f"  {r['row']}: {r['note']}" for r in results[: len(rows)] if r.get("note"))
    return common.finish("ntxent", results, text, machine, timing, args, argv)


if __name__ == "__main__":
    sys.exit(main())
