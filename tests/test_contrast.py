"""The fused contrastive cross-entropy and the losses built on it (nt_xent, mocov3_loss, cmc_loss)
against float64 math, on the "torch" and "reference" backends and on "triton" under the interpreter.

The oracle is written here in float64 from the definitions (materialized logits, the excluded
column at -inf, logsumexp minus the target's logit, float64 autograd), on the inputs rounded to
their dtype, so only the implementation's own error is measured. Error model (docs/design.md):
‖out − ref‖ ≤ rtol·‖ref‖ + atol, atol a few fp32 ulps of the logit scale; gradients returned in a
16-bit dtype are held to that dtype's rounding (rtol 2⁻⁷ bf16, 2⁻⁹ fp16, norm-wise).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import peer

import moco_fast
from moco_fast import backends
from moco_fast.reference import reference_cmc_loss, reference_mocov3_loss, reference_nt_xent

EPS32 = 2.0**-23
RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}
# Triton's dots of two equal half types round both operands to that type (as flash attention does):
# with the output's rounding, three roundings of u = 2⁻⁸ (bf16) / 2⁻¹¹ (fp16).
RTOL_HALF_DOTS = {torch.bfloat16: 2.0**-6, torch.float16: 2.0**-8}
F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
MIXES = [(a, b) for a in (F32, BF16, F16) for b in (F32, BF16, F16)]
TRITON = backends.is_available("triton") and backends.refusal("triton", "contrast", torch.device("cpu"), (F32,)) is None
# Triton under the interpreter is slow: small sizes, a representative set of dtype mixes.
TRITON_MIXES = [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F16)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rows(n: int, d: int, dtype: torch.dtype, normalized: bool = True) -> torch.Tensor:
    x = torch.randn(n, d, dtype=torch.float64)
    return (F.normalize(x, dim=1) if normalized else x).to(dtype)


def oracle(q, keys, target, exclude, temperature, *, same=False):
    """float64 per-row loss, lse, rank and d(Σ loss)/dq, /dkeys (same: q IS keys, the grads summed)."""
    q64 = q.detach().double().requires_grad_()
    k64 = q64 if same else keys.detach().double().requires_grad_()
    logits = q64 @ k64.T / temperature
    if exclude is not None:
        mask = torch.zeros_like(logits, dtype=torch.bool)
        valid = exclude >= 0
        mask[torch.nonzero(valid).squeeze(1), exclude[valid]] = True
        logits = logits.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=1)
    pos = logits.gather(1, target[:, None]).squeeze(1)
    loss = lse - pos
    loss.sum().backward()
    rank = (logits > pos[:, None]).sum(1)
    return {
        "loss": loss.detach(),
        "lse": lse.detach(),
        "rank": rank,
        "dq": q64.grad,
        "dk": None if same else k64.grad,
        "scale": (q64.detach().norm(dim=1) * k64.detach().norm(dim=1).max() / temperature),
    }


def grad_rtol_dtype(backend, dtypes, out_dtype):
    """The RTOL key (or an explicit rtol) for a gradient in out_dtype computed from inputs of ``dtypes``."""
    if backend == "triton" and dtypes[0] == dtypes[1] and dtypes[0] in RTOL_HALF_DOTS:
        return RTOL_HALF_DOTS[dtypes[0]]
    return RTOL[out_dtype]


def assert_close(out, ref, dtype, atol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    out64 = out.detach().double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite"
    err = (out64 - ref).norm().item()
    rtol = dtype if isinstance(dtype, float) else RTOL[dtype]
    bound = rtol * ref.norm().item() + atol
    assert err <= bound, f"{what}: ‖out − ref‖ = {err:.3e} > {bound:.3e} (‖ref‖ = {ref.norm().item():.3e})"


def run_core(q, keys, target, exclude, temperature, backend):
    qq = q.detach().clone().requires_grad_()
    kk = keys.detach().clone().requires_grad_()
    loss, stats = moco_fast.contrastive_cross_entropy(
        qq, kk, target, temperature, exclude=exclude, reduction="none", backend=backend, return_stats=True
    )
    loss.sum().backward()
    return loss, stats, qq.grad, kk.grad


def check_core(m, n, d, dtypes, temperature, backend, with_exclude, normalized=True):
    q, keys = rows(m, d, dtypes[0], normalized), rows(n, d, dtypes[1], normalized)
    target = torch.randint(n, (m,))
    exclude = None
    if with_exclude:
        if n < 2:
            return
        exclude = (target + torch.randint(1, n, (m,))) % n  # any column but the target
        exclude[::3] = -1  # some rows exclude nothing
    ref = oracle(q, keys, target, exclude, temperature)
    loss, stats, dq, dk = run_core(q, keys, target, exclude, temperature, backend)
    tag = f"M={m} N={n} d={d} {dtypes} T={temperature} exclude={with_exclude} [{backend}]"
    atol = 8 * EPS32 * ref["scale"].norm().item()
    compute = F64 if F64 in dtypes else F32
    assert loss.dtype == compute, tag
    assert_close(loss, ref["loss"], compute, atol, f"loss {tag}")
    assert_close(stats.lse, ref["lse"], F32, atol, f"lse {tag}")
    assert dq.dtype == dtypes[0] and dk.dtype == dtypes[1], tag
    grad_atol = atol * (1.0 / temperature) * 4
    assert_close(dq, ref["dq"], grad_rtol_dtype(backend, dtypes, dtypes[0]), grad_atol, f"dq {tag}")
    assert_close(dk, ref["dk"], grad_rtol_dtype(backend, dtypes, dtypes[1]), grad_atol, f"dk {tag}")
    # The rank, up to logits within a few ulps of the target's (ties are rounding-dependent).
    logits = q.double() @ keys.double().T
    tie = (logits - logits.gather(1, target[:, None])).abs() <= 1e-5 * logits.abs().amax()
    slack = tie.sum(1) - 1
    assert ((stats.rank - ref["rank"]).abs() <= slack.clamp_min(0)).all(), tag


# ------------------------------------------------------------------------------------------------
# the core op
# ------------------------------------------------------------------------------------------------

SIZES = [(1, 1), (1, 300), (7, 37), (37, 7), (37, 300), (300, 37)]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("d", [16, 96, 130])
def test_core_matches_float64_every_dtype_mix(backend, d):
    for (m, n), dtypes, excl in itertools.product(SIZES, MIXES + [(F64, F64), (F64, F32)], (False, True)):
        check_core(m, n, d, dtypes, 0.1 if excl else 0.5, backend, excl)


@pytest.mark.parametrize("backend", ["torch"])
def test_core_raw_rows_and_low_temperature(backend):
    """Unnormalized rows and T = 0.02: logits in the hundreds, the online max matters."""
    for (m, n), excl in itertools.product([(7, 37), (37, 300)], (False, True)):
        check_core(m, n, 96, (F32, F32), 0.02, backend, excl, normalized=False)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_core_without_stats_or_exclusion(monkeypatch, fused):
    """No rank and no excluded column: CPU fp32 takes PyTorch's fused attention kernel (MOCO_FAST_CPU_FUSED_ATTENTION
    toggles it); both paths against float64."""
    monkeypatch.setenv("MOCO_FAST_CPU_FUSED_ATTENTION", fused)
    for m, n, d in [(1, 300, 16), (37, 7, 130), (300, 37, 96)]:
        q, keys = rows(m, d, F32, normalized=False), rows(n, d, F32)
        target = torch.randint(n, (m,))
        ref = oracle(q, keys, target, None, 0.1)
        qq, kk = q.clone().requires_grad_(), keys.clone().requires_grad_()
        loss = moco_fast.contrastive_cross_entropy(qq, kk, target, 0.1, reduction="none")
        loss.sum().backward()
        atol = 8 * EPS32 * ref["scale"].norm().item()
        assert_close(loss, ref["loss"], F32, atol, f"loss {m} {n} {d}")
        assert_close(qq.grad, ref["dq"], F32, 40 * atol, f"dq {m} {n} {d}")
        assert_close(kk.grad, ref["dk"], F32, 40 * atol, f"dk {m} {n} {d}")


def test_torch_backend_small_tiles_and_an_all_excluded_tile():
    """Tiles of 3 rows × 1 key: many tiles, and tiles whose only key is excluded (max stays -inf)."""
    from moco_fast.torch_backend import contrast as C

    q, keys = rows(10, 16, F32), rows(9, 16, F32)
    target = torch.arange(10) % 9
    exclude = (target + 1) % 9
    ref = oracle(q, keys, target, exclude, 0.2)
    loss, lse, dloss_dq, rank = C.contrast_forward(q, keys, target, exclude, 5.0, block=(3, 1))
    assert_close(loss, ref["loss"], F32, 1e-6, "loss")
    assert torch.equal(rank, ref["rank"])
    dk = C.contrast_backward_keys(torch.ones(10), q, keys, target, exclude, lse, 5.0, block=(3, 1))
    assert_close(dk, ref["dk"], F32, 1e-5, "dk")
    assert_close(dloss_dq, ref["dq"], F32, 1e-5, "dq")


@pytest.mark.skipif(not TRITON, reason="triton backend not available on this device")
@pytest.mark.parametrize("dtypes", TRITON_MIXES, ids=lambda t: f"{t[0]}-{t[1]}".replace("torch.", ""))
def test_triton_core_matches_float64(dtypes):
    for (m, n), d, excl in [((1, 37), 16, False), ((7, 37), 96, True), ((37, 7), 130, True), ((37, 300), 16, True)]:
        check_core(m, n, d, dtypes, 0.1, "triton", excl)


@pytest.mark.skipif(not TRITON, reason="triton backend not available on this device")
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_triton_splits_agree_including_an_all_excluded_split(splits):
    """N = 2·128 + 1 keys in 3 splits: the last split holds one key, excluded by some rows (m = -inf)."""
    from moco_fast.kernels import contrast_forward

    q, keys = rows(9, 16, F32, normalized=False), rows(257, 16, F32)
    target = torch.randint(256, (9,))
    exclude = torch.full((9,), 256)
    exclude[::2] = -1
    ref = oracle(q, keys, target, exclude, 0.5)
    loss, lse, dloss_dq, rank = contrast_forward(q, keys, target, exclude, 2.0, num_splits=splits, fuse=splits == 1)
    assert_close(loss, ref["loss"], F32, 1e-5, f"loss splits={splits}")
    assert_close(dloss_dq, ref["dq"], F32, 1e-5, f"dq splits={splits}")
    assert torch.equal(rank, ref["rank"])
    unfused = contrast_forward(q, keys, target, exclude, 2.0, num_splits=1, fuse=False)
    assert torch.allclose(unfused[0], loss, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON else []))
def test_backward_does_not_read_stop_gradient_keys(backend):
    """keys without grad are not read by the backward: overwriting them after the forward (a memory-bank
    update) leaves dq as it was — and dq only depends on the forward."""
    q, keys = rows(7, 16, F32).requires_grad_(), rows(37, 16, F32)
    target = torch.randint(37, (7,))
    loss = moco_fast.contrastive_cross_entropy(q, keys, target, 0.1, backend=backend)
    (dq_ref,) = torch.autograd.grad(loss, q, retain_graph=True)
    keys.normal_()  # overwrite in place
    (dq,) = torch.autograd.grad(loss, q)
    assert torch.equal(dq, dq_ref)


def test_nan_in_keys_propagates():
    q, keys = rows(4, 16, F32), rows(9, 16, F32)
    keys[3, 2] = float("nan")
    loss = moco_fast.contrastive_cross_entropy(q, keys, torch.zeros(4, dtype=torch.long), reduction="none")
    assert torch.isnan(loss).all()


def test_gradcheck_fp64():
    q = rows(5, 8, F64).requires_grad_()
    keys = rows(6, 8, F64).requires_grad_()
    target = torch.tensor([0, 1, 2, 3, 4])
    exclude = torch.tensor([5, -1, 0, 1, 2])

    def f(a, b):
        return moco_fast.contrastive_cross_entropy(
            a, b, target, 0.3, exclude=exclude, reduction="none", backend="torch"
        )

    assert torch.autograd.gradcheck(f, (q, keys))


def test_core_bad_input_names_the_argument():
    q, keys = rows(4, 16, F32), rows(9, 16, F32)
    t = torch.zeros(4, dtype=torch.long)
    cases = [
        (dict(keys=rows(9, 8, F32)), ValueError, "keys have dim"),
        (dict(target=t.float()), TypeError, "target"),
        (dict(target=torch.zeros(3, dtype=torch.long)), ValueError, "target"),
        (dict(target=torch.full((4,), 9)), ValueError, r"target must be in \[0, 9\)"),
        (dict(target=torch.full((4,), -1)), ValueError, "target"),
        (dict(exclude=t), ValueError, "exclude must differ"),
        (dict(exclude=torch.full((4,), -2)), ValueError, "exclude"),
        (dict(exclude=torch.full((4,), 9)), ValueError, "exclude"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(keys=rows(0, 16, F32)), ValueError, "keys"),
    ]
    for override, err, match in cases:
        args = dict(q=q, keys=keys, target=t, temperature=0.1, exclude=None) | override
        with pytest.raises(err, match=match):
            moco_fast.contrastive_cross_entropy(
                args["q"], args["keys"], args["target"], args["temperature"], exclude=args["exclude"]
            )
    with pytest.raises(ValueError, match="backend 'triton' cannot run contrast|triton"):
        moco_fast.contrastive_cross_entropy(q.double(), keys.double(), t, backend="triton")


# ------------------------------------------------------------------------------------------------
# NT-Xent
# ------------------------------------------------------------------------------------------------


def nt_xent_oracle(z0, z1, temperature):
    """float64 NT-Xent from the definition: rows z = [z0; z1], self masked, positive a ± N."""
    a64 = z0.detach().double().requires_grad_()
    b64 = z1.detach().double().requires_grad_()
    z = torch.cat([a64, b64])
    n2 = z.shape[0]
    logits = (z @ z.T / temperature).masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    pos = logits[torch.arange(n2), (torch.arange(n2) + n2 // 2) % n2]
    loss = torch.logsumexp(logits, dim=1) - pos
    loss.mean().backward()
    return loss.detach(), a64.grad, b64.grad


def check_nt_xent(n, d, dtypes, temperature, backend):
    z0, z1 = rows(n, d, dtypes[0]), rows(n, d, dtypes[1])
    ref_loss, ref0, ref1 = nt_xent_oracle(z0, z1, temperature)
    a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    per_row = moco_fast.nt_xent(a, b, temperature, reduction="none", backend=backend)
    per_row.mean().backward()
    tag = f"N={n} d={d} {dtypes} T={temperature} [{backend}]"
    atol = 8 * EPS32 * (2 * n) ** 0.5 / temperature
    assert per_row.shape == (2 * n,)
    assert_close(per_row, ref_loss, F32, atol, f"loss {tag}")
    common = torch.promote_types(*dtypes)
    grad_atol = 4 * atol / temperature / n
    assert a.grad.dtype == dtypes[0] and b.grad.dtype == dtypes[1]
    pair = (common, common)  # the op runs on z = [z0; z1] in the promoted dtype
    worst = max(RTOL[dtypes[0]], RTOL[dtypes[1]], grad_rtol_dtype(backend, pair, common))
    assert_close(a.grad, ref0, worst, grad_atol, f"dz0 {tag}")
    assert_close(b.grad, ref1, worst, grad_atol, f"dz1 {tag}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("n", [1, 7, 37, 300])
def test_nt_xent_matches_float64(backend, n):
    for d, dtypes in itertools.product((16, 96, 130), [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F16)]):
        check_nt_xent(n, d, dtypes, 0.5 if d != 96 else 0.1, backend)


@pytest.mark.skipif(not TRITON, reason="triton backend not available on this device")
@pytest.mark.parametrize("n, d", [(1, 16), (7, 130), (37, 96)])
def test_triton_nt_xent_matches_float64(n, d):
    for dtypes in [(F32, F32), (BF16, BF16), (F32, F16)]:
        check_nt_xent(n, d, dtypes, 0.2, "triton")


def test_nt_xent_equals_simclr_reference_and_lightly():
    z0, z1 = rows(37, 96, F32), rows(37, 96, F32)
    ours = moco_fast.nt_xent(z0, z1, 0.5)
    assert torch.allclose(ours, reference_nt_xent(z0, z1, 0.5), rtol=1e-6, atol=1e-6)
    lightly_loss = peer("lightly.loss")
    assert torch.allclose(ours, lightly_loss.NTXentLoss(0.5)(z0, z1), rtol=1e-6, atol=1e-6)


def test_nt_xent_one_sample_and_stats():
    z0, z1 = rows(1, 16, F32), rows(1, 16, F32)
    assert abs(moco_fast.nt_xent(z0, z1).item()) < 1e-6  # the positive is the only other row
    z0 = rows(6, 16, F32)
    loss, stats = moco_fast.nt_xent(z0, z0.clone(), 0.5, return_stats=True)  # identical views: positive is 1/T
    assert stats.acc1.item() == 1.0 and stats.rank.shape == (12,)


def test_nt_xent_bad_input():
    with pytest.raises(ValueError, match="z0 and z1 must have the same shape"):
        moco_fast.nt_xent(rows(4, 16, F32), rows(5, 16, F32))
    with pytest.raises(ValueError, match="at least 2 rows"):
        moco_fast.nt_xent(rows(0, 16, F32), rows(0, 16, F32))
    with pytest.raises(TypeError, match="z1 must be a floating tensor"):
        moco_fast.nt_xent(rows(4, 16, F32), torch.zeros(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        moco_fast.nt_xent(rows(4, 16, F32), rows(4, 16, F32), reduction="avg")


# ------------------------------------------------------------------------------------------------
# MoCo v3 and CMC
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["triton"] if TRITON else []))
def test_mocov3_loss_matches_official(backend):
    """fp32: loss and dq against the official formulation in float64; k gets no gradient. bf16: the
    inputs are normalized in bf16 (as the official code would), so the loss is checked against the
    float64 cross-entropy of those normalized bf16 rows."""
    for b, d, dtype in [(1, 16, F32), (7, 130, F32), (37, 96, F32), (37, 96, BF16)]:
        q, k = rows(b, d, dtype, normalized=False), rows(b, d, dtype, normalized=False)
        q1 = q.clone().requires_grad_()
        k1 = k.clone().requires_grad_()
        ours = moco_fast.mocov3_loss(q1, k1, 0.2, backend=backend)
        ours.backward()
        assert k1.grad is None  # k carries no gradient
        if dtype == F32:
            q2 = q.double().requires_grad_()
            ref = reference_mocov3_loss(q2, k.double(), 0.2)
            ref.backward()
            assert abs(ours.item() - ref.item()) <= 2e-6 * ref.item() + 1e-7, (b, d, backend)
            assert_close(q1.grad, q2.grad, F32, 1e-7, f"dq b={b} d={d} [{backend}]")
        else:
            qn, kn = F.normalize(q, dim=1).double(), F.normalize(k, dim=1).double()
            ref = F.cross_entropy(qn @ kn.T / 0.2, torch.arange(b)) * 0.4
            assert abs(ours.item() - ref.item()) <= 2e-6 * ref.item() + 1e-7, (b, d, backend)
            assert q1.grad.dtype == BF16 and torch.isfinite(q1.grad).all()


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["triton"] if TRITON else []))
@pytest.mark.parametrize("num_views", [2, 3, 4])
def test_cmc_full_graph_matches_reference(backend, num_views):
    b = 7 if backend == "triton" else 37
    views = [rows(b, 16, F64 if backend != "triton" else F32).requires_grad_() for _ in range(num_views)]
    ours = moco_fast.cmc_loss(views, 0.1, backend=backend)
    grads = torch.autograd.grad(ours, views)
    v64 = [v.detach().double().requires_grad_() for v in views]
    ref = reference_cmc_loss(v64, 0.1)
    ref_grads = torch.autograd.grad(ref, v64)
    assert abs(ours.item() - ref.item()) <= 1e-5 * ref.item()
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, F32, 1e-7, "cmc grad")
    per_pair = moco_fast.cmc_loss(views, 0.1, reduction="none", backend=backend)
    assert per_pair.shape == (num_views * (num_views - 1), b)
    i, j = moco_fast.cmc_pairs(num_views)[-1]
    logits = views[i].detach().double() @ views[j].detach().double().T / 0.1
    expected = torch.logsumexp(logits, 1) - logits.diagonal()
    assert torch.allclose(per_pair[-1].double(), expected, rtol=1e-5, atol=1e-6)


def test_cmc_bad_input():
    with pytest.raises(ValueError, match="at least 2 views"):
        moco_fast.cmc_loss([rows(4, 8, F32)])
    with pytest.raises(ValueError, match=r"views\[2\]"):
        moco_fast.cmc_loss([rows(4, 8, F32), rows(4, 8, F32), rows(5, 8, F32)])
    with pytest.raises(TypeError, match="sequence"):
        moco_fast.cmc_loss(rows(4, 8, F32))


# ------------------------------------------------------------------------------------------------
# registration: opcheck (schema, fake kernel, autograd) and torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("dtypes", [(F32, F32), (BF16, F32)], ids=["fp32", "bf16-fp32"])
def test_opcheck_contrast_ops(with_exclude, dtypes):
    q = rows(5, 16, dtypes[0]).requires_grad_()
    keys = rows(9, 16, dtypes[1]).requires_grad_()
    target = torch.tensor([0, 3, 8, 1, 1])
    exclude = torch.tensor([2, -1, 0, 4, 5]) if with_exclude else None
    torch.library.opcheck(torch.ops.moco_fast.contrast_forward.default, (q, keys, target, exclude, 5.0, "torch", True))
    _, lse, _, _ = torch.ops.moco_fast.contrast_forward(q, keys, target, exclude, 5.0, "torch")
    torch.library.opcheck(
        torch.ops.moco_fast.contrast_backward_keys.default,
        (torch.rand(5), q.detach(), keys.detach(), target, exclude, lse, 5.0, "torch"),  # no double backward
    )


def test_nt_xent_under_torch_compile():
    z0, z1 = rows(7, 16, F32).requires_grad_(), rows(7, 16, F32).requires_grad_()
    compiled = torch.compile(lambda a, b: moco_fast.nt_xent(a, b, 0.5, backend="torch"), fullgraph=True)
    loss = compiled(z0, z1)
    grads = torch.autograd.grad(loss, (z0, z1))
    ref, g0, g1 = nt_xent_oracle(z0, z1, 0.5)
    assert abs(loss.item() - ref.mean().item()) < 1e-5
    assert torch.allclose(grads[0].double(), g0, atol=1e-5) and torch.allclose(grads[1].double(), g1, atol=1e-5)
