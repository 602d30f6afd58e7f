"""InfoNCE — ``moco_fast.info_nce`` and the backends' contract functions — against float64 math, on every backend.

The oracle is tests/oracle.py (plain float64 torch math). Inputs are rounded to their dtype first and the
oracle sees the same rounded values upcast, so the only error measured is the implementation's own.

Two error models:

* The exact backends ("torch", "reference": all arithmetic fp32, fp64 for fp64) are held to
  ||out - ref|| <= rtol·||ref|| + atol with rtol 1e-6 and an atol of a few ulps of the logit magnitude
  bound S_i = |q_i|·max|x|/T (oracle.infonce_error_scales); bf16 gradients must be the float64 gradient
  rounded once (within one bf16 ulp). The big grids run on these two only: the interpreter is too slow
  for them and the kernels round the probabilities for half-precision dots (docs/design.md "Numerics").
* Every backend (torch, reference, triton, cuda) meets the design's tolerances on the contract functions
  and the public op: fp32 1e-5, bf16/fp16 1e-2 relative, elementwise within 30x, rank exact up to
  negatives within 1e-4 of a tie — and exact when the tie is exact (test_exact_ties_*).

The tests named *_gpu_* run the full sizes on CUDA (skipped here); each names the backend it covers.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import EXACT_BACKENDS, contract, infonce_inputs, no_host_sync, poison_allocator, requires_cuda, rows
from oracle import (
    assert_close_norm,
    assert_infonce_forward,
    assert_rounded_once,
    bf16_ulp,
    check_rank,
    hadamard,
    infonce_backward,
    infonce_backward_negatives,
    infonce_error_scales,
    infonce_forward,
    infonce_forward_chunked,
    infonce_grads,
    rel,
)

import moco_fast
from moco_fast.reference import info_nce_logits, reference_info_nce, topk_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL32 = 1e-6
TEMP = 0.07

BATCHES = (1, 7, 37, 256)
NUM_KEYS = (0, 1, 1000, 4099)
DIMS = (16, 96, 128)
TEMPERATURES = (0.02, 0.07, 0.2, 1.0)
DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "fp32q_bf16neg": (torch.float32, torch.float32, torch.bfloat16),
}
exact_backends = pytest.mark.parametrize("backend", EXACT_BACKENDS, indirect=True)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def oracle(q, k, n, temperature, *, grad_negatives=False):
    """float64 loss (B,), lse (B,), logits and the gradients of sum(loss) wrt q, k (and n)."""
    ref = infonce_forward(q, k, n, 1.0 / temperature)
    dq, dk, dn = infonce_grads(q, k, n, 1.0 / temperature, negatives=grad_negatives)
    return {"loss": ref.loss, "lse": ref.lse, "logits": ref.logits, "dq": dq, "dk": dk, "dn": dn}


def check_grad(out, ref, dtype, scales, name, tag=""):
    assert out.dtype == dtype, f"{name} {tag}: dtype {out.dtype}, expected {dtype}"
    if ref.numel() == 0:
        assert out.shape == ref.shape
        return
    if dtype == torch.float32 or dtype == torch.float64:
        assert_close_norm(out, ref, RTOL32, scales[name], f"{name} {tag}")
    else:
        assert_rounded_once(out, ref, scales["dn_elem" if name == "dn" else "elem"], f"{name} {tag}")


def run(q, k, n, temperature, backend, *, grad_negatives=False, reduction="none"):
    qq = q.detach().clone().requires_grad_()
    kk = k.detach().clone().requires_grad_()
    nn_ = n.detach().clone().requires_grad_(grad_negatives)
    loss = moco_fast.info_nce(qq, kk, nn_, temperature, reduction=reduction, backend=backend)
    loss.sum().backward()
    return loss.detach(), qq.grad, kk.grad, nn_.grad


def check_against_oracle(q, k, n, temperature, backend, *, grad_negatives=False, tag=""):
    ref = oracle(q, k, n, temperature, grad_negatives=grad_negatives)
    scales = infonce_error_scales(q, k, n, temperature)
    loss, dq, dk, dn = run(q, k, n, temperature, backend, grad_negatives=grad_negatives)
    assert loss.dtype == torch.float32, tag
    assert_close_norm(loss, ref["loss"], RTOL32, scales["loss"], f"loss {tag}")
    check_grad(dq, ref["dq"], q.dtype, scales, "dq", tag)
    check_grad(dk, ref["dk"], k.dtype, scales, "dk", tag)
    if grad_negatives:
        check_grad(dn, ref["dn"], n.dtype, scales, "dn", tag)
    else:
        assert dn is None
    return loss, dq, dk, dn


TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def tol_for(*dts):
    return max(TOL[t] for t in dts)


def forward(backend, q, k, n, scale, need_rank=True, *, triton=None):
    """The backend's contract forward. ``triton``: overrides of the Triton launcher's plan (a forced split
    count, a tile, fuse) so that its split/combine paths also run at these shapes; the others have no plan."""
    overrides = (triton or {}) if backend == "triton" else {}
    return contract(backend).infonce_forward(q, k, n, scale, need_rank, **overrides)


def check_forward(backend, q, k, n, scale, tol, *, triton=None):
    """The contract forward against float64 (oracle.assert_infonce_forward); returns its lse, delta, rank."""
    outputs = forward(backend, q, k, n, scale, triton=triton)
    assert_infonce_forward(outputs, q, k, n, scale, tol)
    return outputs[1:]


# ------------------------------------------------------------------------------------------------
# the public op, exact backends: loss and gradients vs float64 math and vs the reference
# ------------------------------------------------------------------------------------------------


SMALL_BATCHES = tuple(b for b in BATCHES if b <= 37)
SMALL_NUM_KEYS = tuple(k for k in NUM_KEYS if k <= 1000)
# The largest sizes (B = 256 or K = 4099) cost ~0.3 s a case on 2 cores: targeted cases that still
# cover every B, K, d and T value at least once.
LARGE_CASES = [
    (256, 4099, 128, 0.07),
    (256, 4099, 16, 0.02),
    (256, 4099, 96, 1.0),
    (256, 1000, 96, 0.2),
    (256, 1, 128, 0.02),
    (256, 0, 16, 0.07),
    (37, 4099, 128, 0.02),
    (7, 4099, 96, 0.2),
    (1, 4099, 16, 1.0),
]


@exact_backends
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("normalized", [True, False], ids=["unit", "raw"])
def test_matches_float64_small_grid(backend, dtypes, normalized):
    """The full product of B in (1, 7, 37), K in (0, 1, 1000), every d and T; unit vectors (MoCo)
    and raw Gaussian rows (larger logits)."""
    dq_t, dk_t, dn_t = DTYPES[dtypes]
    for batch, num_keys, dim, temperature in itertools.product(SMALL_BATCHES, SMALL_NUM_KEYS, DIMS, TEMPERATURES):
        q = rows(batch, dim, dq_t, normalized)
        k = rows(batch, dim, dk_t, normalized)
        n = rows(num_keys, dim, dn_t, normalized)
        tag = f"B={batch} K={num_keys} d={dim} T={temperature} {dtypes} {'unit' if normalized else 'raw'}"
        check_against_oracle(q, k, n, temperature, backend, tag=tag)


@exact_backends
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("case", LARGE_CASES, ids=lambda c: "B{}-K{}-d{}-T{}".format(*c))
def test_matches_float64_large(backend, dtypes, case):
    batch, num_keys, dim, temperature = case
    dq_t, dk_t, dn_t = DTYPES[dtypes]
    normalized = (batch + num_keys + dim) % 2 == 0  # alternate unit / raw rows across cases
    q = rows(batch, dim, dq_t, normalized)
    k = rows(batch, dim, dk_t, normalized)
    n = rows(num_keys, dim, dn_t, normalized)
    check_against_oracle(q, k, n, temperature, backend, tag=f"{case} {dtypes}")


@exact_backends
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_negatives_gradient_matches_float64(backend, dtypes):
    """When the negatives require grad (rare), their gradient is right too."""
    dq_t, dk_t, dn_t = DTYPES[dtypes]
    cases = [(b, kk, d, t) for b, kk, d, t in itertools.product((1, 7, 37), (1, 1000), (16, 128), (0.02, 1.0))] + [
        (256, 4099, 128, 0.07),
        (7, 0, 16, 0.07),
    ]
    for batch, num_keys, dim, temperature in cases:
        q, k, n = rows(batch, dim, dq_t), rows(batch, dim, dk_t), rows(num_keys, dim, dn_t)
        tag = f"B={batch} K={num_keys} d={dim} T={temperature} {dtypes}"
        check_against_oracle(q, k, n, temperature, backend, grad_negatives=True, tag=tag)


@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("grad_negatives", [False, True])
def test_torch_backend_matches_reference(dtypes, grad_negatives):
    """The chunked backend and moco_fast.reference.reference_info_nce agree (both fp32)."""
    dq_t, dk_t, dn_t = DTYPES[dtypes]
    for batch, num_keys, dim, temperature in [
        (1, 1, 16, 0.07),
        (7, 1000, 96, 0.2),
        (37, 4099, 128, 0.02),
        (256, 1000, 128, 1.0),
        (256, 4099, 128, 0.07),
    ]:
        q, k, n = rows(batch, dim, dq_t), rows(batch, dim, dk_t), rows(num_keys, dim, dn_t)
        scales = infonce_error_scales(q, k, n, temperature)
        loss, dq, dk, dn = run(q, k, n, temperature, "torch", grad_negatives=grad_negatives)
        qr = q.clone().requires_grad_()
        kr = k.clone().requires_grad_()
        nr = n.clone().requires_grad_(grad_negatives)
        ref_loss, ref_lse, ref_rank = reference_info_nce(qr, kr, nr, temperature, reduction="none")
        ref_loss.sum().backward()
        tag = f"B={batch} K={num_keys} d={dim} T={temperature} {dtypes}"
        assert_close_norm(loss, ref_loss.detach().double(), 2 * RTOL32, 2 * scales["loss"], f"loss {tag}")
        pairs = [("dq", dq, qr.grad), ("dk", dk, kr.grad)] + ([("dn", dn, nr.grad)] if grad_negatives else [])
        for name, ours, theirs in pairs:
            assert ours.dtype == theirs.dtype, name
            if ours.dtype == torch.float32:
                assert_close_norm(ours, theirs.double(), 2 * RTOL32, 2 * scales[name], f"{name} {tag}")
            else:  # both bf16, each rounded once from ~fp32 values: at most 1 ulp apart
                err = (ours.double() - theirs.double()).abs()
                bound = bf16_ulp(theirs.double()) + 2 * scales["dn_elem" if name == "dn" else "elem"]
                assert (err <= bound).all(), f"{name} {tag}"
        _, stats = moco_fast.info_nce(q, k, n, temperature, backend="torch", reduction="none", return_stats=True)
        assert_close_norm(stats.lse, ref_lse.double(), 2 * RTOL32, 2 * scales["lse"], f"lse {tag}")


@exact_backends
def test_float64_inputs_are_float64_accurate(backend):
    """fp64 in → fp64 compute and fp64 loss/grads (what gradcheck relies on)."""
    q, k, n = rows(37, 96, torch.float64), rows(37, 96, torch.float64), rows(1000, 96, torch.float64)
    loss, dq, dk, dn = run(q, k, n, 0.07, backend, grad_negatives=True)
    ref = oracle(q, k, n, 0.07, grad_negatives=True)
    assert loss.dtype == dq.dtype == dk.dtype == dn.dtype == torch.float64
    for name, out in (("loss", loss), ("dq", dq), ("dk", dk), ("dn", dn)):
        assert_close_norm(out, ref[name], 1e-12, 0.0, f"{backend} {name}")


# ------------------------------------------------------------------------------------------------
# numerical stability
# ------------------------------------------------------------------------------------------------


@exact_backends
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_large_logits_are_stable(backend, dtypes):
    """Logits far beyond exp's range (|logit| up to ~1e5) give finite, accurate loss and grads."""
    dq_t, dk_t, dn_t = DTYPES[dtypes]
    for batch, num_keys, dim, temperature, scale in [
        (7, 1000, 128, 0.02, 1.0),  # MoCo-like unit vectors at T=0.02: logits up to 50
        (37, 1000, 96, 0.02, 10.0),  # raw rows of norm ~100: logits ~1e4..1e5
        (256, 4099, 128, 0.02, 3.0),
        (7, 1, 16, 0.02, 30.0),
    ]:
        q = rows(batch, dim, dq_t, normalized=False, scale=scale)
        k = rows(batch, dim, dk_t, normalized=False, scale=scale)
        n = rows(num_keys, dim, dn_t, normalized=False, scale=scale)
        logits = infonce_forward(q, k, n, 1 / temperature).logits
        assert logits.abs().max() > 80, "the case must overflow a naive exp"
        tag = f"B={batch} K={num_keys} d={dim} scale={scale} {dtypes}"
        loss, dq, dk, _ = check_against_oracle(q, k, n, temperature, backend, tag=tag)
        assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()


