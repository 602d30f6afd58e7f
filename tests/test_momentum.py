"""momentum_update, the backends' momentum_update_ and MomentumEncoder, against the formulas and the
official per-parameter loop, on every backend.

The formulas are in tests/oracle.py: the default update is the lerp t + (1 − m)·(s − t) rounded once to the
storage dtype (every backend, within one rounding); ``exact=True`` is the official t·m + s·(1 − m) with its
two roundings, bit for bit (the backends that declare the "exact" mode: torch, reference).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from conftest import contract, no_host_sync, requires_cuda
from moco_fast.kernels import heuristics as H
from oracle import bf16_ulp, close_1ulp, ema64, lerp, official_momentum, ulp

from moco_fast import MomentumEncoder, cosine_momentum, momentum_update
from moco_fast.reference import reference_momentum_update
from moco_fast.torch_backend import momentum as torch_momentum

pytestmark = pytest.mark.usefixtures("one_thread")  # many small cases: see conftest.one_thread


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = module.state_dict()
    assert current.keys() == state.keys()
    for name, value in state.items():
        assert current[name].dtype == value.dtype, name
        assert torch.equal(current[name], value), f"{name} changed"


@torch.no_grad()
def sgd_like_step(model: nn.Module, scale: float = 0.05) -> None:
    """Move the online model as an optimizer would (random, different every step)."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)


# ------------------------------------------------------------------------------------------------
# momentum_update
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("momentum", [0.999, 0.99, 0.5, 0.0, 1.0])
def test_module_update_equals_official_loop_exactly(backend, momentum):
    online = SmallCNN()
    ours = copy.deepcopy(online)
    official = copy.deepcopy(online)
    sgd_like_step(ours, 1.0)  # key encoder != online, as after some training
    official.load_state_dict(ours.state_dict())
    buffers_before = {k: v.clone() for k, v in ours.named_buffers()}
    for step in range(5):
        sgd_like_step(online)
        momentum_update(ours, online, momentum, exact=True, backend=backend)
        reference_momentum_update(official, online, momentum)
        for (name, p), q in zip(ours.named_parameters(), official.parameters(), strict=True):
            assert torch.equal(p, q), f"step {step}: {name}"
        for name, b in ours.named_buffers():  # BN statistics untouched
            assert torch.equal(b, buffers_before[name]), name
    if momentum == 0.0:
        for p, q in zip(ours.parameters(), online.parameters(), strict=True):
            assert torch.equal(p, q)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.999, 0.9, 0.3, 0.0, 1.0])
def test_default_update_is_one_lerp(backend, dtype, momentum):
    """The default arithmetic: torch.lerp(t, s, 1 − m) (one pass), within 2 ulp of the exact value."""
    online = SmallCNN().to(dtype)
    ours = copy.deepcopy(online)
    sgd_like_step(ours, 1.0)
    for _ in range(3):
        sgd_like_step(online)
        expected = [torch.lerp(t, s, 1.0 - momentum) for t, s in zip(ours.parameters(), online.parameters())]
        before = [(t.double(), s.double()) for t, s in zip(ours.parameters(), online.parameters())]
        momentum_update(ours, online, momentum, backend=backend)
        for p, e, (t, src) in zip(ours.parameters(), expected, before, strict=True):
            assert torch.equal(p, e)
            if dtype == torch.float32:  # within 2 ulp of the exact update (float64 math)
                x = t + (1.0 - momentum) * (src - t)
                ulp = torch.finfo(dtype).eps * torch.maximum(t.abs(), src.abs()).clamp_min(torch.finfo(dtype).tiny)
                assert ((p.double() - x).abs() <= 2 * ulp).all()
    if momentum == 0.0:
        for p, q in zip(ours.parameters(), online.parameters(), strict=True):
            assert torch.equal(p, q)


def test_update_touches_only_parameters_not_buffers():
    online = SmallCNN()
    key = copy.deepcopy(online)
    online.train()
    online(torch.randn(4, 3, 8, 8))  # the online BN statistics move
    key_buffers = {k: v.clone() for k, v in key.named_buffers()}
    assert any(not torch.equal(a, b) for a, b in zip(online.buffers(), key.buffers(), strict=True))
    momentum_update(key, online, 0.9)
    for name, b in key.named_buffers():
        assert torch.equal(b, key_buffers[name]), name


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_tensor_list_form_equals_formula(backend):
    shapes = [(3, 5), (7,), (2, 3, 4), (1,), (129, 17)]
    targets = [torch.randn(s) for s in shapes]
    sources = [torch.randn(s) for s in shapes]
    expected = [official_momentum(t, s, 0.99) for t, s in zip(targets, sources, strict=True)]
    sources_before = [s.clone() for s in sources]
    ptrs = [t.data_ptr() for t in targets]
    momentum_update(targets, sources, 0.99, exact=True, backend=backend)
    for t, e, ptr in zip(targets, expected, ptrs, strict=True):
        assert torch.equal(t, e)
        assert t.data_ptr() == ptr  # in place
    for s, b in zip(sources, sources_before, strict=True):
        assert torch.equal(s, b)


