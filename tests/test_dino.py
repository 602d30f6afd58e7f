"""DINO: the fused loss (moco_fast.dino_loss) on every CPU backend, DINOLoss (plain and fused) against lightly,
DINOHead, the center (non-finite teacher, state_dict) and bad input.

The oracle is float64 math written here (independently of moco_fast): logits h·Wᵀ, the centered and
sharpened teacher softmax, the student log-softmax, the mean over pairs of different views; gradients by
float64 autograd. Inputs are rounded to their dtype first and the oracle sees the rounded values, so only
the implementation's own error is measured: ‖out − ref‖ ≤ rtol·‖ref‖ (fp32 2e-5, bf16/fp16 dots 2e-2).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LazyPeer

import moco_fast
from moco_fast import DINOHead, DINOLoss, NonFiniteTeacherError, dino_loss
from moco_fast.reference import reference_dino_loss

BACKENDS = [b for b in moco_fast.available_backends() if b in ("torch", "reference", "triton")]
assert "torch" in BACKENDS and "reference" in BACKENDS


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def unit(n, d, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def oracle(h_s, h_t, w, w_t, center, t_temp, s_temp):
    """float64 (loss, d loss/d h_s (list), d loss/d w) by materialized logits and autograd."""
    hs = [h.detach().double().requires_grad_() for h in h_s]
    w64 = w.detach().double().requires_grad_()
    wt64, c64 = w_t.detach().double(), center.detach().double().reshape(-1)
    teacher = [F.softmax((h.double() @ wt64.T - c64) / t_temp, dim=1) for h in h_t]
    student = [F.log_softmax(h @ w64.T / s_temp, dim=1) for h in hs]
    terms = [
        -(teacher[u] * student[v]).sum(dim=1).mean() for u in range(len(teacher)) for v in range(len(student)) if u != v
    ]
    loss = sum(terms) / len(terms)
    grads = torch.autograd.grad(loss, [*hs, w64], retain_graph=True, allow_unused=True)  # T = 1: view 0 is unused
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, [*hs, w64])]
    # dW is a difference of a student term (from the lse) and a teacher term that cancel exactly at P = 1:
    # its rounding error scales with the terms, so the tolerance does too (see close()).
    lse_part = sum(
        torch.logsumexp(h @ w64.T / s_temp, 1).mean() for u in range(len(teacher)) for v, h in enumerate(hs) if u != v
    )
    parts = torch.autograd.grad(lse_part / len(terms), [*hs, w64], allow_unused=True)
    oracle.scales = [0.0 if g is None else float(g.norm()) for g in parts]
    return loss.detach(), list(grads[:-1]), grads[-1]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def close(got, ref, rtol, i=-1):
    """‖got − ref‖ ≤ rtol·max(‖ref‖, ‖its lse term‖): gradient i (-1: dW) of the oracle's last call."""
    return float((got.double() - ref).norm()) <= rtol * max(float(ref.norm()), oracle.scales[i])


def close_dw(dw, ref_dw, rtol):
    return close(dw, ref_dw, rtol)


def case(B, b, P, S, T, dtype, w_dtype, separate_teacher=True, center_scale=0.3):
    h_s = [unit(B, b, dtype) for _ in range(S)]
    h_t = [unit(B, b, dtype) for _ in range(T)]
    w = unit(P, b, w_dtype)
    w_t = unit(P, b, w_dtype) if separate_teacher else w
    center = (torch.randn(P, dtype=torch.float64) * center_scale).float()
    return h_s, h_t, w, w_t, center


def run(backend, h_s, h_t, w, w_t, center, t_temp=0.04, s_temp=0.1, separate=True):
    hs = [h.clone().requires_grad_() for h in h_s]
    wr = w.clone().requires_grad_()
    loss = dino_loss(hs, h_t, wr, center, teacher_prototypes=w_t if separate else None, student_temp=s_temp,
                     teacher_temp=t_temp, backend=backend)  # fmt: skip
    grads = torch.autograd.grad(loss, [*hs, wr])
    return loss, list(grads[:-1]), grads[-1]


