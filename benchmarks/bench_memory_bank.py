#!/usr/bin/env python
"""The memory bank's exact non-parametric softmax (InstDisc / NPID) over N rows: moco_fast against the
alternatives, and the fused bank update.

Every loss row computes loss = mean_i [lse_j(f_i·v_j/T) − f_i·v_idx(i)/T] over ALL N bank rows v
(what NPID approximated with NCE because the B×N logits were too costly) and df, on the same inputs,
checked against the naive row (or the first row that runs) before it is timed:

* ``naive``: cross_entropy(f @ bankᵀ / T, idx) with autograd (moco_fast.reference.reference_memory_bank_loss):
  B×N fp32 logits, their softmax and its gradient.
* ``sdpa-flash`` (CPU): PyTorch's fused CPU attention with K = V = bank returns (O, lse); the loss is
  lse − f·v_idx/T and df = g/T·(O − v_idx) (the bank needs no gradient).
* ``moco_fast[<backend>]``: ``moco_fast.contrastive_cross_entropy(f, bank, idx)`` — the core op under
  MemoryBankHead — without stats (CPU: the fused attention fast path) and ``+stats`` (acc@1/acc@5 ranks,
  what the head asks for: the blockwise sweep).
* ``update`` rows: MemoryBank.update of B rows (torch backend; NPID's official index_select / mul /
  add / normalize / index_copy_ as the naive row).

Metrics as bench_ntxent.py (the shared harness in benchmarks/common.py).

Examples::

    python benchmarks/bench_memory_bank.py --threads 1                          # N = 1,000,000, B = 256, d = 128
    python benchmarks/bench_memory_bank.py --threads 1 --json benchmarks/results/cpu_memory_bank_1thread.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_ntxent import finish, measure_rows, table, timing_defaults  # noqa: E402

from moco_fast import benchmarking as mb  # noqa: E402


@dataclass(frozen=True)
class Case:
    batch: int
    bank: int
    dim: int
    dtype: torch.dtype
    device: torch.device
    temperature: float = 0.07

    def fields(self) -> dict:
        return {"B": self.batch, "N": self.bank, "d": self.dim, "dtype": common.dtype_name(self.dtype)}


def make_inputs(case: Case, seed: int = 0):
    """(features f (B, d) requiring grad, bank (N, d) unit rows, idx (B,)); f correlated with its own row."""
    gen = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(case.bank, case.dim, generator=gen), dim=1)
    idx = torch.randint(case.bank, (case.batch,), generator=gen)
    f = F.normalize(bank[idx] + 0.5 * torch.randn(case.batch, case.dim, generator=gen), dim=1)
    return (f.to(case.device, case.dtype).requires_grad_(True), bank.to(case.device, case.dtype), idx.to(case.device))


class LossRow:
    name = ""
    matrix_copies: float | None = None
    radial_free = False
    note = ""

    def available(self, case):
        return None

    def setup(self, case):
        return None

    def loss(self, state, f, bank, idx):
        raise NotImplementedError

    def fwd_bwd(self, state, f, bank, idx):
        loss = self.loss(state, f, bank, idx)
        return loss.detach(), torch.autograd.grad(loss, (f,))

    def forward(self, state, f, bank, idx):
        with torch.no_grad():
            return self.loss(state, f, bank, idx)


class Naive(LossRow):
    name = "naive"
    matrix_copies = 3
    note = "cross_entropy(f @ bank^T / T, idx): B x N fp32 logits, autograd"

    def setup(self, case):
        from moco_fast.reference import reference_memory_bank_loss

        return functools.partial(reference_memory_bank_loss, temperature=case.temperature)

    def loss(self, fn, f, bank, idx):
        return fn(f, bank, idx)


class SdpaFlash(LossRow):
    name = "sdpa-flash"
    note = "aten flash attention for CPU (K = V = bank) -> (O, lse); df = g/T (O - v_idx)"

    def available(self, case):
        if case.device.type != "cpu" or case.dtype != torch.float32:
            return "CPU fp32 only in this script"
        return None

    def setup(self, case):
        return 1.0 / case.temperature

    def _parts(self, scale, f, bank, idx):
        ff, bb = f.detach()[None, None], bank[None, None]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(ff, bb, bb, scale=scale)
        pos_rows = bank[idx]
        pos = (f.detach() * pos_rows).sum(1) * scale
        return out.reshape(f.shape), lse.reshape(-1) - pos, pos_rows

    def fwd_bwd(self, scale, f, bank, idx):
        out, rows_loss, pos_rows = self._parts(scale, f, bank, idx)
        return rows_loss.mean(), ((out - pos_rows) * (scale / f.shape[0]),)

    def forward(self, scale, f, bank, idx):
        return self._parts(scale, f, bank, idx)[1].mean()


class MocoFast(LossRow):
    def __init__(self, backend: str, stats: bool):
        self.backend, self.stats = backend, stats
        self.name = f"moco_fast[{backend}{'+stats' if stats else ''}]"
        self.note = {
            (False, "torch"): "contrastive_cross_entropy: CPU fp32 -> the fused attention fast path + target merge",
            (True, "torch"): "contrastive_cross_entropy with the rank (acc@1/5, MemoryBankHead): blockwise sweep",
        }.get((stats, backend), "contrastive_cross_entropy, Triton kernels")

    def available(self, case):
        import moco_fast.backends as backends

        if self.backend == "triton" and case.device.type != "cuda":
            return "CUDA only (the CPU interpreter is far too slow to time)"
        if not backends.is_available(self.backend):
            return "not available in this installation"
        return None

    def setup(self, case):
        import moco_fast

        return functools.partial(
            moco_fast.contrastive_cross_entropy,
            temperature=case.temperature,
            backend=self.backend,
            return_stats=self.stats,
        )

    def loss(self, fn, f, bank, idx):
        out = fn(f, bank, idx)
        return out[0] if self.stats else out


def loss_rows() -> list[LossRow]:
    return [Naive(), SdpaFlash()] + [MocoFast(b, s) for b in ("torch", "triton") for s in (False, True)]


def run_case(case: Case, rows, args, timing) -> list[dict]:
    matrix_bytes = 4 * case.batch * case.bank
    results = measure_rows(case, rows, args, timing, make_inputs(case), matrix_bytes, __file__, case_args)
    finish(results, "naive")
    results += update_rows(case, timing)
    return results


def update_rows(case: Case, timing) -> list[dict]:
    """MemoryBank.update of B rows against NPID's official update (both on the same bank copy)."""
    from moco_fast import MemoryBank
    from moco_fast.reference import reference_memory_bank_update

    f, bank, idx = make_inputs(case)
    f = f.detach()
    out = []
    official = bank.clone()
    fn = functools.partial(reference_memory_bank_update, official, idx, f, 0.5)
    t = mb.time_fn(fn, case.device, **timing)
    out.append({"row": "update[npid-official]", **case.fields(), "update_s": t["median_s"], "status": "ok"})
    for backend in ("torch", "triton"):
        try:
            bank_op = MemoryBank(case.bank, case.dim, 0.5, case.dtype, backend=backend, device=case.device)
        except Exception as exc:  # noqa: BLE001
            out.append({"row": f"update[{backend}]", **case.fields(), "status": f"skipped: {exc}"})
            continue
        if backend == "triton" and case.device.type != "cuda":
            out.append({"row": f"update[{backend}]", **case.fields(), "status": "skipped: CUDA only"})
            continue
        bank_op.bank.copy_(bank)
        check = bank.clone()
        bank_op.update(idx, f)
        reference_memory_bank_update(check, idx, f, 0.5)
        err = (bank_op.bank.float() - check.float()).abs().max().item()
        t = mb.time_fn(functools.partial(bank_op.update, idx, f), case.device, **timing)
        out.append(
            {
                "row": f"update[{backend}]",
                **case.fields(),
                "update_s": t["median_s"],
                "max_abs_err": err,
                "status": "ok" if err < 1e-5 else "FAIL",
            }
        )
    return out