def test_tensor_list_form_accepts_parameters_and_tuples():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    expected = [official_momentum(p.detach(), q.detach(), 0.9) for p, q in zip(a.parameters(), b.parameters())]
    momentum_update(tuple(a.parameters()), list(b.parameters()), 0.9, exact=True)
    for p, e in zip(a.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), e)
        assert p.grad is None


def test_non_contiguous_tensors():
    targets = [torch.randn(6, 4).T, torch.randn(8)[::2]]
    sources = [torch.randn(4, 6), torch.randn(4)]
    expected = [official_momentum(t, s, 0.7) for t, s in zip(targets, sources, strict=True)]
    momentum_update(targets, sources, 0.7, exact=True)
    for t, e in zip(targets, expected, strict=True):
        assert torch.equal(t, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.999, 0.99, 0.9])
def test_half_precision_rounded_once(dtype, momentum):
    shapes = [(33, 7), (1000,), (5, 5, 5)]
    targets = [torch.randn(s).to(dtype) for s in shapes]
    sources = [(t.float() + 0.1 * torch.randn(t.shape)).to(dtype) for t in targets]
    exact = [ema64(t, s, momentum) for t, s in zip(targets, sources, strict=True)]
    stays = [t.clone() for t in targets]
    momentum_update(targets, sources, momentum)
    changed = 0
    for t, e, before in zip(targets, exact, stays, strict=True):
        assert t.dtype == dtype
        assert ((t.double() - e).abs() <= ulp(e, dtype)).all(), "more than one ulp from the exact update"
        changed += int((t != before).sum())
    # with m = 0.999 a naive update in the half dtype itself would round most updates away;
    # fp32 math rounded once moves at least some elements
    assert changed > 0


def test_bf16_module_update():
    online = SmallCNN().to(torch.bfloat16)
    key = copy.deepcopy(online)
    sgd_like_step(online, 0.5)
    exact = [ema64(k, o, 0.99) for k, o in zip(key.parameters(), online.parameters(), strict=True)]
    momentum_update(key, online, 0.99)
    for p, e in zip(key.parameters(), exact, strict=True):
        assert p.dtype == torch.bfloat16
        assert ((p.double() - e).abs() <= bf16_ulp(e)).all()


def test_float64_update_equals_official():
    online = SmallCNN().double()
    ours, official = copy.deepcopy(online), copy.deepcopy(online)
    for _ in range(3):
        sgd_like_step(online)
        momentum_update(ours, online, 0.99, exact=True)
        reference_momentum_update(official, online, 0.99)
    for p, q in zip(ours.parameters(), official.parameters(), strict=True):
        assert torch.equal(p, q)


def test_mixed_dtype_lists_are_grouped():
    targets = [torch.randn(4), torch.randn(3).to(torch.bfloat16), torch.randn(5)]
    sources = [torch.randn(4), torch.randn(3).to(torch.bfloat16), torch.randn(5)]
    expected = [ema64(t, s, 0.9) for t, s in zip(targets, sources, strict=True)]
    fp32_expected = [torch.lerp(targets[i], sources[i], 1.0 - 0.9) for i in (0, 2)]
    momentum_update(targets, sources, 0.9)
    assert torch.equal(targets[0], fp32_expected[0]) and torch.equal(targets[2], fp32_expected[1])
    assert ((targets[1].double() - expected[1]).abs() <= bf16_ulp(expected[1])).all()


# ------------------------------------------------------------------------------------------------
# the backends' momentum_update_ (the contract) on every backend
# ------------------------------------------------------------------------------------------------