def _sizes(backend):
    # (B, b, P, S, T): odd sizes, P = 1, more teacher than student views, S = 1 with T = 2.
    sizes = [(1, 16, 1, 2, 2), (5, 64, 3001, 4, 2), (37, 16, 301, 6, 2), (5, 16, 97, 1, 2), (3, 16, 50, 3, 1)]
    if backend == "torch":
        sizes += [(37, 256, 3001, 6, 2), (2, 256, 65536, 3, 2)]
    elif backend == "triton":
        sizes += [(1, 16, 65536, 2, 2)]
    else:
        sizes += [(5, 256, 3001, 3, 2)]
    return sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_against_float64(backend):
    for B, b, P, S, T in _sizes(backend):
        for separate in (True, False):
            h_s, h_t, w, w_t, center = case(B, b, P, S, T, torch.float32, torch.float32, separate)
            loss, dh, dw = run(backend, h_s, h_t, w, w_t, center, separate=separate)
            ref_loss, ref_dh, ref_dw = oracle(h_s, h_t, w, w_t if separate else w, center, 0.04, 0.1)
            size = (B, b, P, S, T, separate)
            assert loss.dtype == torch.float32 and loss.dim() == 0
            assert abs(loss.item() - float(ref_loss)) <= 2e-5 * abs(float(ref_loss)) + 1e-5, size
            for v in range(S):
                assert dh[v].dtype == torch.float32 and close(dh[v], ref_dh[v], 2e-5, v), (size, v)
            assert close_dw(dw, ref_dw, 2e-5), size


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_float64_is_exact(backend):
    h_s, h_t, w, w_t, center = case(7, 32, 513, 4, 2, torch.float64, torch.float64)
    loss, dh, dw = run(backend, h_s, h_t, w, w_t, center.double())
    ref_loss, ref_dh, ref_dw = oracle(h_s, h_t, w, w_t, center.double(), 0.04, 0.1)
    assert loss.dtype == torch.float64 and abs(float(loss - ref_loss)) < 1e-12
    assert all(close(a, r, 1e-12, v) for v, (a, r) in enumerate(zip(dh, ref_dh))) and close_dw(dw, ref_dw, 1e-12)


def test_gradcheck_torch_backend():
    h_s, h_t, w, w_t, center = case(3, 8, 37, 3, 2, torch.float64, torch.float64)
    hs = [h.requires_grad_() for h in h_s]
    wr = w.requires_grad_()

    def f(*args):
        return dino_loss(list(args[:-1]), h_t, args[-1], center.double(), teacher_prototypes=w_t, backend="torch")

    assert torch.autograd.gradcheck(f, (*hs, wr))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("mix", ["bf16", "fp16", "bf16_features_fp32_w", "fp32_features_bf16_w"])