@exact_backends
def test_positive_dominant_and_hopeless_rows(backend):
    """Rows whose positive wins by a huge margin (loss ~ 0) and rows where it loses by a huge margin."""
    dim = 64
    q = rows(8, dim, torch.float32)
    k = q.clone()
    k[4:] = -q[4:]  # rows 4..7: the positive is the worst logit
    n = rows(300, dim, torch.float32)
    loss, dq, dk, _ = check_against_oracle(q, k, n, 0.02, backend, tag="dominant")
    assert (loss[:4] >= 0).all() and (loss[:4] < 1e-6).all()
    assert (loss[4:] > 50).all()


# ------------------------------------------------------------------------------------------------
# K = 0, reductions, gradcheck
# ------------------------------------------------------------------------------------------------


@exact_backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalized", [True, False], ids=["unit", "raw"])
def test_no_negatives_gives_zero_loss_and_finite_grads(backend, dtype, normalized):
    """K = 0: the row is just the positive, so loss_i = 0 exactly and dq = 0 (O_i = k_i)."""
    for batch, dim, temperature in [(1, 16, 0.07), (7, 96, 0.02), (256, 128, 1.0)]:
        q, k = rows(batch, dim, dtype, normalized, 3.0), rows(batch, dim, dtype, normalized, 3.0)
        n = torch.empty(0, dim, dtype=dtype)
        loss, dq, dk, dn = run(q, k, n, temperature, backend, grad_negatives=True)
        assert loss.shape == (batch,) and dn.shape == (0, dim)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()
        assert torch.equal(loss, torch.zeros_like(loss)), f"K=0 loss {loss.abs().max():.3e}"
        assert torch.equal(dq, torch.zeros_like(dq))
        # dk is mathematically 0 too; allow the rounding of one fp32 logit (see the strict test below)
        scales = infonce_error_scales(q, k, n, temperature)
        assert dk.double().abs().max() <= scales["elem"], f"K=0 dk {dk.abs().max():.3e}"
        for reduction in ("mean", "sum"):
            red = moco_fast.info_nce(q, k, n, temperature, reduction=reduction, backend=backend)
            assert red.shape == () and red.item() == 0.0