def case_args(case: Case) -> list[str]:
    return [
        "--device",
        str(case.device),
        "--dtype",
        common.dtype_name(case.dtype),
        "-B",
        str(case.batch),
        "-N",
        str(case.bank),
        "-d",
        str(case.dim),
        "--threads",
        str(torch.get_num_threads()),
    ]


def memory_child(args) -> None:
    case = cases(args)[0]
    row = next(r for r in loss_rows() if r.name == args._memory_child)
    tiny = Case(3, 17, case.dim, case.dtype, case.device, case.temperature)
    row.fwd_bwd(row.setup(tiny), *make_inputs(tiny, seed=1))
    inputs = make_inputs(case)
    state = row.setup(case)
    peak, _ = mb.cpu_peak_extra(functools.partial(row.fwd_bwd, state, *inputs))
    print(json.dumps({"peak_extra_bytes": peak}))


def cases(args) -> list[Case]:
    device = common.pick_device(args.device)
    return [Case(args.batch, n, args.dim, common.parse_dtype(args.dtype), device) for n in args.bank]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_run_args(p, repeats="CPU 7, GPU 30", warmup="CPU 0, GPU 5", budget="CPU 6, GPU 0.5")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("-B", "--batch", type=int, default=256)
    p.add_argument("-N", "--bank", type=int, nargs="+", default=[1_000_000], help="bank rows (default 1,000,000)")
    p.add_argument("-d", "--dim", type=int, default=128)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--_memory-child", dest="_memory_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*TRITON_INTERPRET.*")
    if args._memory_child:
        memory_child(args)
        return 0
    todo = cases(args)
    device = todo[0].device
    timing = timing_defaults(args, device.type == "cuda")
    machine = common.announce("memory_bank", device)
    results = []
    for case in todo:
        results += run_case(case, loss_rows(), args, timing)
    losses = [r for r in results if not r["row"].startswith("update")]
    text = table(losses, "naive", lambda r: f"{r['B']}/{r['N']}/{r['d']}/{r['dtype']}")
    for r in results:
        if r["row"].startswith("update"):
            text += f"\n{r['row']:24s} B={r['B']} N={r['N']}: {mb.fmt_time(r.get('update_s'))}  {r['status']}"
    return common.finish("memory_bank", results, text, machine, timing, args, argv)


if __name__ == "__main__":
    sys.exit(main())
