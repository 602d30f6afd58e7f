"""moco_fast.info_nce on CPU ("torch" and "reference" backends) against float64 math.

The oracle below is written independently of moco_fast: logits by torch.cat/matmul in float64,
loss = logsumexp(row) - row[0], gradients by float64 autograd. Inputs are rounded to their dtype
first and the oracle sees the same rounded values upcast, so the only error measured is the
implementation's own.

Error model (DESIGN.md): ||out - ref|| <= rtol·||ref|| + atol. An fp32 implementation cannot get a
logit closer than a few ulps of its magnitude bound S_i = |q_i|·max|x|/T, so atol is a small
multiple of eps32·||S|| (loss) and eps32·||S·|x|/T|| (gradients); rtol is 2e-6 ("far under 1e-5").
bf16 losses are fp32 and held to the same bound; bf16 gradients are returned in bf16 and must be
the float64 gradient rounded once (elementwise, within one bf16 ulp).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import moco_fast
from moco_fast.reference import info_nce_logits, reference_info_nce, topk_accuracy

EPS32 = 2.0**-23
RTOL32 = 1e-6
ATOL_ULPS = 4.0

# The generic tests run on every CPU-capable backend of the public API. "triton" (interpreter) and
# "cuda" have their own test files.
CPU_BACKENDS = [b for b in moco_fast.available_backends() if b in ("torch", "reference")]
assert "torch" in CPU_BACKENDS and "reference" in CPU_BACKENDS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Hundreds of small cases: intra-op threads only add sync overhead (4-10x slower on a busy
    2-core machine), so this module runs single-threaded and restores the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


BATCHES = (1, 7, 37, 256)
NUM_KEYS = (0, 1, 1000, 4099)
DIMS = (16, 96, 128)
TEMPERATURES = (0.02, 0.07, 0.2, 1.0)
DTYPES = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    "fp32q_bf16neg": (torch.float32, torch.float32, torch.bfloat16),
}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def rows(n: int, d: int, dtype: torch.dtype, normalized: bool = True, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(n, d, dtype=torch.float64)
    if normalized:
        x = F.normalize(x, dim=1)
    return (x * scale).to(dtype)


def oracle(q, k, n, temperature, *, grad_negatives=False):
    """float64 loss (B,), lse (B,), logits and grads of sum(loss) wrt q, k (and n)."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    n64 = n.detach().double().requires_grad_(grad_negatives)
    logits = torch.cat([(q64 * k64).sum(dim=1, keepdim=True), q64 @ n64.T], dim=1) / temperature
    lse = torch.logsumexp(logits, dim=1)
    loss = lse - logits[:, 0]
    loss.sum().backward()
    return {
        "loss": loss.detach(),
        "lse": lse.detach(),
        "logits": logits.detach(),
        "dq": q64.grad,
        "dk": k64.grad,
        "dn": n64.grad if grad_negatives else None,
    }


def error_scales(q, k, n, temperature):
    """atol for loss, dq, dk, dn from the logit magnitude bound S_i = |q_i|·max|x|/T."""
    qn = q.double().norm(dim=1)
    xn = k.double().norm(dim=1)
    if n.shape[0]:
        xn = torch.maximum(xn, n.double().norm(dim=1).max())
    s = qn * xn / temperature
    return {
        "loss": ATOL_ULPS * EPS32 * s.norm().item(),
        "lse": ATOL_ULPS * EPS32 * s.norm().item(),
        "dq": ATOL_ULPS * EPS32 * (s * xn / temperature).norm().item(),
        "dk": ATOL_ULPS * EPS32 * (s * qn / temperature).norm().item(),
        "dn": ATOL_ULPS * EPS32 * (s * qn / temperature).norm().item(),
        "dn_elem": ATOL_ULPS * EPS32 * (s * qn / temperature).max().item(),
        "elem": ATOL_ULPS * EPS32 * (s * torch.maximum(xn, qn) / temperature).max().item(),
    }


