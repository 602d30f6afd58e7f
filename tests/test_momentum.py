"""momentum_update and MomentumEncoder against the official per-parameter loop."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn as nn

from moco_fast import MomentumEncoder, cosine_momentum, momentum_update
from moco_fast.reference import reference_momentum_update


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


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    exponent = torch.floor(torch.log2(x.abs().clamp_min(2.0**-126)))
    return torch.where(x == 0, torch.full_like(x, 2.0**-133), torch.exp2(exponent - 7))


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
    expected = [t * 0.99 + s * (1.0 - 0.99) for t, s in zip(targets, sources, strict=True)]
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
    expected = [
        p.detach() * 0.9 + q.detach() * (1.0 - 0.9) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    ]
    momentum_update(tuple(a.parameters()), list(b.parameters()), 0.9, exact=True)
    for p, e in zip(a.parameters(), expected, strict=True):
        assert torch.equal(p.detach(), e)
        assert p.grad is None


def test_non_contiguous_tensors():
    targets = [torch.randn(6, 4).T, torch.randn(8)[::2]]
    sources = [torch.randn(4, 6), torch.randn(4)]
    expected = [t * 0.7 + s * (1.0 - 0.7) for t, s in zip(targets, sources, strict=True)]
    momentum_update(targets, sources, 0.7, exact=True)
    for t, e in zip(targets, expected, strict=True):
        assert torch.equal(t, e)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("momentum", [0.999, 0.99, 0.9])
def test_half_precision_rounded_once(dtype, momentum):
    shapes = [(33, 7), (1000,), (5, 5, 5)]
    targets = [torch.randn(s).to(dtype) for s in shapes]
    sources = [(t.float() + 0.1 * torch.randn(t.shape)).to(dtype) for t in targets]
    exact = [t.double() * momentum + s.double() * (1.0 - momentum) for t, s in zip(targets, sources, strict=True)]
    stays = [t.clone() for t in targets]
    momentum_update(targets, sources, momentum)
    changed = 0
    for t, e, before in zip(targets, exact, stays, strict=True):
        assert t.dtype == dtype
        if dtype == torch.bfloat16:
            ulp = bf16_ulp(e)
        else:
            ulp = torch.exp2(torch.floor(torch.log2(e.abs().clamp_min(2.0**-14)))) * 2.0**-10
        assert ((t.double() - e).abs() <= ulp).all(), "more than one ulp from the exact update"
        changed += int((t != before).sum())
    # with m = 0.999 a naive update in the half dtype itself would round most updates away;
    # fp32 math rounded once moves at least some elements
    assert changed > 0


def test_bf16_module_update():
    online = SmallCNN().to(torch.bfloat16)
    key = copy.deepcopy(online)
    sgd_like_step(online, 0.5)
    exact = [
        k.double() * 0.99 + o.double() * (1.0 - 0.99)
        for k, o in zip(key.parameters(), online.parameters(), strict=True)
    ]
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
    expected = [(t.double() * 0.9 + s.double() * (1.0 - 0.9)) for t, s in zip(targets, sources, strict=True)]
    fp32_expected = [torch.lerp(targets[i], sources[i], 1.0 - 0.9) for i in (0, 2)]
    momentum_update(targets, sources, 0.9)
    assert torch.equal(targets[0], fp32_expected[0]) and torch.equal(targets[2], fp32_expected[1])
    assert ((targets[1].double() - expected[1]).abs() <= bf16_ulp(expected[1])).all()


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
    exact = [
        p.double() * 0.9 + o.double() * (1.0 - 0.9)
        for p, o in zip(enc.module.parameters(), online.parameters(), strict=True)
    ]
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