@exact_backends
def test_no_negatives_gives_exactly_zero_key_gradient(backend):
    """With K = 0, p0 = 1 exactly, so dk = (p0 − 1)·q/T must be exactly 0 (the reference gives 0)."""
    q, k = rows(256, 128, torch.float32, False, 3.0), rows(256, 128, torch.float32, False, 3.0)
    _, _, dk, _ = run(q, k, torch.empty(0, 128), 0.02, backend)
    assert torch.equal(dk, torch.zeros_like(dk)), f"dk max {dk.abs().max():.3e}"


@exact_backends
def test_reductions(backend):
    q, k, n = rows(37, 96, torch.float32), rows(37, 96, torch.float32), rows(1000, 96, torch.float32)
    ref = oracle(q, k, n, 0.07)
    scales = infonce_error_scales(q, k, n, 0.07)
    per_row = moco_fast.info_nce(q, k, n, 0.07, reduction="none", backend=backend)
    assert per_row.shape == (37,) and per_row.dtype == torch.float32
    for reduction, factor in (("mean", 1 / 37), ("sum", 1.0)):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = moco_fast.info_nce(qq, kk, n, 0.07, reduction=reduction, backend=backend)
        assert loss.shape == () and loss.dtype == torch.float32
        expected = ref["loss"].mean() if reduction == "mean" else ref["loss"].sum()
        assert abs(loss.item() - expected.item()) <= RTOL32 * abs(expected.item()) + scales["loss"]
        assert torch.allclose(loss, per_row.mean() if reduction == "mean" else per_row.sum(), rtol=1e-6)
        loss.backward()
        assert_close_norm(qq.grad, ref["dq"] * factor, RTOL32, scales["dq"] * factor, f"{reduction} dq")
        assert_close_norm(kk.grad, ref["dk"] * factor, RTOL32, scales["dk"] * factor, f"{reduction} dk")
    # a non-uniform upstream gradient on the per-row losses
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    weights = torch.rand(37, dtype=torch.float64) + 0.5
    (moco_fast.info_nce(qq, kk, n, 0.07, reduction="none", backend=backend) * weights.float()).sum().backward()
    dq64, dk64, _ = infonce_grads(q, k, n, 1 / 0.07, weights, negatives=False)
    assert_close_norm(qq.grad, dq64, RTOL32, 2 * scales["dq"], "weighted dq")
    assert_close_norm(kk.grad, dk64, RTOL32, 2 * scales["dk"], "weighted dk")