def update(backend, targets, sources, momentum, exact=False):
    """The backend's contract function (inputs of one device, dtype, contiguous, as the caller groups them)."""
    contract(backend).momentum_update_(targets, sources, momentum, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_contract_multi_tensor(backend, device, dtype):
    shapes = [(3,), (17, 5), (64,), (70001,), (2, 3, 4), (1,), (H.MOMENTUM_CHUNK,), (0,)]
    ts = [torch.randn(s).to(dtype).to(device) for s in shapes]
    ss = [torch.randn(s).to(dtype).to(device) for s in shapes]
    want = [lerp(t, s, 0.99) for t, s in zip(ts, ss)]
    ss_before = [s.clone() for s in ss]
    update(backend, ts, ss, 0.99)
    for t, w in zip(ts, want):
        assert close_1ulp(t, w)
    assert all(torch.equal(a, b) for a, b in zip(ss, ss_before)), "sources must not change"
    # A second call (Triton: the cached chunk table) must update again.
    want = [lerp(t, s, 0.5) for t, s in zip(ts, ss)]
    update(backend, ts, ss, 0.5)
    for t, w in zip(ts, want):
        assert close_1ulp(t, w)


def test_contract_unaligned_views(backend, device):
    """Views starting 1 element into a buffer: not 16-byte aligned (Triton: the unvectorized path)."""
    bt = torch.randn(10001, device=device)
    bs = torch.randn(10001, device=device)
    ts = [bt[1:5001], bt[5003:10001]]
    ss = [bs[1:5001].clone(), bs[5003:10001]]
    want = [lerp(t, s, 0.9) for t, s in zip(ts, ss)]
    untouched = (bt[0].item(), bt[5001].item(), bt[5002].item())
    update(backend, ts, ss, 0.9)
    for t, w in zip(ts, want):
        assert close_1ulp(t, w)
    assert (bt[0].item(), bt[5001].item(), bt[5002].item()) == untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_flat_buffer(backend, device, dtype):
    """One flat buffer, or views lying back to back in one (Triton: the single flat launch)."""
    flat_t = torch.randn(123457).to(dtype).to(device)
    flat_s = torch.randn(123457).to(dtype).to(device)
    want = lerp(flat_t, flat_s, 0.999)
    update(backend, [flat_t], [flat_s], 0.999)
    assert close_1ulp(flat_t, want)
    sizes = [100, 2000, 3, 121354]
    ts, ss = list(flat_t.split(sizes)), list(flat_s.split(sizes))
    want = lerp(flat_t, flat_s, 0.7)
    update(backend, ts, ss, 0.7)
    assert close_1ulp(flat_t, want)


# (targets, sources): each a list of views into one buffer, given as (start, length) spans. "gapped":
# holes between the views; "reversed": back to back in memory but listed in the other order; "flat": back
# to back in order. Only flat/flat is one span for Triton's flat kernel; every other pairing must be
# updated view by view, and nothing outside the views may change.
SPANS = {
    "flat": [(0, 1000), (1000, 1200), (2200, 5)],
    "gapped": [(10, 1000), (1500, 1200), (3000, 5)],
    "reversed": [(1205, 1000), (5, 1200), (0, 5)],
}


@pytest.mark.parametrize(
    "target_spans,source_spans",
    [("gapped", "gapped"), ("flat", "gapped"), ("gapped", "flat"), ("reversed", "flat"), ("flat", "reversed")],
)
def test_contract_views_of_one_buffer_that_are_not_one_span(backend, device, target_spans, source_spans):
    buf_t, buf_s = torch.randn(4000, device=device), torch.randn(4000, device=device)
    ts = [buf_t[a : a + n] for a, n in SPANS[target_spans]]
    ss = [buf_s[a : a + n] for a, n in SPANS[source_spans]]
    before_t, before_s = buf_t.clone(), buf_s.clone()
    want = [lerp(t, s, 0.9) for t, s in zip(ts, ss)]
    update(backend, ts, ss, 0.9)
    for i, (t, w) in enumerate(zip(ts, want)):
        assert close_1ulp(t, w), f"view {i}"
    inside = torch.zeros(4000, dtype=torch.bool, device=device)
    for a, n in SPANS[target_spans]:
        inside[a : a + n] = True
    assert torch.equal(buf_t[~inside], before_t[~inside]), "an element outside the target views changed"
    assert torch.equal(buf_s, before_s), "sources must not change"


def test_contract_same_addresses_other_lengths(backend, device):
    """Consecutive calls whose views start at the same addresses but have other lengths (Triton caches a
    chunk table per call signature): each call updates exactly its own elements."""
    buf_t, buf_s = torch.randn(1000, device=device), torch.randn(1000, device=device)
    for lengths in ((100, 50), (300, 20), (100, 450)):
        ts = [buf_t[: lengths[0]], buf_t[500 : 500 + lengths[1]]]
        ss = [buf_s[: lengths[0]], buf_s[500 : 500 + lengths[1]]]
        before = buf_t.clone()
        want = [lerp(t, s, 0.5) for t, s in zip(ts, ss)]
        update(backend, ts, ss, 0.5)
        for i, (t, w) in enumerate(zip(ts, want)):
            assert close_1ulp(t, w), f"lengths {lengths}: view {i}"
        outside = torch.ones(1000, dtype=torch.bool, device=device)
        outside[: lengths[0]] = outside[500 : 500 + lengths[1]] = False
        assert torch.equal(buf_t[outside], before[outside]), f"lengths {lengths}"


@pytest.mark.parametrize("n", [1, 15, H.MOMENTUM_BLOCK - 1, H.MOMENTUM_BLOCK, 3 * H.MOMENTUM_BLOCK + 17])
def test_contract_flat_tail(backend, device, n):
    """Sizes around Triton's block (its unmasked body and masked last block); the element just past
    the end untouched."""
    bt = torch.randn(n + 1, device=device)
    ts = bt[:n]
    ss = torch.randn(n, device=device)
    sentinel = bt[n].item()
    want = lerp(ts, ss, 0.9)
    update(backend, [ts], [ss], 0.9)
    assert close_1ulp(ts, want) and bt[n].item() == sentinel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("flat", [True, False])
def test_contract_is_a_lerp(backend, device, dtype, flat):
    """target == source stays bit-identical (a lerp moves by w*(s - t) = 0); the two-rounding
    t*m + s*(1-m) does not. One flat tensor and a list (Triton: both kernels)."""
    t = (torch.randn(4099) * 3).to(dtype).to(device)
    ts = [t] if flat else [t[:2000], t[2003:]]
    ss = [x.clone() for x in ts]
    before = [x.clone() for x in ts]
    update(backend, ts, ss, 0.999)
    assert all(torch.equal(a, b) for a, b in zip(ts, before))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contract_misaligned_views_and_shapes(backend, device, dtype):
    """Views at odd offsets (scalar path), 2-D/4-D shapes, neighbours untouched."""
    buf_t = torch.randn(10_000, device=device).to(dtype)
    buf_s = torch.randn(10_000, device=device).to(dtype)
    before = buf_t.clone()
    targets = [buf_t[1:1001], buf_t[1003 : 1003 + 64 * 3 * 3].view(64, 3, 3), buf_t[2000 : 2000 + 33 * 7].view(33, 7)]
    sources = [buf_s[5:1005], buf_s[3001 : 3001 + 64 * 3 * 3].view(64, 3, 3), buf_s[4000 : 4000 + 33 * 7].view(33, 7)]
    expect = [lerp(t, s, 0.9) for t, s in zip(targets, sources, strict=True)]
    update(backend, targets, sources, 0.9)
    tol = MOMENTUM_TOL[dtype]
    for got, exp in zip(targets, expect, strict=True):
        torch.testing.assert_close(got, exp, rtol=tol, atol=tol)
    untouched = torch.ones(10_000, dtype=torch.bool, device=device)
    untouched[1:1001] = untouched[1003 : 1003 + 576] = untouched[2000:2231] = False
    assert torch.equal(buf_t[untouched], before[untouched])


@pytest.mark.parametrize("backend", ["torch", "reference"], indirect=True)
def test_contract_exact_mode_across_chunk_boundaries(backend, monkeypatch):
    """The exact mode bit for bit, element by element, on a list larger than the torch backend's chunk
    (_MOMENTUM_CHUNK elements per fused call): every tensor updated exactly once, the one where a chunk
    ends too. Twice: with the real chunk, and with a chunk of 64 so that many boundaries fall inside."""
    for chunk in (torch_momentum._MOMENTUM_CHUNK, 64):
        monkeypatch.setattr(torch_momentum, "_MOMENTUM_CHUNK", chunk)
        sizes = [chunk // 2 + 1, chunk // 2, 7, chunk - 3, 1, 2 * chunk + 5, 3, chunk, 5]
        assert sum(sizes) > 4 * chunk
        ts, ss = [torch.randn(n) for n in sizes], [torch.randn(n) for n in sizes]
        want = [official_momentum(t, s, 0.99) for t, s in zip(ts, ss)]
        update(backend, ts, ss, 0.99, exact=True)
        for i, (t, w) in enumerate(zip(ts, want)):
            assert torch.equal(t, w), f"chunk {chunk}: tensor {i} of {len(ts)} ({t.numel()} elements)"


def test_public_momentum_update(backend, device):
    """moco_fast.momentum_update(tensors, ..., backend=...) takes the backend and updates by the formula."""
    ts = [torch.randn(s, device=device) for s in ((5, 3), (7,), (11, 2))]
    ss = [torch.randn(t.shape, device=device) for t in ts]
    want = [lerp(t, s, 0.99) for t, s in zip(ts, ss)]
    momentum_update(ts, ss, 0.99, backend=backend)
    assert all(close_1ulp(t, w) for t, w in zip(ts, want))


def test_encoder_update_on_every_backend(backend, device):
    """MomentumEncoder's flat buffer against separate online parameters, through the backend."""
    online = SmallCNN().to(device)
    enc = MomentumEncoder(online, momentum=0.9, backend=backend)
    sgd_like_step(online)
    want = [lerp(p, o, 0.9) for p, o in zip(enc.module.parameters(), online.parameters())]
    assert enc.update() == 0.9
    for p, w in zip(enc.module.parameters(), want, strict=True):
        assert close_1ulp(p, w)


MOMENTUM_TOL = {torch.float32: 2e-7, torch.float64: 1e-12, torch.bfloat16: 8e-3, torch.float16: 1e-3}
on_cuda = pytest.mark.parametrize("backend", ["cuda"], indirect=True)


@requires_cuda
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gpu_contract_list_of_many_tensors(backend, device, dtype):
    sizes = [0, 1, 3, 7, 8, 9, 1000, 4099, 70000, (1 << 20) + 3] + [int(x) for x in torch.randint(1, 300, (3000,))]
    targets = [torch.randn(n, device=device).to(dtype) for n in sizes]
    sources = [torch.randn(n, device=device).to(dtype) for n in sizes]
    expect = [lerp(t, s, 0.99) for t, s in zip(targets, sources, strict=True)]
    with no_host_sync(device):
        update(backend, targets, sources, 0.99)
    tol = MOMENTUM_TOL[dtype]
    for got, exp in zip(targets, expect, strict=True):
        torch.testing.assert_close(got, exp, rtol=tol, atol=tol)


@requires_cuda
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_contract_flat_buffer(backend, device, dtype):
    t = torch.randn(3_000_017, device=device).to(dtype)
    s = torch.randn(3_000_017, device=device).to(dtype)
    expect = lerp(t, s, 0.999)
    with no_host_sync(device):
        update(backend, [t], [s], 0.999)
    tol = MOMENTUM_TOL[dtype]
    torch.testing.assert_close(t, expect, rtol=tol, atol=tol)


@requires_cuda
@on_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("t_off, s_off", [(0, 0), (1, 1), (3, 3), (1, 2), (2, 0)])
@pytest.mark.parametrize("n", [1, 5, 17, 1031, 70001])
def test_gpu_contract_any_offset_and_length(backend, device, dtype, t_off, s_off, n):
    """Targets/sources at every element offset within 16 bytes, same or different, lengths N % 16 != 0:
    the masked edge slots write exactly the pair's elements."""
    buf_t = torch.randn(n + 64, device=device).to(dtype)
    buf_s = torch.randn(n + 64, device=device).to(dtype)
    before = buf_t.clone()
    t, s = buf_t[t_off : t_off + n], buf_s[s_off : s_off + n]
    expect = lerp(t, s, 0.99)
    update(backend, [t], [s], 0.99)
    tol = MOMENTUM_TOL[dtype]
    torch.testing.assert_close(t, expect, rtol=tol, atol=tol)
    outside = torch.ones(n + 64, dtype=torch.bool, device=device)
    outside[t_off : t_off + n] = False
    assert torch.equal(buf_t[outside], before[outside])
    # the same pair through the table kernel (two pairs: one launch with a device table)
    buf_t.copy_(before)
    update(backend, [t, buf_t[-3:]], [s, buf_s[-3:]], 0.99)
    torch.testing.assert_close(t, expect, rtol=tol, atol=tol)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_gpu_contract_resnet50_sized(backend, device):
    g = torch.Generator(device=device).manual_seed(0)
    sizes = [2359296, 1048576, 262144, 65536, 4096, 2048, 512, 256, 64, 10] * 16
    ts = [torch.randn(s, device=device, generator=g) for s in sizes]
    ss = [torch.randn(s, device=device, generator=g) for s in sizes]
    want = [lerp(t, s, 0.999) for t, s in zip(ts, ss)]
    update(backend, ts, ss, 0.999)
    assert all(close_1ulp(t, w) for t, w in zip(ts, want))


# ------------------------------------------------------------------------------------------------
# validation: nothing changes on bad input
# ------------------------------------------------------------------------------------------------


def _lists():
    targets = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)]
    sources = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2)]
    return targets, sources


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda t, s: s.__setitem__(2, torch.randn(3, 2)), ValueError, "shape"),  # last pair mismatched
        (lambda t, s: s.__setitem__(1, torch.randn(6)), ValueError, "shape"),
        (lambda t, s: s.pop(), ValueError, "3 tensors"),  # count mismatch
        (lambda t, s: s.__setitem__(2, torch.randn(2, 2).double()), TypeError, "float64"),
        (lambda t, s: s.__setitem__(2, torch.ones(2, 2, dtype=torch.int64)), TypeError, "floating"),
        (lambda t, s: s.__setitem__(2, torch.randn(2, 2, device="meta")), ValueError, "meta"),
        (lambda t, s: s.__setitem__(2, "x"), TypeError, "source"),
    ],
)
def test_bad_pairs_raise_before_any_change(mutate, exc, match):
    targets, sources = _lists()
    mutate(targets, sources)
    before = [t.clone() for t in targets]
    with pytest.raises(exc, match=match):
        momentum_update(targets, sources, 0.5)
    for t, b in zip(targets, before, strict=True):
        assert torch.equal(t, b)