def assert_close_norm(out, ref, rtol, atol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64 = out.detach().double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    err = (out64 - ref).norm().item()
    bound = rtol * ref.norm().item() + atol
    assert err <= bound, f"{what}: ||out-ref|| = {err:.3e} > {bound:.3e} (||ref|| = {ref.norm().item():.3e})"


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits), as float64; 0 at x = 0."""
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.where(x == 0, torch.zeros_like(x), torch.exp2(exponent - 7))


def assert_rounded_once(out, ref, atol, what):
    """out (a bf16 tensor) is the float64 ``ref`` rounded once: within one bf16 ulp elementwise
    (round-to-nearest gives half an ulp; atol covers the fp32 error before the rounding)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == torch.bfloat16
    out64 = out.detach().double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    err = (out64 - ref).abs()
    bound = bf16_ulp(ref) + atol
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: elementwise error exceeds one ulp by {worst:.3e}"


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
    scales = error_scales(q, k, n, temperature)
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


# ------------------------------------------------------------------------------------------------
# loss and gradients vs float64 math and vs the reference
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
        scales = error_scales(q, k, n, temperature)
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


def test_float64_inputs_on_torch_backend_are_float64_accurate():
    """fp64 in → fp64 compute and fp64 loss/grads (what gradcheck relies on)."""
    q, k, n = rows(37, 96, torch.float64), rows(37, 96, torch.float64), rows(1000, 96, torch.float64)
    for backend in CPU_BACKENDS:
        loss, dq, dk, dn = run(q, k, n, 0.07, backend, grad_negatives=True)
        ref = oracle(q, k, n, 0.07, grad_negatives=True)
        assert loss.dtype == dq.dtype == dk.dtype == dn.dtype == torch.float64
        for name, out in (("loss", loss), ("dq", dq), ("dk", dk), ("dn", dn)):
            assert_close_norm(out, ref[name], 1e-12, 0.0, f"{backend} {name}")