@exact_backends
@pytest.mark.parametrize("num_keys", [0, 1, 13])
def test_gradcheck_float64(backend, num_keys):
    q = rows(5, 6, torch.float64).requires_grad_()
    k = rows(5, 6, torch.float64).requires_grad_()
    n = rows(num_keys, 6, torch.float64).requires_grad_()
    for reduction in ("none", "mean", "sum") if backend == "torch" else ("none",):
        fn = lambda a, b, c, r=reduction: moco_fast.info_nce(a, b, c, 0.3, reduction=r, backend=backend)
        assert torch.autograd.gradcheck(fn, (q, k, n), eps=1e-6, atol=1e-8, rtol=1e-6)
        # negatives without grad: the fast path that never reads them in the backward
        fn2 = lambda a, b, r=reduction: moco_fast.info_nce(a, b, n.detach(), 0.3, reduction=r, backend=backend)
        assert torch.autograd.gradcheck(fn2, (q, k), eps=1e-6, atol=1e-8, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# the backward never reads negatives that need no gradient
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_backward_does_not_read_negatives(dtypes):
    """Overwrite the negatives in place (as an enqueue right after the forward does): same grads."""
    dq_t, dk_t, dn_t = DTYPES[dtypes]
    for batch, num_keys, dim in [(7, 1000, 96), (256, 4099, 128)]:
        q, k, n = rows(batch, dim, dq_t), rows(batch, dim, dk_t), rows(num_keys, dim, dn_t)
        _, dq_ref, dk_ref, _ = run(q, k, n, 0.07, "torch")
        for poison in (float("nan"), 0.0, None):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            negatives = n.clone()
            loss = moco_fast.info_nce(qq, kk, negatives, 0.07, backend="torch")
            if poison is None:
                negatives.copy_(rows(num_keys, dim, dn_t))
            else:
                negatives.fill_(poison)
            (loss * batch).backward()  # reduction "mean" × B = the per-row sum of run()
            assert torch.equal(qq.grad, dq_ref)
            assert torch.equal(kk.grad, dk_ref)


def test_backward_does_not_read_negatives_on_every_backend(backend, device):
    """The same contract on every backend (small sizes): NaN-poisoned negatives after the forward."""
    q, k, n = infonce_inputs(7, 63, 16, device=device)
    grads = []
    for poison in (None, float("nan")):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        negatives = n.clone()
        loss = moco_fast.info_nce(qq, kk, negatives, TEMP, backend=backend)
        if poison is not None:
            negatives.fill_(poison)
        loss.backward()
        grads.append((qq.grad, kk.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_backward_with_negatives_grad_reads_them_after_forward():
    """The other side of the contract: when they need grad the negatives ARE used by the backward,
    so an in-place write is caught by autograd's version counter instead of giving wrong grads."""
    q, k = rows(7, 16, torch.float32).requires_grad_(), rows(7, 16, torch.float32)
    n = rows(50, 16, torch.float32).requires_grad_()
    negatives = n * 1.0  # non-leaf, so it can be written in place
    loss = moco_fast.info_nce(q, k, negatives, 0.07, backend="torch")
    with torch.no_grad():
        negatives.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------------------------------------
# stats: rank, acc@1/acc@5, lse
# ------------------------------------------------------------------------------------------------


def separated_batch(batch, num_keys, dim, temperature, gap=1e-5):
    """q, k, negatives with positives of varied strength and no near-ties with the positive logit
    (|q·n_j − q·k| > gap for every j, far above fp32 rounding), so every rank is unambiguous.
    (Exact ties have their own tests: test_exact_ties_*.)"""
    q = rows(batch, dim, torch.float32)
    n = rows(num_keys, dim, torch.float32)
    sigma = torch.linspace(0.1, 3.0, batch)[:, None]
    k = F.normalize(q + sigma * torch.randn(batch, dim), dim=1)
    for _ in range(100):
        scores = q.double() @ n.double().T - (q.double() * k.double()).sum(1, keepdim=True)
        tied = (scores.abs() <= gap).any(dim=1)
        if not tied.any():
            return q, k, n, infonce_forward(q, k, n, 1 / temperature).logits
        k[tied] = F.normalize(q[tied] + sigma[tied] * torch.randn(int(tied.sum()), dim), dim=1)
    raise AssertionError("could not draw a separated batch")


@exact_backends
@pytest.mark.parametrize("batch,num_keys,dim", [(37, 100, 16), (256, 300, 128), (7, 3, 96), (64, 1, 32)])
def test_stats_match_topk_accuracy(backend, batch, num_keys, dim):
    temperature = 0.07
    q, k, n, logits = separated_batch(batch, num_keys, dim, temperature)
    loss, stats = moco_fast.info_nce(q, k, n, temperature, backend=backend, return_stats=True)
    assert isinstance(stats, moco_fast.InfoNCEStats)
    assert stats.acc1.shape == () and stats.acc1.dtype == torch.float32
    assert stats.acc5.shape == () and stats.acc5.dtype == torch.float32
    assert stats.rank.shape == (batch,) and stats.rank.dtype == torch.int64
    assert stats.lse.shape == (batch,) and stats.lse.dtype == torch.float32
    assert not stats.lse.requires_grad
    expected_rank = (logits[:, 1:] > logits[:, :1]).sum(dim=1)
    assert torch.equal(stats.rank, expected_rank)
    acc1, acc5 = topk_accuracy(logits, (1, 5))
    assert stats.acc1.item() == acc1.item()
    assert stats.acc5.item() == acc5.item()
    if num_keys >= 100:
        # the data must exercise both sides of each threshold, or the check could not fail
        assert 0 < acc1.item() < acc5.item() < 1, (acc1, acc5)
    # also equal on the official fp32 logits
    off1, off5 = topk_accuracy(info_nce_logits(q, k, n, temperature), (1, 5))
    assert stats.acc1.item() == off1.item() and stats.acc5.item() == off5.item()
    scales = infonce_error_scales(q, k, n, temperature)
    ref_lse = torch.logsumexp(logits, dim=1)
    assert_close_norm(stats.lse, ref_lse, RTOL32, scales["lse"], "lse")
    # the loss returned with the stats is the same as without (up to rounding: without stats the
    # torch backend may run PyTorch's fused attention kernel instead of its blockwise loop)
    torch.testing.assert_close(loss, moco_fast.info_nce(q, k, n, temperature, backend=backend), rtol=1e-6, atol=1e-6)


@exact_backends
@pytest.mark.parametrize("dtypes", list(DTYPES))
def test_lse_matches_float64_logsumexp(backend, dtypes):
    dq_t, dk_t, dn_t = DTYPES[dtypes]
    for batch, num_keys, dim, temperature, normalized in [
        (1, 0, 16, 0.07, True),
        (7, 1, 96, 0.02, True),
        (37, 1000, 128, 0.2, False),
        (256, 4099, 128, 0.07, True),
    ]:
        q, k = rows(batch, dim, dq_t, normalized), rows(batch, dim, dk_t, normalized)
        n = rows(num_keys, dim, dn_t, normalized)
        _, stats = moco_fast.info_nce(q, k, n, temperature, backend=backend, reduction="none", return_stats=True)
        ref = oracle(q, k, n, temperature)
        scales = infonce_error_scales(q, k, n, temperature)
        assert stats.lse.dtype == torch.float32
        assert_close_norm(stats.lse, ref["lse"], RTOL32, scales["lse"], f"lse B={batch} K={num_keys}")


def test_stats_with_no_negatives(backend, device):
    q, k = rows(7, 16, torch.float32, device=device), rows(7, 16, torch.float32, device=device)
    _, stats = moco_fast.info_nce(q, k, torch.empty(0, 16, device=device), 0.07, backend=backend, return_stats=True)
    assert torch.equal(stats.rank.cpu(), torch.zeros(7, dtype=torch.int64))
    assert stats.acc1.item() == 1.0 and stats.acc5.item() == 1.0


def _hadamard_rows(dtype, device):
    """16 orthogonal rows of entries ±1/4 (unit norm): every product and every partial sum of a dot
    product is exact in fp32 and bf16, so q_i·k_i == q_i·n_j is an exact tie in any summation order."""
    return (hadamard(16) / 4).to(dtype).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_exact_ties_do_not_count(backend, device, dtype, temperature):
    """q = k = h_i (a Hadamard row) and k itself among the negatives: an exact tie in fp32, so the
    positive is not beaten (rank counts strictly greater logits) — rank 0 and acc1 = 1 on every
    backend, as the reference's ``logits[:, 1:] > logits[:, :1]`` gives. T a power of two keeps the
    scaled logits exact too."""
    h = _hadamard_rows(dtype, device)
    q = k = h[:7]
    negatives = torch.cat([h, -h[3:9], h[:7]])  # every row's own key (twice), others orthogonal or opposite
    ref = infonce_forward(q.cpu(), k.cpu(), negatives.cpu(), 1 / temperature)
    assert torch.equal(ref.rank, torch.zeros(7, dtype=torch.int64))
    assert ((ref.neg == ref.pos[:, None]).sum(1) == 2).all(), "the case must hold exact ties"
    loss, stats = moco_fast.info_nce(q, k, negatives, temperature, backend=backend, return_stats=True)
    assert torch.equal(stats.rank.cpu(), torch.zeros(7, dtype=torch.int64)), stats.rank
    assert stats.acc1.item() == 1.0 and stats.acc5.item() == 1.0
    _, _, _, rank = forward(backend, q, k, negatives, 1 / temperature)
    assert torch.equal(rank.cpu(), ref.rank)
    assert abs(loss.item() - ref.loss.mean().item()) <= 1e-5 * max(1.0, ref.loss.mean().item())
    official_rank = reference_info_nce(q.cpu(), k.cpu(), negatives.cpu(), temperature)[2]
    assert torch.equal(official_rank, ref.rank)  # the official formulation agrees on ties


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_ties_next_to_winners(backend, device, dtype):
    """Exact ties and negatives that beat the positive in one row: only the winners count. Rows 0..2
    are beaten by 2·h_i (logit 2 > 1) and tied by h_i; rows 3..6 are only tied; row 4 is also beaten
    by 2·h_4 twice. Exact ranks [1, 1, 1, 0, 2, 0, 0], acc1 = 3/7, acc5 = 1."""
    h = _hadamard_rows(dtype, device)
    q = k = h[:7]
    negatives = torch.cat([h[:7], 2 * h[:3], -h, 2 * h[4:5], 2 * h[4:5]])
    expected = torch.tensor([1, 1, 1, 0, 2, 0, 0])
    assert torch.equal(infonce_forward(q.cpu(), k.cpu(), negatives.cpu(), 1.0).rank, expected)
    _, stats = moco_fast.info_nce(q, k, negatives, 0.5, backend=backend, return_stats=True)
    assert torch.equal(stats.rank.cpu(), expected), stats.rank
    assert stats.acc1.item() == (expected < 1).float().mean().item() == torch.tensor(3 / 7).item()
    assert stats.acc5.item() == 1.0


def test_backend_argument_is_case_insensitive_and_auto_is_torch_on_cpu():
    q, k, n = rows(7, 16, torch.float32), rows(7, 16, torch.float32), rows(30, 16, torch.float32)
    a = moco_fast.info_nce(q, k, n, 0.1, backend="auto")
    b = moco_fast.info_nce(q, k, n, 0.1, backend="TORCH")
    c = moco_fast.info_nce(q, k, n, 0.1, backend="torch")
    assert torch.equal(a, c) and torch.equal(b, c)
    assert math.isfinite(a.item())


@exact_backends
def test_non_contiguous_inputs(backend):
    base_q, base_k = rows(7, 64, torch.float32), rows(7, 64, torch.float32)
    n = rows(200, 128, torch.float32)[:, ::2]  # strided view, (200, 64)
    q = base_q.T.contiguous().T  # column-major
    k = base_k[:, :].T.contiguous().T
    assert not q.is_contiguous() and not n.is_contiguous()
    check_against_oracle(q, k, n, 0.07, backend, tag=f"non-contiguous {backend}")
    check_against_oracle(q, k, n, 0.07, backend, grad_negatives=True, tag=f"non-contiguous dn {backend}")


# ------------------------------------------------------------------------------------------------
# the contract functions and the public op on every backend (sizes the interpreter can run)
# ------------------------------------------------------------------------------------------------

# A representative subset of B x K x d x dtypes; the last column is the Triton launcher's forced split
# count (its combine path at these shapes; see forward()).
FWD_CASES = [
    # B, K, d, q dtype, k dtype, n dtype, triton num_splits
    (1, 1, 16, torch.float32, None, None, None),
    (1, 1031, 128, torch.float32, None, None, 3),
    (7, 1000, 96, torch.float32, None, None, None),
    (7, 63, 16, torch.float32, None, None, 2),
    (37, 1031, 128, torch.float32, None, None, 5),
    (37, 1000, 96, torch.bfloat16, None, None, 4),
    (130, 63, 128, torch.bfloat16, None, None, None),
    (130, 1031, 16, torch.float16, None, None, 2),
    (37, 1000, 128, torch.float32, torch.float32, torch.bfloat16, 3),  # fp32 q, bf16 queue
    (7, 1031, 96, torch.bfloat16, torch.bfloat16, torch.float32, None),
    (37, 63, 128, torch.float16, torch.bfloat16, torch.bfloat16, None),  # bf16 x fp16 -> fp32
    (130, 1000, 128, torch.float32, torch.bfloat16, torch.float16, 7),
    (7, 300, 256, torch.float32, None, None, 2),
    (5, 1031, 256, torch.bfloat16, None, None, None),
]


@pytest.mark.parametrize("B,K,d,dq,dk,dn,splits", FWD_CASES)
def test_contract_forward_matches_float64(backend, device, B, K, d, dq, dk, dn, splits):
    q, k, n = infonce_inputs(B, K, d, dq, dk, dn, device=device)
    check_forward(backend, q, k, n, 1 / TEMP, tol_for(q.dtype, k.dtype, n.dtype), triton=dict(num_splits=splits))


@pytest.mark.parametrize("B,d,fuse", [(1, 16, None), (7, 96, False), (37, 128, None), (5, 16, True)])
def test_contract_forward_k0_is_positive_only(backend, device, B, d, fuse):
    """K = 0: only the positive; loss exactly 0 (Triton: fused and split+combine paths), lse = scale*q.k."""
    q, k, n = infonce_inputs(B, 0, d, device=device)
    loss, lse, delta, rank = forward(backend, q, k, n, 1 / TEMP, triton=dict(fuse=fuse))
    assert torch.equal(loss, torch.zeros_like(loss))
    pos = (q.double() * k.double()).sum(1) / TEMP
    assert (lse.double() - pos).abs().max().item() < 1e-5
    pos32 = (q.float() * k.float()).sum(1) * torch.tensor(1 / TEMP, dtype=torch.float32)
    assert (lse - pos32).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * pos32.abs().max().item()
    assert torch.equal(delta, torch.zeros_like(delta))  # O = k exactly
    assert (rank == 0).all()


@pytest.mark.parametrize("need_rank", [True, False])
def test_contract_forward_need_rank_accepted(backend, device, need_rank):
    q, k, n = infonce_inputs(7, 63, 16, device=device)
    _, _, _, rank = forward(backend, q, k, n, 1 / TEMP, need_rank)
    assert rank.shape == (7,) and rank.dtype == torch.int64
    if need_rank:
        check_rank(rank, *infonce_forward(q, k, n, 1 / TEMP)[4:6], eps=1e-4)
    else:  # a backend that skips the rank returns -1s, else the rank
        assert (rank == -1).all() or torch.equal(rank.cpu(), infonce_forward(q, k, n, 1 / TEMP).rank)


def test_contract_forward_unnormalized_large_logits(backend, device):
    """Raw (unnormalized) inputs: logits in the hundreds must not overflow exp2."""
    q, k, n = infonce_inputs(7, 1031, 96, normalize=False, device=device)
    check_forward(backend, q, k, n, 3.0, 1e-5, triton=dict(num_splits=3))


def test_contract_forward_rank_with_planted_winners(backend, device):
    """Plant negatives that beat the positive by a clear margin: rank must count them exactly."""
    B, K, d = 7, 200, 16
    q, k, n = infonce_inputs(B, K, d, device=device)
    n = n.clone()
    for i in range(B):  # row i gets i planted negatives = q_i itself (logit 1 > q_i.k_i)
        n[17 * i : 17 * i + i] = q[i]
    plan = None
    if backend == "triton":  # 16 x 16 tiles in 3 splits: the count is summed over tiles and splits
        from moco_fast.kernels import heuristics as H

        plan = dict(num_splits=3, config=H.TileConfig(16, 16, 4, 1))
    _, _, _, rank = forward(backend, q, k, n, 1 / TEMP, triton=plan)
    exact = infonce_forward(q, k, n, 1 / TEMP).rank
    assert torch.equal(rank.cpu(), exact.cpu())
    assert all(rank[i].item() >= i for i in range(B))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_contract_forward_nan_propagates(backend, device):
    """A NaN in q poisons its own row only; a NaN in one queue entry poisons every row."""
    q, k, n = infonce_inputs(9, 500, 64, device=device)
    q2 = q.clone()
    q2[3, 5] = float("nan")
    _, lse, delta, _ = forward(backend, q2, k, n, 10.0)
    assert torch.isnan(lse[3]) and torch.isnan(delta[3]).all()
    assert torch.isfinite(lse[torch.arange(9, device=device) != 3]).all()
    n2 = n.clone()
    n2[123, 0] = float("nan")
    _, lse, delta, _ = forward(backend, q, k, n2, 10.0)
    assert torch.isnan(lse).all() and torch.isnan(delta).all()


BWD_CASES = [
    (1, 63, 16, torch.float32, None, None),
    (7, 1000, 96, torch.float32, None, None),
    (37, 1031, 128, torch.bfloat16, None, None),
    (130, 63, 128, torch.float16, None, None),
    (37, 1000, 128, torch.float32, torch.float32, torch.bfloat16),
    (7, 1, 96, torch.bfloat16, torch.float32, torch.float16),
    (5, 300, 256, torch.float32, None, None),
]


@pytest.mark.parametrize("B,K,d,dq,dk,dn", BWD_CASES)
def test_contract_backward_matches_float64(backend, device, B, K, d, dq, dk, dn):
    q, k, n = infonce_inputs(B, K, d, dq, dk, dn, device=device)
    grad = (torch.rand(B) + 0.5).div(B).to(device)
    impl = contract(backend)
    loss, lse, delta, _ = impl.infonce_forward(q, k, n, 1 / TEMP)
    gq, gk = impl.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    gn = impl.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    rq, rk, rn = infonce_grads(q, k, n, 1 / TEMP, grad)
    assert gq.dtype == q.dtype and gk.dtype == k.dtype and gn.dtype == n.dtype
    assert gq.shape == q.shape and gk.shape == k.shape and gn.shape == n.shape
    tol = tol_for(q.dtype, k.dtype, n.dtype)
    assert rel(gq, rq) < tol, rel(gq, rq)
    assert rel(gk, rk) < tol, rel(gk, rk)
    assert rel(gn, rn) < tol, rel(gn, rn)
    row_err = (gn.double() - rn).norm(dim=1) / rn.norm(dim=1).clamp_min(1e-30)
    assert row_err.max().item() < 30 * tol


def test_contract_backward_expanded_grad_and_k0(backend, device):
    """grad from a mean is an expanded (stride 0) tensor; K = 0 gives dq = 0 ... up to p0 = 1."""
    B, d = 7, 96
    q, k, n = infonce_inputs(B, 0, d, device=device)
    grad = torch.full((1,), 1.0 / B, device=device).expand(B)
    impl = contract(backend)
    loss, lse, delta, _ = impl.infonce_forward(q, k, n, 1 / TEMP)
    gq, gk = impl.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    assert gq.abs().max().item() < 1e-6 and gk.abs().max().item() < 1e-6
    assert impl.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP).shape == (0, d)


def test_contract_backward_negatives_deterministic(backend, device):
    q, k, n = infonce_inputs(37, 1000, 96, device=device)
    grad = torch.ones(37, device=device)
    impl = contract(backend)
    _, lse, _, _ = impl.infonce_forward(q, k, n, 1 / TEMP)
    a = impl.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    b = impl.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "B,K,d,dts",
    [(7, 1000, 96, (torch.float32,) * 3), (37, 63, 128, (torch.bfloat16,) * 3), (5, 0, 16, (torch.float32,) * 3)],
)
def test_public_info_nce_matches_float64(backend, device, B, K, d, dts):
    """moco_fast.info_nce with autograd (every input requiring grad) on the backend: loss, rank, grads."""
    q, k, n = infonce_inputs(B, K, d, *dts, device=device)
    q.requires_grad_(True)
    k.requires_grad_(True)
    n.requires_grad_(True)
    loss, stats = moco_fast.info_nce(q, k, n, TEMP, backend=backend, return_stats=True)
    loss.backward()
    ref = infonce_forward(q, k, n, 1 / TEMP)
    want = ref.loss.mean()
    tol = tol_for(*dts)
    assert abs(loss.item() - want.item()) <= tol * max(1.0, abs(want.item()))
    check_rank(stats.rank, ref.pos, ref.neg, eps=1e-4)
    grad = torch.full((B,), 1.0 / B, dtype=torch.float64)
    rq, rk, rn = infonce_grads(q, k, n, 1 / TEMP, grad)
    if K:
        assert rel(q.grad, rq) < tol and rel(k.grad, rk) < tol and rel(n.grad, rn) < tol
    else:  # only the positive: the exact gradient is 0
        assert q.grad.abs().max().item() < 1e-5 and k.grad.abs().max().item() < 1e-5


@pytest.mark.parametrize("new_api", ["tf32", "ieee"])
def test_new_fp32_precision_api_does_not_raise(backend, device, restore_precision, new_api):
    """torch >= 2.9 raises from torch.get_float32_matmul_precision() once the new
    torch.backends.cuda.matmul.fp32_precision is set: forward and backward must still run
    (bf16 and fp32 inputs, both read the precision)."""
    torch.backends.cuda.matmul.fp32_precision = new_api
    impl = contract(backend)
    for dt in (torch.float32, torch.bfloat16):
        q, k, n = infonce_inputs(7, 63, 16, dt, device=device)
        loss, lse, delta, _ = impl.infonce_forward(q, k, n, 1 / TEMP)
        grad = torch.ones(7, device=device)
        impl.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
        impl.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
        assert torch.isfinite(loss).all()


# ------------------------------------------------------------------------------------------------
# GPU, full sizes (each test names the backend it was written for)
# ------------------------------------------------------------------------------------------------

on_triton = pytest.mark.parametrize("backend", ["triton"], indirect=True)
on_cuda = pytest.mark.parametrize("backend", ["cuda"], indirect=True)


@requires_cuda
@on_triton
@pytest.mark.parametrize("B", [256, 4096])
@pytest.mark.parametrize(
    "dts,precision",
    [
        ((torch.bfloat16,) * 3, "highest"),
        ((torch.float16,) * 3, "highest"),
        ((torch.float32,) * 3, "highest"),
        ((torch.float32,) * 3, "high"),
        ((torch.float32, torch.float32, torch.bfloat16), "high"),
    ],
)
def test_gpu_forward_backward_full_size(backend, device, B, dts, precision):
    torch.set_float32_matmul_precision(precision)
    K, d = 65536, 128
    q, k, n = infonce_inputs(B, K, d, *dts, device=device)
    tol = tol_for(*dts) if precision == "highest" or all(t != torch.float32 for t in dts) else 3e-3
    impl = contract(backend)
    loss, lse, delta, rank = impl.infonce_forward(q, k, n, 1 / TEMP)
    out = delta.double() + k.double()  # O = k + delta
    ref = infonce_forward_chunked(q, k, n, 1 / TEMP)
    assert rel(lse, ref.lse) < tol and rel(out, ref.out) < tol, (rel(lse, ref.lse), rel(out, ref.out))
    check_rank(rank, ref.pos, ref.neg, eps=1e-3 if tol > 1e-5 else 1e-4)
    grad = torch.full((B,), 1.0 / B, device=device)
    gq, gk = impl.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    sub = slice(0, 256)  # float64 autograd on a row subset (grads of rows are independent)
    rq, rk, _ = infonce_grads(q[sub], k[sub], n, 1 / TEMP, grad[sub], negatives=False)
    assert rel(gq[sub], rq) < tol and rel(gk[sub], rk) < tol


@requires_cuda
@on_triton
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_gpu_backward_negatives_full_size(backend, device, dt):
    B, K, d = 256, 65536, 128
    q, k, n = infonce_inputs(B, K, d, dt, device=device)
    grad = torch.full((B,), 1.0 / B, device=device)
    impl = contract(backend)
    _, lse, _, _ = impl.infonce_forward(q, k, n, 1 / TEMP)
    gn = impl.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    _, _, rn = infonce_grads(q, k, n, 1 / TEMP, grad)
    assert rel(gn, rn) < tol_for(dt)
    assert torch.equal(gn, impl.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP))