def test_half_precision(backend, mix):
    dtype, w_dtype = {
        "bf16": (torch.bfloat16, torch.bfloat16),
        "fp16": (torch.float16, torch.float16),
        "bf16_features_fp32_w": (torch.bfloat16, torch.float32),
        "fp32_features_bf16_w": (torch.float32, torch.bfloat16),
    }[mix]
    h_s, h_t, w, w_t, center = case(5, 64, 301, 4, 2, dtype, w_dtype)
    loss, dh, dw = run(backend, h_s, h_t, w, w_t, center)
    ref_loss, ref_dh, ref_dw = oracle(h_s, h_t, w, w_t, center, 0.04, 0.1)
    assert loss.dtype == torch.float32 and dw.dtype == w_dtype and all(d.dtype == dtype for d in dh)
    # torch: fp32 math on the rounded inputs; triton: equal half types run the dots in that type.
    tol = 2e-2 if (backend == "triton" and dtype == w_dtype) else 2e-5
    grad_tol = max(tol, 1e-2)  # the gradients are rounded to the half dtype on return
    assert abs(float(loss) - float(ref_loss)) <= tol * abs(float(ref_loss)), mix
    assert all(close(a, r, grad_tol, v) for v, (a, r) in enumerate(zip(dh, ref_dh))) and close_dw(
        dw, ref_dw, grad_tol
    ), mix


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_outputs_poisoned_first(backend, monkeypatch):
    """Every allocation during the call starts as NaN: an element a backend forgets to write shows up."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    h_s, h_t, w, w_t, center = case(37, 16, 301, 4, 2, torch.float32, torch.float32)
    ref_loss, ref_dh, ref_dw = oracle(h_s, h_t, w, w_t, center, 0.04, 0.1)
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    loss, dh, dw = run(backend, h_s, h_t, w, w_t, center)
    monkeypatch.undo()
    assert torch.isfinite(loss) and all(torch.isfinite(d).all() for d in dh) and torch.isfinite(dw).all()
    assert close_dw(dw, ref_dw, 2e-5) and all(close(a, r, 2e-5, v) for v, (a, r) in enumerate(zip(dh, ref_dh)))


def test_triton_splits_and_tiles():
    """The Triton forward merged from several prototype splits (flash-decoding) equals one split."""
    KN = pytest.importorskip("moco_fast.kernels")
    if not KN.AVAILABLE or not KN.INTERPRETED:
        pytest.skip("needs the Triton interpreter")
    from moco_fast.kernels import heuristics as H
    from moco_fast.kernels.dino_fwd import dino_softmax_pass

    x, keys, values = unit(37, 16, torch.float32), unit(1001, 16, torch.float32), unit(1001, 16, torch.float32)
    bias = torch.randn(1001) * 0.3
    lse1, out1 = dino_softmax_pass(x, keys, values, bias, 12.5, num_splits=1)
    for splits in (2, 5):
        lse, out = dino_softmax_pass(x, keys, values, bias, 12.5, num_splits=splits, config=H.TileConfig(16, 32, 4, 1))
        assert torch.allclose(lse, lse1, rtol=1e-6, atol=1e-5) and torch.allclose(out, out1, rtol=1e-5, atol=1e-6)
    z = ((x.double() @ keys.double().T) - bias.double()) * 12.5
    assert torch.allclose(lse1.double(), torch.logsumexp(z, 1), rtol=1e-6)
    assert torch.allclose(out1.double(), torch.softmax(z, 1) @ values.double(), atol=1e-6)


def test_large_logits_are_finite():
    """Unnormalized features with logits of hundreds: the online max keeps every pass finite."""
    h_s = [torch.randn(5, 16) * 10 for _ in range(3)]
    h_t = [torch.randn(5, 16) * 10 for _ in range(2)]
    w, w_t = torch.randn(300, 16), torch.randn(300, 16)
    center = torch.randn(300)
    # fp32 rounds each logit to ~eps·|z|: the probabilities (exp(z − lse)) carry that absolute error.
    zmax = max(
        float((torch.cat(h_t) @ w_t.T - center).abs().max()) / 0.04, float((torch.cat(h_s) @ w.T).abs().max()) / 0.1
    )
    rtol = 8 * 2.0**-23 * zmax
    assert rtol < 1e-2
    for backend in BACKENDS:
        loss, dh, dw = run(backend, h_s, h_t, w, w_t, center)
        ref_loss, _, ref_dw = oracle(h_s, h_t, w, w_t, center, 0.04, 0.1)
        assert torch.isfinite(loss) and close_dw(dw, ref_dw, rtol), backend
        assert abs(loss.item() - float(ref_loss)) < rtol * float(ref_loss.abs()), backend


# ------------------------------------------------------------------------------------------------
# DINOLoss: lightly parity (plain and fused), the center, state_dict
# ------------------------------------------------------------------------------------------------


lightly_dino = LazyPeer("lightly.loss.dino_loss")  # only the tests that use it skip without lightly


@pytest.mark.parametrize("S,T", [(2, 2), (6, 2), (3, 1)])
@pytest.mark.parametrize("epoch", [None, 3])
def test_dino_loss_matches_lightly(S, T, epoch):
    B, P = 7, 300
    ours = DINOLoss(P, warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=10)
    theirs = lightly_dino.DINOLoss(P, warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=10)
    for step in range(3):  # the center evolves: losses and centers agree at every step
        teacher = [torch.randn(B, P) for _ in range(T)]
        student = [torch.randn(B, P, requires_grad=True) for _ in range(S)]
        centers_before = ours.center.clone()
        a = ours(teacher, student, epoch=epoch)
        ga = torch.autograd.grad(a, student)
        b = theirs(teacher, student, epoch=epoch)
        gb = torch.autograd.grad(b, student)
        assert a.shape == () and torch.allclose(a, b.reshape(()), rtol=1e-6), step
        assert all(torch.allclose(x, y, rtol=1e-5, atol=1e-9) for x, y in zip(ga, gb)), step
        assert torch.allclose(ours.center, theirs.center, rtol=1e-6, atol=1e-7), step
    assert ours.center.shape == theirs.center.shape == (1, 1, P)
    # the reference formulation (reference.py) in float64 against the last step
    t_temp = float(theirs.teacher_temp_schedule[epoch]) if epoch is not None else 0.06
    ref = reference_dino_loss(
        [t.double() for t in teacher], [s.double() for s in student], centers_before.double(), t_temp
    )
    assert abs(a.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert ours.teacher_temperature(epoch=3) == pytest.approx(float(theirs.teacher_temp_schedule[3]))


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["triton"] if "triton" in BACKENDS else []))
def test_fused_matches_lightly_through_the_head(backend):
    """DINOHead → logits → lightly's DINOLoss, against DINOHead → (bottleneck, prototypes) → forward_fused:
    same loss, same gradients in every parameter of the head, same center."""
    torch.manual_seed(3)
    head = DINOHead(24, 32, 16, 257)
    teacher_head = DINOHead(24, 32, 16, 257)
    with torch.no_grad():
        teacher_head.load_state_dict(head.state_dict())
        teacher_head.last_layer.weight_v.add_(0.1 * torch.randn_like(teacher_head.last_layer.weight_v))
    x_s = [torch.randn(5, 24) for _ in range(4)]
    theirs = lightly_dino.DINOLoss(257, warmup_teacher_temp_epochs=0)
    ours = DINOLoss(257, warmup_teacher_temp_epochs=0, backend=backend)
    for step in range(2):
        with torch.no_grad():
            t_logits = [teacher_head(x) for x in x_s[:2]]
            h_t = [teacher_head.bottleneck(x) for x in x_s[:2]]
        head.zero_grad()
        ref = theirs(t_logits, [head(x) for x in x_s])
        ref.backward()
        ref_grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
        head.zero_grad()
        got = ours.forward_fused(h_t, [head.bottleneck(x) for x in x_s], head.prototypes, teacher_head.prototypes)
        got.backward()
        assert torch.allclose(got, ref.reshape(()), rtol=2e-5), step
        for n, p in head.named_parameters():
            if n in ref_grads:
                assert rel(p.grad, ref_grads[n]) < 1e-4, (n, step)
        assert torch.allclose(ours.center, theirs.center, rtol=1e-4, atol=1e-6), step


def test_head_contract():
    head = DINOHead(20, 32, 8, 50, batch_norm=True, freeze_last_layer=1)
    x = torch.randn(6, 20)
    h = head.bottleneck(x)
    assert torch.allclose(h.norm(dim=1), torch.ones(6))
    assert torch.allclose(head(x), h @ head.prototypes.T, atol=1e-6)
    assert torch.allclose(head.prototypes.norm(dim=1), torch.ones(50))  # norm_last_layer: g = 1
    assert not head.last_layer.weight_g.requires_grad
    assert set(head.last_layer.state_dict()) == {"weight_g", "weight_v"}  # lightly's weight-norm names
    w = head.effective_weight(frozen=head.last_layer_frozen(0))
    (h @ w.T).sum().backward()
    assert torch.count_nonzero(head.last_layer.weight_v.grad) == 0  # frozen: an exact zero gradient
    import copy

    copy.deepcopy(head)  # a momentum teacher copies it (torch's weight_norm hook does not deep-copy)


def test_center_refuses_nonfinite_teacher():
    P = 40
    loss_fn = DINOLoss(P)
    teacher = [torch.randn(3, P), torch.randn(3, P)]
    loss_fn(teacher, [torch.randn(3, P) for _ in range(3)])
    before = loss_fn.center.clone()
    teacher[1][2, 5] = float("nan")
    with pytest.raises(NonFiniteTeacherError, match="center was not updated"):
        loss_fn(teacher, [torch.randn(3, P) for _ in range(3)])
    assert torch.equal(loss_fn.center, before)
    skip = DINOLoss(P, on_nonfinite="skip")
    skip.forward_fused([torch.full((3, 8), float("inf"))] * 2, [torch.randn(3, 8)] * 3, torch.randn(P, 8))
    assert torch.equal(skip.center, torch.zeros(1, 1, P)) and int(skip.num_skipped) == 1


def test_center_refusal_on_the_device_path(monkeypatch):
    """The GPU path (no host read): the refused center stays, the error comes from the next call."""
    import moco_fast.queue as queue_module

    monkeypatch.setattr(queue_module, "_reads_are_free", lambda t: False)
    P = 30
    loss_fn = DINOLoss(P)
    good = [torch.randn(4, P), torch.randn(4, P)]
    loss_fn(good, [torch.randn(4, P)] * 2)
    before = loss_fn.center.clone()
    bad = [good[0], good[1].clone().fill_(float("nan"))]
    loss_fn(bad, [torch.randn(4, P)] * 2)  # refused on the device: no error yet
    assert torch.equal(loss_fn.center, before) and int(loss_fn.num_skipped) == 1
    with pytest.raises(NonFiniteTeacherError, match="call #2 or earlier"):
        loss_fn(good, [torch.randn(4, P)] * 2)
    assert torch.equal(loss_fn.center, before)


def test_center_round_trips_through_state_dict():
    P = 20
    a = DINOLoss(P)
    a([torch.randn(3, P)] * 2, [torch.randn(3, P)] * 3)
    b = DINOLoss(P)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.center, b.center) and set(a.state_dict()) == {"center", "num_skipped"}
    x = [torch.randn(3, P)] * 2
    s = [torch.randn(3, P)] * 3
    assert torch.equal(a(x, s), b(x, s)) and torch.equal(a.center, b.center)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_names_the_argument():
    h, w, c = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(10)
    with pytest.raises(TypeError, match="student must be a list"):
        dino_loss(h, [h], w, c)
    with pytest.raises(ValueError, match="teacher is an empty list"):
        dino_loss([h], [], w, c)
    with pytest.raises(ValueError, match=r"student\[1\] has shape"):
        dino_loss([h, torch.randn(5, 8)], [h], w, c)
    with pytest.raises(ValueError, match="prototypes have dim 9"):
        dino_loss([h, h], [h], torch.randn(10, 9), c)
    with pytest.raises(ValueError, match="center must have shape"):
        dino_loss([h, h], [h], w, torch.zeros(11))
    with pytest.raises(ValueError, match="teacher_prototypes must have the shape"):
        dino_loss([h, h], [h], w, c, teacher_prototypes=torch.randn(11, 8))
    with pytest.raises(ValueError, match="student_temp must be positive"):
        dino_loss([h, h], [h], w, c, student_temp=0.0)
    with pytest.raises(ValueError, match="teacher_temp must be positive"):
        dino_loss([h, h], [h], w, c, teacher_temp=-1.0)
    with pytest.raises(ValueError, match="needs a pair of different views"):
        dino_loss([h], [h], w, c)
    loss_fn = DINOLoss(10)
    with pytest.raises(ValueError, match="at least two views"):
        loss_fn([torch.randn(4, 10)], [torch.randn(4, 10)])
    with pytest.raises(ValueError, match=r"student_out\[0\] has dim 9"):
        loss_fn([torch.randn(4, 10)], [torch.randn(4, 9)])
    with pytest.raises(ValueError, match="prototypes must be"):
        loss_fn.forward_fused([h], [h, h], torch.randn(9, 8))
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="student_temp"):
            DINOLoss(10, student_temp=bad)
    center = loss_fn.center.clone()
    with pytest.raises(ValueError):
        loss_fn.forward_fused([h], [h, h], w, teacher_temp=0.0)
    assert torch.equal(loss_fn.center, center)  # a failed call changes no state


# ------------------------------------------------------------------------------------------------
# registration: opcheck and torch.compile
# ------------------------------------------------------------------------------------------------


def test_opcheck():
    from moco_fast import ops

    S, T, B, b, P = 3, 2, 4, 8, 37
    h_s = unit(S * B, b, torch.float32).requires_grad_()
    h_t, w_t = unit(T * B, b, torch.float32), unit(P, b, torch.float32)
    w, c = unit(P, b, torch.float32).requires_grad_(), torch.randn(P) * 0.1
    torch.library.opcheck(ops.dino_loss_forward, (h_s, h_t, w, w_t, c, S, T, 10.0, 25.0, "torch"))
    lse_s, lse_t = torch.randn(S * B), torch.randn(T * B)
    args = (h_s.detach(), h_t, w.detach(), w_t, c, lse_s, lse_t, S, T, 10.0, 25.0, 0.1, "torch")
    torch.library.opcheck(ops.dino_prototype_grad, args)


def test_compiles_fullgraph():
    h_s, h_t, w, w_t, center = case(4, 8, 37, 3, 2, torch.float32, torch.float32)
    fn = torch.compile(
        lambda hs, ht, w: dino_loss(hs, ht, w, center, backend="torch"), fullgraph=True, backend="aot_eager"
    )
    a = run_with(fn, h_s, h_t, w)
    b = run_with(lambda hs, ht, w: dino_loss(hs, ht, w, center, backend="torch"), h_s, h_t, w)
    assert torch.allclose(a[0], b[0]) and all(torch.allclose(x, y) for x, y in zip(a[1], b[1]))


def run_with(fn, h_s, h_t, w):
    hs = [h.clone().requires_grad_() for h in h_s]
    wr = w.clone().requires_grad_()
    loss = fn(hs, h_t, wr)
    return loss.detach(), torch.autograd.grad(loss, [*hs, wr])


def test_torch_student_pass_fused_and_blockwise_agree(monkeypatch):
    """The torch backend's student pass runs PyTorch's fused CPU attention for fp32 (a guarded private op);
    MOCO_FAST_CPU_FUSED_ATTENTION=0 gives the blockwise sweep: both against float64."""
    from moco_fast.torch_backend.dino import dino_softmax_pass

    x, w = unit(37, 64, torch.float32), unit(3001, 64, torch.float32)
    z = (x.double() @ w.double().T) * 10.0
    for env in ("1", "0"):
        monkeypatch.setenv("MOCO_FAST_CPU_FUSED_ATTENTION", env)
        lse, out = dino_softmax_pass(x, w, w, None, 10.0)
        assert torch.allclose(lse.double(), torch.logsumexp(z, 1), rtol=1e-6), env
        assert rel(out, torch.softmax(z, 1) @ w.double()) < 1e-5, env