def test_mismatched_modules_raise_before_any_change():
    key = SmallCNN()
    other = SmallCNN()
    other.fc = nn.Linear(16, 11)  # the last parameters differ in shape
    before = clone_state(key)
    with pytest.raises(ValueError, match="shape"):
        momentum_update(key, other, 0.9)
    assert_state_equal(key, before)
    shorter = nn.Sequential(*list(SmallCNN().features))  # no fc: fewer parameters
    with pytest.raises(ValueError, match="tensors"):
        momentum_update(key, shorter, 0.9)
    assert_state_equal(key, before)


@pytest.mark.parametrize("momentum", [-0.1, 1.0001, 2.0, float("nan"), float("inf"), -float("inf")])
def test_momentum_out_of_range_raises(momentum):
    targets, sources = _lists()
    before = [t.clone() for t in targets]
    with pytest.raises(ValueError, match="momentum"):
        momentum_update(targets, sources, momentum)
    for t, b in zip(targets, before, strict=True):
        assert torch.equal(t, b)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(SmallCNN(), momentum=momentum)
    with pytest.raises(ValueError, match="momentum"):
        MomentumEncoder(SmallCNN(), momentum=0.9, schedule="cosine", final_momentum=momentum, total_steps=10)


@pytest.mark.parametrize("momentum", ["0.9", None, True, torch.tensor([0.9, 0.9])])
def test_momentum_not_a_number_raises_type_error(momentum):
    targets, sources = _lists()
    with pytest.raises(TypeError, match="momentum"):
        momentum_update(targets, sources, momentum)