@requires_cuda
@on_triton
@pytest.mark.parametrize("splits", [1, 7, 64, 300])
def test_gpu_forward_forced_splits(backend, device, splits):
    q, k, n = infonce_inputs(256, 65536, 128, torch.bfloat16, device=device)
    check_forward(backend, q, k, n, 1 / TEMP, 1e-2, triton=dict(num_splits=splits))


@requires_cuda
@on_triton
@pytest.mark.parametrize("d", [16, 32, 64, 96, 256])
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float32])
def test_gpu_forward_other_dims(backend, device, d, dt):
    q, k, n = infonce_inputs(300, 5000, d, dt, device=device)
    check_forward(backend, q, k, n, 1 / TEMP, tol_for(dt))


# name: (q dtype, k dtype, negatives dtype, float32 matmul precision, relative tolerance, tie tolerance)
GPU_DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32, "highest", 1e-5, 1e-4),
    "tf32": (torch.float32, torch.float32, torch.float32, "high", 2e-3, 2e-2),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, "highest", 1e-2, 1e-3),
    "fp16": (torch.float16, torch.float16, torch.float16, "highest", 5e-3, 1e-3),
    "fp32q_bf16n": (torch.float32, torch.float32, torch.bfloat16, "highest", 1e-5, 1e-4),
    "bf16q_fp16n_tf32": (torch.bfloat16, torch.float32, torch.float16, "high", 2e-3, 2e-2),
}