# ------------------------------------------------------------------------------------------------
# numerical stability
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
        logits = oracle(q, k, n, temperature)["logits"]
        assert logits.abs().max() > 80, "the case must overflow a naive exp"
        tag = f"B={batch} K={num_keys} d={dim} scale={scale} {dtypes}"
        loss, dq, dk, _ = check_against_oracle(q, k, n, temperature, backend, tag=tag)
        assert torch.isfinite(loss).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
        scales = error_scales(q, k, n, temperature)
        assert dk.double().abs().max() <= scales["elem"], f"K=0 dk {dk.abs().max():.3e}"
        for reduction in ("mean", "sum"):
            red = moco_fast.info_nce(q, k, n, temperature, reduction=reduction, backend=backend)
            assert red.shape == () and red.item() == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_negatives_gives_exactly_zero_key_gradient(backend):
    """With K = 0, p0 = 1 exactly, so dk = (p0 − 1)·q/T must be exactly 0 (the reference gives 0)."""
    q, k = rows(256, 128, torch.float32, False, 3.0), rows(256, 128, torch.float32, False, 3.0)
    _, _, dk, _ = run(q, k, torch.empty(0, 128), 0.02, backend)
    assert torch.equal(dk, torch.zeros_like(dk)), f"dk max {dk.abs().max():.3e}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reductions(backend):
    q, k, n = rows(37, 96, torch.float32), rows(37, 96, torch.float32), rows(1000, 96, torch.float32)
    ref = oracle(q, k, n, 0.07)
    scales = error_scales(q, k, n, 0.07)
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
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    logits = torch.cat([(q64 * k64).sum(1, keepdim=True), q64 @ n.double().T], 1) / 0.07
    (F.cross_entropy(logits, torch.zeros(37, dtype=torch.long), reduction="none") * weights).sum().backward()
    assert_close_norm(qq.grad, q64.grad, RTOL32, 2 * scales["dq"], "weighted dq")
    assert_close_norm(kk.grad, k64.grad, RTOL32, 2 * scales["dk"], "weighted dk")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
    (|q·n_j − q·k| > gap for every j, far above fp32 rounding), so every rank is unambiguous."""
    q = rows(batch, dim, torch.float32)
    n = rows(num_keys, dim, torch.float32)
    sigma = torch.linspace(0.1, 3.0, batch)[:, None]
    k = F.normalize(q + sigma * torch.randn(batch, dim), dim=1)
    for _ in range(100):
        scores = q.double() @ n.double().T - (q.double() * k.double()).sum(1, keepdim=True)
        tied = (scores.abs() <= gap).any(dim=1)
        if not tied.any():
            return q, k, n, oracle(q, k, n, temperature)["logits"]
        k[tied] = F.normalize(q[tied] + sigma[tied] * torch.randn(int(tied.sum()), dim), dim=1)
    raise AssertionError("could not draw a separated batch")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
    scales = error_scales(q, k, n, temperature)
    ref_lse = torch.logsumexp(logits, dim=1)
    assert_close_norm(stats.lse, ref_lse, RTOL32, scales["lse"], "lse")
    # the loss returned with the stats is the same as without (up to rounding: without stats the
    # torch backend may run PyTorch's fused attention kernel instead of its blockwise loop)
    torch.testing.assert_close(loss, moco_fast.info_nce(q, k, n, temperature, backend=backend), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
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
        scales = error_scales(q, k, n, temperature)
        assert stats.lse.dtype == torch.float32
        assert_close_norm(stats.lse, ref["lse"], RTOL32, scales["lse"], f"lse B={batch} K={num_keys}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stats_with_no_negatives(backend):
    q, k = rows(7, 16, torch.float32), rows(7, 16, torch.float32)
    _, stats = moco_fast.info_nce(q, k, torch.empty(0, 16), 0.07, backend=backend, return_stats=True)
    assert torch.equal(stats.rank, torch.zeros(7, dtype=torch.int64))
    assert stats.acc1.item() == 1.0 and stats.acc5.item() == 1.0


def test_backend_argument_is_case_insensitive_and_auto_is_torch_on_cpu():
    q, k, n = rows(7, 16, torch.float32), rows(7, 16, torch.float32), rows(30, 16, torch.float32)
    a = moco_fast.info_nce(q, k, n, 0.1, backend="auto")
    b = moco_fast.info_nce(q, k, n, 0.1, backend="TORCH")
    c = moco_fast.info_nce(q, k, n, 0.1, backend="torch")
    assert torch.equal(a, c) and torch.equal(b, c)
    assert math.isfinite(a.item())


def test_non_contiguous_inputs():
    base_q, base_k = rows(7, 64, torch.float32), rows(7, 64, torch.float32)
    n = rows(200, 128, torch.float32)[:, ::2]  # strided view, (200, 64)
    q = base_q.T.contiguous().T  # column-major
    k = base_k[:, :].T.contiguous().T
    assert not q.is_contiguous() and not n.is_contiguous()
    for backend in CPU_BACKENDS:
        check_against_oracle(q, k, n, 0.07, backend, tag=f"non-contiguous {backend}")
        check_against_oracle(q, k, n, 0.07, backend, grad_negatives=True, tag=f"non-contiguous dn {backend}")


# ------------------------------------------------------------------------------------------------
# the torch backend without stats runs PyTorch's fused CPU attention kernel behind a guard
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,K,d", [(1, 1, 16), (7, 1000, 96), (37, 4099, 128)])
@pytest.mark.parametrize("fused", ["1", "0"])
def test_torch_forward_without_rank_fused_and_fallback_match_float64(monkeypatch, B, K, d, fused):
    from moco_fast.torch_backend import infonce as chunked

    monkeypatch.setenv("MOCO_FAST_CPU_FUSED_ATTENTION", fused)
    calls = []
    real = chunked._FUSED_ATTENTION_OP
    if real is not None:
        monkeypatch.setattr(chunked, "_FUSED_ATTENTION_OP", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, n = (F.normalize(torch.randn(rows, d), dim=1) for rows in (B, B, K))
    scale = 1 / 0.07
    _, lse, delta, rank = chunked.infonce_forward(q, k, n, scale, need_rank=False)
    out = delta.double() + k.double()  # O = k + delta
    assert len(calls) == (1 if fused == "1" and real is not None else 0)
    assert torch.equal(rank, torch.full((B,), -1, dtype=torch.int64))
    q64, k64, n64 = q.double(), k.double(), n.double()
    logits = torch.cat([(q64 * k64).sum(1, keepdim=True), q64 @ n64.T], dim=1) * scale
    probs = torch.softmax(logits, dim=1)
    ref_out = probs[:, :1] * k64 + probs[:, 1:] @ n64
    ref_lse = torch.logsumexp(logits, dim=1)
    assert ((lse.double() - ref_lse).norm() / ref_lse.norm()).item() < 1e-6
    assert ((out.double() - ref_out).norm() / ref_out.norm()).item() < 1e-5