def test_single_tensor_instead_of_list_raises():
    with pytest.raises(TypeError, match="target"):
        momentum_update(torch.randn(3), [torch.randn(3)], 0.9)


# ------------------------------------------------------------------------------------------------
# MomentumEncoder
# ------------------------------------------------------------------------------------------------


def test_encoder_update_equals_official_loop_exactly_and_never_touches_online():
    online = SmallCNN()
    enc = MomentumEncoder(online, momentum=0.99, exact=True)
    official = copy.deepcopy(online)
    assert enc.online is online
    for step in range(6):
        sgd_like_step(online)
        online_state = clone_state(online)
        requires_grad = [p.requires_grad for p in online.parameters()]
        enc.train()
        out = enc(torch.randn(4, 3, 8, 8))  # moves the key encoder's own BN statistics
        assert not out.requires_grad
        m = enc.update()
        assert m == 0.99
        reference_momentum_update(official, online, 0.99)
        for (name, p), q in zip(enc.module.named_parameters(), official.parameters(), strict=True):
            assert torch.equal(p, q), f"step {step}: {name}"
        assert_state_equal(online, online_state)  # never modified by forward or update
        assert [p.requires_grad for p in online.parameters()] == requires_grad
        assert all(p.grad is None for p in online.parameters())
    assert enc.step == 6
    # the key encoder's BN statistics are its own (moved by its forwards), not the online model's
    for (name, b_key), b_online in zip(enc.module.named_buffers(), online.buffers(), strict=True):
        if "running_mean" in name:
            assert not torch.equal(b_key, b_online), name