def gpu_forward_case(backend, device, B, K, d, name, temperature=0.07, inputs=None):
    """The contract forward on poisoned memory without a host sync, against float64 (cuda tests)."""
    qt, kt, nt, precision, tol, tie = GPU_DTYPES[name]
    q, k, n = infonce_inputs(B, K, d, qt, kt, nt, device=device) if inputs is None else inputs
    scale = 1.0 / temperature
    poison_allocator(device)
    torch.set_float32_matmul_precision(precision)
    with no_host_sync(device):
        loss, lse, delta, rank = contract(backend).infonce_forward(q, k, n, scale)
    torch.set_float32_matmul_precision("highest")
    assert loss.shape == lse.shape == rank.shape == (B,) and delta.shape == (B, d)
    assert loss.dtype == lse.dtype == delta.dtype == torch.float32 and rank.dtype == torch.int64
    out = delta.double() + k.double()  # O = k + delta
    ref = infonce_forward(q, k, n, scale)
    assert rel(lse, ref.lse) < tol, name
    assert rel(out, ref.out) < tol, name
    # the loss from the kernel: error relative to the logit scale (the loss itself may be tiny); only TF32
    # moves the logits (it rounds q and the keys), fp32 sums keep lse and the positive logit accurate otherwise
    ltol = 2e-3 if precision == "high" else 1e-4
    assert (loss.double() - ref.loss).abs().max().item() < ltol * max(1.0, ref.lse.abs().max().item()), name
    if K == 0:
        assert torch.equal(loss, torch.zeros_like(loss)), "K = 0 must give loss 0 exactly"
    tie_tol = tie * scale * max(1.0, q.float().norm(dim=1).max().item() ** 2)
    check_rank(rank, ref.pos * scale, ref.neg * scale, eps=tie_tol)
    return lse, delta, rank


