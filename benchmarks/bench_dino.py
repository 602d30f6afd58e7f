#!/usr/bin/env python
"""DINO's loss with its last layer, materialized vs fused; and SwAV's Sinkhorn, lightly's vs the log domain.

DINO (default): every row computes the same loss — the student's S crops and the teacher's T global crops
of B images as bottleneck features (B, b), the last layer W (P, b), lightly's DINOLoss value — and its
gradients to the student features and to W, on the same inputs; each row is checked against the float64
formulation (moco_fast.reference, autograd) before it is timed, and its relative errors are reported.

* ``materialized``: what a lightly user runs: logits h·Wᵀ (student with grad, teacher under no_grad), then
  ``lightly.loss.DINOLoss`` (stack, softmax, log_softmax, einsum), autograd backward. The baseline.
* ``moco_fast.DINOLoss``: the same logits into moco_fast's lightly-compatible DINOLoss (fp32 math).
* ``dino_loss[torch]``: moco_fast.dino_loss(h_s, h_t, W, center, teacher_prototypes=W_t) — never the
  (B·crops, P) logits (two softmax-weighted sweeps over W, a blockwise recompute for dW).

Metrics: median fwd+bwd time after warm-up (perf_counter; CUDA events on a GPU), the ratio to the baseline
inside one run, GFLOP/s of useful work (the materialized path's three GEMMs, 2·(R_s + R_t)·P·b + 4·R_s·P·b
flops, for every row), and the peak extra memory of the first call in a fresh process per row (VmHWM above the RSS
once the inputs exist; GPU: max_memory_allocated above the inputs), also net of the gradients the call
returns (dW (P, b) and dh — the same bytes in every row).

SwAV (``--sinkhorn``): lightly's ``sinkhorn`` (exp domain) against ``moco_fast.sinkhorn`` (log domain) on
(N, P) scores of trained-like features (each within cos ≈ 0.97 of one prototype), fp32 at ε = 0.05 and 0.01,
bf16 and fp16 inputs, 3 iterations; the rows say whether the codes are finite and their error against the
float64 exp-domain algorithm on the same (rounded) scores.

Examples::

    python benchmarks/bench_dino.py --threads 1 --json benchmarks/results/cpu_dino_1thread.json
    python benchmarks/bench_dino.py --quick                       # P = 8192: a smoke run
    python benchmarks/bench_dino.py --sinkhorn --threads 1 --json benchmarks/results/cpu_sinkhorn_1thread.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from moco_fast import benchmarking as mb  # noqa: E402

ROWS = ("materialized", "moco_fast.DINOLoss", "dino_loss[torch]")


def make_inputs(args, device: torch.device, seed: int = 0):
    """Unit bottleneck features (the DINO head's), unit prototypes (g = 1), a non-trivial center."""
    g = torch.Generator().manual_seed(seed)
    dtype = common.parse_dtype(args.dtype)

    def unit(n):
        return F.normalize(torch.randn(n, args.bottleneck, generator=g), dim=1).to(device, dtype)

    crops = args.global_crops + args.local_crops
    student = [unit(args.batch) for _ in range(crops)]
    teacher = [unit(args.batch) for _ in range(args.global_crops)]
    w, w_t = unit(args.prototypes), unit(args.prototypes)
    center = (0.1 * torch.randn(args.prototypes, generator=g)).to(device)
    return student, teacher, w, w_t, center


def _logit_loss(loss_fn):
    def run(student, teacher, w, w_t, center):
        with torch.no_grad():
            t_logits = [h @ w_t.T for h in teacher]
        return loss_fn(t_logits, [h @ w.T for h in student])

    return run


def row_fn(name: str, args):
    """(fn(student, teacher, w, w_t, center) -> loss, prepare(center) -> None) for one row."""
    if name == "materialized":
        from lightly.loss import DINOLoss as LightlyDINOLoss

        loss_fn = LightlyDINOLoss(args.prototypes, warmup_teacher_temp_epochs=0)
    elif name == "moco_fast.DINOLoss":
        from moco_fast import DINOLoss

        loss_fn = DINOLoss(args.prototypes, warmup_teacher_temp_epochs=0)
    elif name == "dino_loss[torch]":
        from moco_fast import dino_loss

        def fused(student, teacher, w, w_t, center):
            return dino_loss(student, teacher, w, center, teacher_prototypes=w_t, backend="torch")

        return fused, lambda center: None
    else:
        raise ValueError(f"unknown row {name!r}; choose from {', '.join(ROWS)}")

    def prepare(center):  # the same center in every row (lightly's starts at zero and moves each call)
        loss_fn.center.copy_(center.reshape(loss_fn.center.shape))

    return _logit_loss(loss_fn), prepare


def fwd_bwd(fn, prepare, student, teacher, w, w_t, center):
    """One call: loss, then the gradients of the student features and W (fresh tensors, .grad cleared)."""
    prepare(center)
    for t in (*student, w):
        t.grad = None
    loss = fn(student, teacher, w, w_t, center)
    loss.backward()
    return loss.detach(), [h.grad for h in student], w.grad


def _inputs_with_grad(args, device):
    student, teacher, w, w_t, center = make_inputs(args, device)
    for t in (*student, w):
        t.requires_grad_(True)
    return student, teacher, w, w_t, center


def child(args) -> None:
    """One row's peak extra memory, first call in this fresh process; prints one JSON line."""
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    fn, prepare = row_fn(args.child, args)
    inputs = _inputs_with_grad(args, device)
    grads_bytes = sum(t.numel() * t.element_size() for t in (*inputs[0], inputs[2]))
    if device.type == "cuda":
        peak, _ = mb.cuda_peak_extra(lambda: fwd_bwd(fn, prepare, *inputs), device)
    else:
        peak, _ = mb.cpu_peak_extra(lambda: fwd_bwd(fn, prepare, *inputs))
    print(json.dumps({"row": args.child, "peak_extra_bytes": peak, "grads_bytes": grads_bytes}))


def reference64(student, teacher, w, w_t, center):
    """(loss, dh, dW) in float64 by the materialized formulation (moco_fast.reference) and autograd."""
    from moco_fast.reference import reference_dino_loss

    hs = [h.detach().double().requires_grad_() for h in student]
    w64 = w.detach().double().requires_grad_()
    with torch.no_grad():
        t_logits = [h.double() @ w_t.double().T for h in teacher]
    loss = reference_dino_loss(t_logits, [h @ w64.T for h in hs], center.double())
    grads = torch.autograd.grad(loss, [*hs, w64])
    return loss.detach(), list(grads[:-1]), grads[-1]


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_dino(args) -> dict:
    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    R_s, R_t = args.batch * (args.global_crops + args.local_crops), args.batch * args.global_crops
    P, b = args.prototypes, args.bottleneck
    flops = 2 * (R_s + R_t) * P * b + 4 * R_s * P * b  # the materialized path's three GEMMs
    print(
        f"DINO loss + last layer, fwd+bwd: P={P}, b={b}, {args.global_crops} global + {args.local_crops} local crops "
        f"x {args.batch} images ({R_s} student rows, {R_t} teacher rows), {args.dtype}, {device}, "
        f"{torch.get_num_threads()} thread(s); logits alone: {mb.fmt_bytes(4 * (R_s + R_t) * P)} fp32"
    )
    inputs = _inputs_with_grad(args, device)
    ref = reference64(*inputs)
    results = []
    for name in args.rows:
        fn, prepare = row_fn(name, args)
        loss, dh, dw = fwd_bwd(fn, prepare, *inputs)
        err = {
            "loss_rel_err": abs(float(loss) - float(ref[0])) / abs(float(ref[0])),
            "dh_rel_err": max(_rel(x, y) for x, y in zip(dh, ref[1])),
            "dw_rel_err": _rel(dw, ref[2]),
        }
        # lightly's loss value drifts with B·P (one fp32 einsum over B·P products per view pair: 3e-3 at
        # P = 65536); its gradients do not. A row is wrong beyond that.
        if err["loss_rel_err"] > 1e-2 or err["dh_rel_err"] > 1e-3 or err["dw_rel_err"] > 1e-3:
            raise SystemExit(f"{name} disagrees with the float64 reference: {err}")
        timing = mb.time_fn(
            lambda fn=fn, prepare=prepare: fwd_bwd(fn, prepare, *inputs),
            device,
            warmup=args.warmup,
            repeats=args.repeats,
            budget_s=args.budget,
        )
        mem = mb.run_child([os.path.abspath(__file__), *_child_args(args), "--child", name])
        row = {"row": name, "loss": float(loss), **err, **timing, **mem, "gflops": flops / timing["median_s"] / 1e9}
        results.append(row)
    base = results[0]
    for row in results:
        row["speedup"] = mb.ratio(base["median_s"], row["median_s"])
        if "peak_extra_bytes" in row and "peak_extra_bytes" in base:
            row["memory_ratio"] = mb.ratio(base["peak_extra_bytes"], row["peak_extra_bytes"])
            net, base_net = row["peak_extra_bytes"] - row["grads_bytes"], base["peak_extra_bytes"] - base["grads_bytes"]
            row["peak_extra_net_bytes"] = net
            row["memory_ratio_net"] = mb.ratio(base_net, max(net, 1))
    table = [
        {
            "row": r["row"],
            "fwd+bwd": mb.fmt_time(r["median_s"]),
            "speedup": mb.fmt_ratio(r["speedup"]),
            "GFLOP/s": f"{r['gflops']:.0f}",
            "peak extra": mb.fmt_bytes(r.get("peak_extra_bytes")),
            "mem ratio": mb.fmt_ratio(r.get("memory_ratio")),
            "net of grads": mb.fmt_bytes(r.get("peak_extra_net_bytes")),
            "net ratio": mb.fmt_ratio(r.get("memory_ratio_net")),
            "loss err": mb.fmt_err(r["loss_rel_err"]),
            "dW err": mb.fmt_err(r["dw_rel_err"]),
            "dh err": mb.fmt_err(r["dh_rel_err"]),
        }
        for r in results
    ]
    cols = [(k, k) for k in table[0]]
    print(mb.format_table(table, cols))
    case = dict(
        prototypes=P, bottleneck=b, batch=args.batch, global_crops=args.global_crops, local_crops=args.local_crops
    )
    return {"case": dict(case, dtype=args.dtype), "rows": results}


def _child_args(args) -> list[str]:
    return [
        "--device", args.device, "--dtype", args.dtype, "--prototypes", str(args.prototypes),
        "--bottleneck", str(args.bottleneck), "--batch", str(args.batch), "--global-crops", str(args.global_crops),
        "--local-crops", str(args.local_crops), *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip


def bench_sinkhorn(args) -> dict:
    from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

    from moco_fast import sinkhorn
    from moco_fast.reference import reference_sinkhorn

    device = common.pick_device(args.device)
    common.set_threads(args.threads)
    rows = []
    g = torch.Generator().manual_seed(0)
    for n, p in args.sinkhorn_sizes:
        # Trained-like features: each near one prototype (cos ≈ 0.97), as SwAV's are after a few epochs.
        c = F.normalize(torch.randn(p, 128, generator=g), dim=1)
        assign = torch.randint(0, p, (n,), generator=g)
        z = F.normalize(c[assign] + 0.02 * torch.randn(n, 128, generator=g), dim=1)
        scores32 = (z @ c.T).to(device)
        for dtype_name, eps in (("fp32", 0.05), ("fp32", 0.01), ("bf16", 0.05), ("fp16", 0.05)):
            scores = scores32.to(common.parse_dtype(dtype_name))
            exact = reference_sinkhorn(scores.double(), 3, eps)
            for name, fn in (("lightly", lightly_sinkhorn), ("moco_fast", sinkhorn)):
                codes = fn(scores, 3, eps)
                finite = bool(torch.isfinite(codes).all())
                err = _rel(codes, exact) if finite else None
                timing = mb.time_fn(
                    lambda fn=fn, s=scores, e=eps: fn(s, 3, e), device, warmup=args.warmup, repeats=args.repeats
                )
                rows.append(
                    dict(N=n, P=p, dtype=dtype_name, epsilon=eps, impl=name, finite=finite, rel_err=err, **timing)
                )
    base = {(r["N"], r["P"], r["dtype"], r["epsilon"]): r["median_s"] for r in rows if r["impl"] == "lightly"}
    for r in rows:
        r["time_vs_lightly"] = mb.ratio(r["median_s"], base[(r["N"], r["P"], r["dtype"], r["epsilon"])])
    table = [
        {
            "N x P": f"{r['N']} x {r['P']}",
            "dtype": r["dtype"],
            "eps": r["epsilon"],
            "impl": r["impl"],
            "time": mb.fmt_time(r["median_s"]),
            "vs lightly": mb.fmt_ratio(r["time_vs_lightly"]),
            "finite": r["finite"],
            "err vs fp64": mb.fmt_err(r["rel_err"]),
        }
        for r in rows
    ]
    print(f"Sinkhorn, 3 iterations, {device}, {torch.get_num_threads()} thread(s)")
    print(mb.format_table(table, [(k, k) for k in table[0]]))
    return {"rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_run_args(p, repeats="7", warmup="1", budget="30 s", quick="P = 8192 instead of 65536")
    p.add_argument("--prototypes", type=int, default=65536, help="P (default 65536)")
    p.add_argument("--bottleneck", type=int, default=256, help="b (default 256)")
    p.add_argument("--batch", type=int, default=128, help="images per crop (default 128)")
    p.add_argument("--global-crops", type=int, default=2)
    p.add_argument("--local-crops", type=int, default=4)
    p.add_argument("--dtype", default="fp32", help="features and prototypes: fp32 (default) | bf16 | fp16")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--sinkhorn", action="store_true", help="benchmark SwAV's Sinkhorn instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.budget = args.budget or 30.0
    if args.quick and args.prototypes == 65536:
        args.prototypes = 8192
    args.sinkhorn_sizes = [(256, 3000), (4096, 3000)] if not args.quick else [(256, 3000)]
    if args.child:
        child(args)
        return 0
    payload = bench_sinkhorn(args) if args.sinkhorn else bench_dino(args)
    payload["machine"] = common.machine_info(common.pick_device(args.device))
    payload["command"] = "python benchmarks/bench_dino.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.json:
        common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