def test_encoder_reuses_its_plan_and_rebuilds_it_when_parameters_move(monkeypatch):
    import moco_fast.momentum as momentum_module

    builds = []
    real = momentum_module.momentum_plan
    monkeypatch.setattr(momentum_module, "momentum_plan", lambda *a: builds.append(1) or real(*a))
    online = SmallCNN()
    enc = MomentumEncoder(online, momentum=0.9)
    for _ in range(3):
        enc.update()
    assert len(builds) == 1  # validated once, reused
    online.fc = nn.Linear(16, 10)  # a replaced parameter: new storage
    expected = [torch.lerp(p, o, 0.1) for p, o in zip(enc.module.parameters(), online.parameters())]
    enc.update()
    assert len(builds) == 2
    for p, e in zip(enc.module.parameters(), expected, strict=True):
        assert torch.equal(p, e)
    enc.update(SmallCNN())  # another model: a plan of its own
    assert len(builds) == 3


def test_encoder_rebuilds_its_plan_when_a_parameter_gets_new_storage():
    """``p.data = ...`` registers nothing but gives the parameter new storage: the cached plan (which holds
    the old tensors) must not be reused, or the update would read the old values."""
    online = SmallCNN()
    enc = MomentumEncoder(online, momentum=0.9, exact=True)
    official = copy.deepcopy(online)
    enc.update()
    reference_momentum_update(official, online, 0.9)
    with torch.no_grad():
        online.fc.weight.data = online.fc.weight.data * 2 + 1  # new storage, same Parameter object
        online.features[0].bias.data = torch.randn_like(online.features[0].bias)
    enc.update()
    reference_momentum_update(official, online, 0.9)
    for (name, p), q in zip(enc.module.named_parameters(), official.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_encoder_update_from_another_model():
    online = SmallCNN()
    other = SmallCNN()
    enc = MomentumEncoder(online, momentum=0.5, exact=True)
    official = copy.deepcopy(online)
    enc.update(other)
    reference_momentum_update(official, other, 0.5)
    for p, q in zip(enc.module.parameters(), official.parameters(), strict=True):
        assert torch.equal(p, q)


def test_encoder_is_a_deep_copy_without_grad():
    online = SmallCNN()
    enc = MomentumEncoder(online)
    for p, q in zip(enc.module.parameters(), online.parameters(), strict=True):
        assert torch.equal(p, q)
        assert p.data_ptr() != q.data_ptr()
        assert not p.requires_grad and q.requires_grad
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    y = enc(x)
    assert not y.requires_grad and y.grad_fn is None
    # the online model is not part of the encoder's state (not saved or moved twice)
    assert all(not k.startswith("_online") for k in enc.state_dict())
    assert sum(1 for _ in enc.parameters()) == sum(1 for _ in online.parameters())


def _assert_flat(module: nn.Module) -> None:
    """Each (dtype) group of parameters are disjoint views covering one storage exactly."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in module.parameters():
        groups.setdefault(p.dtype, []).append(p)
    for dtype, params in groups.items():
        storages = {p.untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1, f"{dtype}: {len(storages)} storages"
        storage = params[0].untyped_storage()
        base = storage.data_ptr()
        size = params[0].element_size()
        spans = sorted((p.data_ptr() - base, p.data_ptr() - base + p.numel() * size) for p in params)
        assert spans[0][0] == 0
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end == start, "parameter views overlap or leave gaps"
        assert spans[-1][1] == storage.nbytes()
        for p in params:
            assert p.is_contiguous()


def test_encoder_parameters_are_views_of_one_flat_buffer():
    online = SmallCNN()
    enc = MomentumEncoder(online)
    _assert_flat(enc.module)
    enc.update()
    _assert_flat(enc.module)


@pytest.mark.parametrize("convert", ["to_float64", "double", "to_bfloat16"])
def test_flat_buffer_survives_dtype_conversion(convert):
    online = SmallCNN()
    enc = MomentumEncoder(online, momentum=0.9)
    values = [p.detach().clone() for p in enc.module.parameters()]
    if convert == "to_float64":
        enc = enc.to(torch.float64)
        dtype = torch.float64
    elif convert == "double":
        enc = enc.double()
        dtype = torch.float64
    else:
        enc = enc.to(torch.bfloat16)
        dtype = torch.bfloat16
    for p, v in zip(enc.module.parameters(), values, strict=True):
        assert p.dtype == dtype
        assert torch.equal(p, v.to(dtype))
    _assert_flat(enc.module)
    # the update still works (and writes into the flat buffer) once the online model matches
    online.to(dtype)
    sgd_like_step(online)
    exact = [ema64(p, o, 0.9) for p, o in zip(enc.module.parameters(), online.parameters(), strict=True)]
    enc.update()
    for p, e in zip(enc.module.parameters(), exact, strict=True):
        assert p.dtype == dtype
        if dtype == torch.bfloat16:
            assert ((p.double() - e).abs() <= bf16_ulp(e)).all()
        else:
            assert torch.allclose(p, e, rtol=1e-6, atol=1e-6)  # float64 exactness: the strict test below
    _assert_flat(enc.module)


def test_update_after_conversion_to_float64_equals_official():
    online = SmallCNN()
    enc = MomentumEncoder(online, momentum=0.9, exact=True).double()
    online.double()
    official = copy.deepcopy(enc.module)
    for _ in range(3):
        sgd_like_step(online)
        enc.update()
        reference_momentum_update(official, online, 0.9)
    for p, q in zip(enc.module.parameters(), official.parameters(), strict=True):
        assert torch.equal(p, q)


def test_mixed_dtype_model_gets_one_flat_buffer_per_dtype():
    online = SmallCNN()
    online.fc.to(torch.bfloat16)
    enc = MomentumEncoder(online)
    _assert_flat(enc.module)
    dtypes = {p.dtype for p in enc.module.parameters()}
    assert dtypes == {torch.float32, torch.bfloat16}


def test_cosine_schedule_values():
    base, final, total = 0.99, 1.0, 100
    assert cosine_momentum(0, total, base, final) == base
    assert math.isclose(cosine_momentum(total, total, base, final), final, rel_tol=0, abs_tol=1e-15)
    assert math.isclose(cosine_momentum(total // 2, total, base, final), (base + final) / 2, abs_tol=1e-15)
    assert cosine_momentum(2 * total, total, base, final) == cosine_momentum(total, total, base, final)
    values = [cosine_momentum(t, total, base, final) for t in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))  # monotone from base to final
    assert math.isclose(cosine_momentum(25, 100, 0.996, 1.0), 1.0 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def test_encoder_cosine_schedule_and_state_dict_round_trip():
    online = SmallCNN()
    enc = MomentumEncoder(online, momentum=0.9, schedule="cosine", final_momentum=1.0, total_steps=10)
    assert enc.momentum == 0.9
    used = [enc.update() for _ in range(5)]
    assert used[0] == 0.9
    assert used == [cosine_momentum(t, 10, 0.9, 1.0) for t in range(5)]
    assert enc.step == 5
    assert math.isclose(enc.momentum, 0.95, abs_tol=1e-15)
    buf = io.BytesIO()
    torch.save(enc.state_dict(), buf)
    buf.seek(0)
    resumed = MomentumEncoder(online, momentum=0.9, schedule="cosine", final_momentum=1.0, total_steps=10)
    assert resumed.step == 0
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    assert resumed.step == 5 and resumed.momentum == enc.momentum
    for p, q in zip(resumed.module.parameters(), enc.module.parameters(), strict=True):
        assert torch.equal(p, q)
    _assert_flat(resumed.module)
    for _ in range(7):
        assert resumed.update() == enc.update()
    for p, q in zip(resumed.module.parameters(), enc.module.parameters(), strict=True):
        assert torch.equal(p, q)
    assert enc.momentum == 1.0  # past total_steps: stays at the final value
    frozen = [p.clone() for p in enc.module.parameters()]
    sgd_like_step(online)
    enc.update()
    for p, f in zip(enc.module.parameters(), frozen, strict=True):
        assert torch.equal(p, f)


def test_encoder_constant_schedule():
    enc = MomentumEncoder(SmallCNN(), momentum=0.996, schedule="constant")
    assert [enc.update() for _ in range(3)] == [0.996] * 3


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(schedule="linear"), ValueError, "schedule"),
        (dict(schedule="cosine"), ValueError, "total_steps"),
        (dict(schedule="cosine", total_steps=0), ValueError, "total_steps"),
        (dict(schedule="cosine", total_steps=2.5), ValueError, "total_steps"),
    ],
)
def test_encoder_constructor_checks(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MomentumEncoder(SmallCNN(), **kwargs)


def test_encoder_needs_a_module():
    with pytest.raises(TypeError, match="online"):
        MomentumEncoder([torch.randn(3)])


def test_encoder_update_with_mismatched_model_changes_nothing():
    enc = MomentumEncoder(SmallCNN(), momentum=0.9)
    before = clone_state(enc.module)
    other = SmallCNN()
    other.fc = nn.Linear(16, 3)
    with pytest.raises(ValueError):
        enc.update(other)
    assert_state_equal(enc.module, before)
    assert enc.step == 0