@requires_cuda
@on_cuda
@pytest.mark.parametrize("name", list(GPU_DTYPES))
@pytest.mark.parametrize("d", [16, 96, 128])
@pytest.mark.parametrize("K", [0, 1, 1000, 4099, 65536])
@pytest.mark.parametrize("B", [1, 7, 37, 256])
def test_gpu_forward_matrix(backend, device, B, K, d, name):
    gpu_forward_case(backend, device, B, K, d, name)


@requires_cuda
@on_cuda
@pytest.mark.parametrize("name", ["fp32", "tf32", "bf16", "fp16", "fp32q_bf16n"])
@pytest.mark.parametrize("d", [1, 33, 100, 200, 256])
def test_gpu_forward_odd_dims(backend, device, d, name):
    """d padded up to 32/64/128/256 (zero columns), unaligned d through the converting loader."""
    gpu_forward_case(backend, device, 37, 1000, d, name)
    gpu_forward_case(backend, device, 130, 65, d, name)


@requires_cuda
@on_cuda
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_gpu_forward_wide_logits_and_large_batch(backend, device, name):
    """Unnormalized inputs (logits spanning hundreds of units: many lazy rescales) and B = 4096.
    (Not TF32: rounding q to 10 bits moves such logits by ~0.05, i.e. ~5% in the probabilities.)"""
    qt, kt, nt = GPU_DTYPES[name][:3]
    B, K, d = 4096, 4099, 128
    q = torch.randn(B, d, device=device).to(qt)
    k = torch.randn(B, d, device=device).to(kt)
    n = (torch.randn(K, d, device=device) * torch.linspace(0.1, 2.0, K, device=device)[:, None]).to(nt)
    gpu_forward_case(backend, device, B, K, d, name, temperature=2.0, inputs=(q, k, n))


@requires_cuda
@on_cuda
def test_gpu_forward_unaligned_and_strided_inputs(backend, device):
    """A view at an odd element offset (not 16-byte aligned) and a transposed (non-contiguous) negatives."""
    d = 128
    base = rows(1 + 37 * d, 1, torch.float32, device=device).flatten()
    q = base[1:].view(37, d)  # 4-byte offset
    k = rows(37, d, torch.float32, device=device)
    n = rows(d, 999, torch.float32, device=device).T  # non-contiguous
    gpu_forward_case(backend, device, 37, 999, d, "fp32", inputs=(q, k, n))
    gpu_forward_case(backend, device, 37, 999, d, "bf16", inputs=(q.bfloat16(), k.bfloat16(), n.bfloat16()))


@requires_cuda
@on_cuda
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp32q_bf16n"])
@pytest.mark.parametrize("K", [0, 1000])
@pytest.mark.parametrize("B,d", [(1, 16), (37, 96), (256, 128)])
def test_gpu_backward(backend, device, B, K, d, name):
    qt, kt, nt = GPU_DTYPES[name][:3]
    q, k, n = infonce_inputs(B, K, d, qt, kt, nt, device=device)
    scale = 1 / 0.07
    grad = torch.rand(B, device=device) + 0.5
    ref = infonce_forward(q, k, n, scale)
    loss, delta = ref.loss.float(), ref.delta.float()
    poison_allocator(device)
    with no_host_sync(device):
        dq, dk = contract(backend).infonce_backward(grad, q, k, loss, delta, scale)
    assert dq.dtype == qt and dk.dtype == kt and dq.shape == dk.shape == (B, d)
    ref_dq, ref_dk = infonce_backward(grad, q, k, ref.loss, ref.delta, scale)
    tol = 1e-5 if qt == torch.float32 else 1e-2
    assert rel(dq, ref_dq) < tol
    if K == 0:  # p0 = 1: dk vanishes up to rounding of lse
        assert dk.double().abs().max().item() < 1e-4 * scale
    else:
        assert rel(dk, ref_dk) < (1e-4 if kt == torch.float32 else 1e-2)


@requires_cuda
@on_cuda
@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16", "fp32q_bf16n"])
@pytest.mark.parametrize("K", [1, 1000, 4099])
@pytest.mark.parametrize("B,d", [(1, 16), (37, 96), (256, 128), (5, 256), (9, 33)])
def test_gpu_backward_negatives(backend, device, B, K, d, name):
    qt, _, nt = GPU_DTYPES[name][:3]
    q, k, n = infonce_inputs(B, K, d, qt, qt, nt, device=device)
    scale = 1 / 0.07
    grad = torch.rand(B, device=device) + 0.5
    ref = infonce_forward(q, k, n, scale)
    poison_allocator(device)
    with no_host_sync(device):
        dn = contract(backend).infonce_backward_negatives(grad, q, n, ref.lse.float(), scale)
    assert dn.dtype == nt and dn.shape == (K, d)
    assert rel(dn, infonce_backward_negatives(grad, q, n, ref.lse, scale)) < (1e-5 if nt == torch.float32 else 1e-2)


@requires_cuda
@on_cuda
def test_gpu_public_info_nce_matches_reference(backend, device):
    q = rows(37, 128, torch.float32, device=device).requires_grad_()
    k = rows(37, 128, torch.float32, device=device).requires_grad_()
    n = rows(4099, 128, torch.float32, device=device).requires_grad_()
    losses, grads = [], []
    for name in (backend, "reference"):
        loss = moco_fast.info_nce(q, k, n, 0.07, backend=name)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, (q, k, n)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads, strict=True):
        assert rel(a, b) < 1e-4
