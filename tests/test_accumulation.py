"""Gradient accumulation, exactly: N micro-batches of one optimizer step == one batch N times larger.

The official code enqueues keys and moves the key encoder at every forward, so micro-batches see
different dictionaries; ``accumulate()`` blocks keep the dictionary fixed for the step and move it once.
Models without BatchNorm (its statistics would differ between micro-batches and the large batch).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moco_fast

DIM, QUEUE, BATCH, MICRO = 16, 96, 24, 4


def features(rows, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, DIM, generator=g).requires_grad_(requires_grad)


def assert_same_queue(a: moco_fast.KeyQueue, b: moco_fast.KeyQueue) -> None:
    for name, buf in a.named_buffers():
        assert torch.equal(buf, dict(b.named_buffers())[name]), name


@pytest.mark.parametrize("symmetric", [False, True])
def test_head_micro_batches_equal_one_large_batch(symmetric):
    big = moco_fast.MoCoHead(DIM, QUEUE, 0.2, queue_init="random", symmetric=symmetric)
    small = copy.deepcopy(big)
    n_views = 4 if symmetric else 2
    inputs = [features(BATCH, seed, requires_grad=(i < n_views // 2)) for i, seed in enumerate(range(n_views))]
    loss_big = big(*inputs)
    loss_big.backward()
    grads_big = [x.grad.clone() for x in inputs if x.requires_grad]

    leaves = [x.detach().clone().requires_grad_(x.requires_grad) for x in inputs]
    total = 0.0
    with small.accumulate():
        for chunk in zip(*(x.chunk(MICRO) for x in leaves)):
            loss = small(*chunk) / MICRO
            loss.backward()
            total = total + loss.detach()
            assert int(small.queue.ptr) == 0  # nothing enqueued inside the step
    torch.testing.assert_close(total, loss_big.detach(), rtol=1e-6, atol=1e-7)
    for g_small, g_big in zip([x.grad for x in leaves if x.requires_grad], grads_big):
        torch.testing.assert_close(g_small, g_big, rtol=1e-5, atol=1e-7)
    assert_same_queue(small.queue, big.queue)  # same keys, same order (k1 of every micro-batch, then k2)


class Linear2(nn.Module):
    """A small encoder without BatchNorm, with the ``fc`` the MoCo builder expects."""

    def __init__(self, num_classes=DIM):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 32), nn.ReLU())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("symmetric", [False, True])
def test_moco_micro_batches_equal_one_large_batch(symmetric):
    torch.manual_seed(0)
    big = moco_fast.MoCo(Linear2, dim=DIM, K=QUEUE, m=0.9, T=0.2, mlp=True, symmetric=symmetric, queue_init="random")
    small = copy.deepcopy(big)
    with torch.no_grad():  # the key encoder differs from the query encoder, as after some training
        for p in list(big.encoder_k.parameters()) + list(small.encoder_k.parameters()):
            p.mul_(0.5)
    x_q, x_k = torch.randn(BATCH, 20), torch.randn(BATCH, 20)
    loss_big, _ = big(x_q, x_k)
    loss_big.backward()
    total = 0.0
    with small.accumulate():
        for cq, ck in zip(x_q.chunk(MICRO), x_k.chunk(MICRO)):
            loss, _ = small(cq, ck)
            (loss / MICRO).backward()
            total += loss.item() / MICRO
    assert abs(total - loss_big.item()) < 1e-6
    for (name, p_small), p_big in zip(small.encoder_q.named_parameters(), big.encoder_q.parameters()):
        torch.testing.assert_close(p_small.grad, p_big.grad, rtol=1e-5, atol=1e-7, msg=name)
    for p_small, p_big in zip(small.encoder_k.parameters(), big.encoder_k.parameters()):
        assert torch.equal(p_small, p_big)  # moved once, by the same update
    assert small.momentum_encoder.step == big.momentum_encoder.step == 1
    # the same keys in the same order (to the last bits: a matmul of 6 rows may round unlike one of 24)
    torch.testing.assert_close(small.queue.keys, big.queue.keys, rtol=1e-6, atol=1e-7)
    assert torch.equal(small.queue.ptr, big.queue.ptr) and torch.equal(small.queue.count, big.queue.count)
    # outside the block every forward updates and enqueues again, as the official code does
    small(x_q[:4], x_k[:4])
    assert small.momentum_encoder.step == 2


def test_the_official_per_forward_order_differs():
    """Without accumulate() the micro-batches see a moving queue: the check above is not vacuous."""
    big = moco_fast.MoCoHead(DIM, QUEUE, 0.2, queue_init="random")
    small = copy.deepcopy(big)
    q, k = features(BATCH, 0), features(BATCH, 1)
    loss_big = big(q, k)
    total = sum(small(cq, ck) / MICRO for cq, ck in zip(q.chunk(MICRO), k.chunk(MICRO)))
    assert abs(total.item() - loss_big.item()) > 1e-4


def test_an_exception_inside_the_step_enqueues_nothing():
    head = moco_fast.MoCoHead(DIM, QUEUE, 0.2)
    before = {n: b.clone() for n, b in head.queue.named_buffers()}
    with pytest.raises(RuntimeError, match="boom"), head.accumulate():
        head(F.normalize(features(4, 0)), features(4, 1))
        raise RuntimeError("boom")
    assert_same_queue(head.queue, type("Q", (), {"named_buffers": lambda self: before.items()})())
    head(features(4, 0), features(4, 1))  # usable afterwards: enqueues at once again
    assert int(head.queue.count) == 4


def test_accumulate_errors():
    head = moco_fast.MoCoHead(DIM, 8, 0.2)
    with head.accumulate():
        with pytest.raises(RuntimeError, match="nest"), head.accumulate():
            pass
        head(features(6, 0), features(6, 1))
        with pytest.raises(ValueError, match="would not fit the queue"):
            head(features(6, 0), features(6, 1))
    assert int(head.queue.count) == 6  # the keys that fit were enqueued once, at the end


# --- the memory bank, DINO's center and SwAV's queue ------------------------------------------------------
#
# Each check runs one step twice from the same state: one large batch, and micro-batches of the given sizes
# (each loss weighted by its share of the rows, the losses being row means) — inside ``accumulate()``, or,
# with ``accumulate=False``, the naive per-call updates, which must differ (so the checks can fail).

SPLITS = [[12, 12], [8, 8, 8], [5, 11, 8]]  # N = 2, 3, and unequal sizes
NUM_SAMPLES = 30


def micro_step(run, splits, rows, context):
    """Sum over micro-batches of ``run(slice) · size / rows``, each backwarded at once; returns the sum."""
    total, start = 0.0, 0
    with context:
        for size in splits:
            loss = run(slice(start, start + size)) * (size / rows)
            loss.backward()
            total = total + loss.detach()
            start += size
    return total


def bank_step(splits, accumulate=True):
    """One step of a BN-free encoder + MemoryBankHead (exact softmax), on a fresh copy of one state."""
    torch.manual_seed(3)
    model, head = Linear2(), moco_fast.MemoryBankHead(NUM_SAMPLES, DIM, temperature=0.2, momentum=0.5)
    x = torch.randn(BATCH, 20)
    # with replacement: rows repeated within and across micro-batches (the last occurrence of the step wins)
    idx = torch.randint(NUM_SAMPLES, (BATCH,), generator=torch.Generator().manual_seed(4))
    idx[-1] = idx[0]
    if splits is None:
        loss = head(model(x), idx)
        loss.backward()
    else:
        context = head.accumulate() if accumulate else contextlib.nullcontext()
        loss = micro_step(lambda s: head(model(x[s]), idx[s]), splits, BATCH, context)
    return loss.detach(), [p.grad for p in model.parameters()], head.bank.bank.clone()


def assert_same_step(got, expected, rtol, atol):
    (loss, grads, state), (loss_e, grads_e, state_e) = got, expected
    torch.testing.assert_close(loss, loss_e, rtol=rtol, atol=atol)
    for g, g_e in zip(grads, grads_e):
        torch.testing.assert_close(g, g_e, rtol=rtol, atol=atol)
    torch.testing.assert_close(state, state_e, rtol=1e-6, atol=1e-7)


def assert_not_same_step(got, expected):
    (loss, _, state), (loss_e, _, state_e) = got, expected
    assert abs(loss.item() - loss_e.item()) > 1e-4 and (state - state_e).abs().max() > 1e-3


@pytest.mark.parametrize("splits", SPLITS, ids=str)
def test_memory_bank_micro_batches_equal_one_large_batch(splits):
    big = bank_step(None)
    assert_same_step(bank_step(splits), big, rtol=1e-5, atol=1e-7)
    assert_not_same_step(bank_step(splits, accumulate=False), big)


def dino_step(splits, fused=False, accumulate=True):
    """One step of a BN-free float64 student (+ fixed teacher) and DINOLoss, 2 global + 1 local crop."""
    torch.manual_seed(5)
    loss_fn = moco_fast.DINOLoss(DIM, warmup_teacher_temp_epochs=0, center_momentum=0.8)
    loss_fn.center.normal_()  # a center that is not zero, as after some steps
    if fused:
        student = moco_fast.DINOHead(20, 32, 8, DIM).double()
        teacher = copy.deepcopy(student).requires_grad_(False)
        with torch.no_grad():
            teacher.last_layer.weight_v.mul_(-1.5).add_(0.3)
    else:
        student, teacher = nn.Linear(20, DIM).double(), nn.Linear(20, DIM).double().requires_grad_(False)
    crops = [torch.randn(BATCH, 20, dtype=torch.float64) for _ in range(3)]

    def run(s):
        if fused:
            w, w_t = student.prototypes, teacher.prototypes
            h_t = [teacher.bottleneck(c[s]) for c in crops[:2]]
            return loss_fn.forward_fused(h_t, [student.bottleneck(c[s]) for c in crops], w, w_t)
        return loss_fn([teacher(c[s]) for c in crops[:2]], [student(c[s]) for c in crops])

    if splits is None:
        loss = run(slice(None))
        loss.backward()
    else:
        context = loss_fn.accumulate() if accumulate else contextlib.nullcontext()
        loss = micro_step(run, splits, BATCH, context)
    return loss.detach(), [p.grad for p in student.parameters() if p.requires_grad], loss_fn.center.clone()


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("splits", SPLITS, ids=str)
def test_dino_micro_batches_equal_one_large_batch(splits, fused):
    big = dino_step(None, fused)
    assert_same_step(dino_step(splits, fused), big, rtol=1e-10, atol=1e-12)
    assert_not_same_step(dino_step(splits, fused, accumulate=False), big)


def test_dino_plain_and_fused_calls_share_one_step():
    """A step may mix the two paths (and update_center): one move, from the mean over every call's rows."""
    torch.manual_seed(0)
    w = F.normalize(torch.randn(DIM, 8, dtype=torch.float64), dim=1)
    h = [F.normalize(torch.randn(BATCH, 8, dtype=torch.float64), dim=1) for _ in range(2)]
    extra = torch.randn(2, 7, DIM, dtype=torch.float64)
    a, b = moco_fast.DINOLoss(DIM), moco_fast.DINOLoss(DIM)
    with a.accumulate():
        a([x[:10] @ w.T for x in h], [x[:10] @ w.T for x in h])
        a.forward_fused([x[10:] for x in h], [x[10:] for x in h], w)
        a.update_center(extra)
        assert torch.count_nonzero(a.center) == 0  # fixed inside the step
    b.update_center(torch.cat([torch.stack(h) @ w.T, extra], dim=1))
    torch.testing.assert_close(a.center, b.center, rtol=1e-6, atol=1e-7)
    assert a._calls == b._calls == 1


def test_swav_queue_accumulates_one_enqueue():
    big, small = moco_fast.SwaVQueue(2, 40, DIM), moco_fast.SwaVQueue(2, 40, DIM)
    protos = moco_fast.SwaVPrototypes(DIM, 5)
    z = [features(BATCH, seed) for seed in (0, 1)]
    big.enqueue(z)
    with small.accumulate():
        for s in (slice(0, 5), slice(5, 16), slice(16, None)):
            assert small.outputs(protos) is None  # the queues as they were (empty) until the step ends
            small.enqueue([v[s] for v in z])
        assert int(small.queues[0].count) == 0
    for qs, qb in zip(small.queues, big.queues):
        assert_same_queue(qs, qb)
    with pytest.raises(ValueError, match="would not fit"), small.accumulate():
        small.enqueue(z)
        small.enqueue(z)


@pytest.mark.parametrize("which", ["bank", "dino", "swav"])
def test_a_raise_inside_the_step_changes_nothing_and_blocks_do_not_nest(which):
    if which == "bank":
        obj = moco_fast.MemoryBankHead(NUM_SAMPLES, DIM)
        state, call = obj.bank.bank, lambda: obj(features(6, 0), torch.arange(6))
    elif which == "dino":
        obj = moco_fast.DINOLoss(DIM)
        state, call = obj.center, lambda: obj([features(6, 0)], [features(6, 1), features(6, 2)])
    else:
        obj = moco_fast.SwaVQueue(2, 40, DIM)
        state, call = obj.queues[1].keys, lambda: obj.enqueue([features(6, 0), features(6, 1)])
    before = state.clone()
    with pytest.raises(RuntimeError, match="boom"), obj.accumulate():
        call()
        raise RuntimeError("boom")
    assert torch.equal(state, before)
    with obj.accumulate():
        with pytest.raises(RuntimeError, match="do not nest"), obj.accumulate():
            pass
        call()
        assert torch.equal(state, before)
    assert not torch.equal(state, before)  # the step's update, once the block ended
    call()  # outside a block every call updates at once again
    after = state.clone()
    call()
    assert not torch.equal(state, after)


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_one_non_finite_micro_batch_refuses_the_whole_step(on_nonfinite):
    """The policy of one large update: a NaN anywhere in the step writes nothing (raised at the block's end)."""
    head = moco_fast.MemoryBankHead(NUM_SAMPLES, DIM, on_nonfinite=on_nonfinite)
    dino = moco_fast.DINOLoss(DIM, on_nonfinite=on_nonfinite)
    bank, center = head.bank.bank.clone(), dino.center.clone()
    bad = features(6, 1)
    bad[2, 3] = float("nan")
    for obj, call in (
        (head.bank, lambda f: head.bank.update(torch.arange(6), f)),
        (dino, lambda f: dino.update_center(f[None])),
    ):
        context = pytest.raises(ValueError, match="NaN or Inf") if on_nonfinite == "raise" else contextlib.nullcontext()
        with context, obj.accumulate():
            call(features(6, 0))
            call(bad)
        assert int(obj.num_skipped) == (on_nonfinite == "skip")
    assert torch.equal(head.bank.bank, bank) and torch.equal(dino.center, center)


def test_device_path_refusal_of_an_accumulated_step(monkeypatch):
    """On a GPU (the device code path, run here on CPU tensors) the step's refusal is counted without a host
    read and raised by the next call, as for one large update."""
    import moco_fast.queue as queue_module
    import moco_fast.torch_backend.memory_bank as torch_bank

    monkeypatch.setattr(queue_module, "_reads_are_free", lambda t: False)
    monkeypatch.setattr(torch_bank, "_update_host_", torch_bank._update_device_)
    bank, dino = moco_fast.MemoryBank(NUM_SAMPLES, DIM, backend="torch"), moco_fast.DINOLoss(DIM)
    before_bank, before_center = bank.bank.clone(), dino.center.clone()
    bad = features(6, 1)
    bad[2, 3] = float("inf")
    with bank.accumulate(), dino.accumulate():
        for f in (features(6, 0), bad):
            bank.update(torch.arange(6), f)
            dino.update_center(f[None])
    assert torch.equal(bank.bank, before_bank) and torch.equal(dino.center, before_center)
    assert int(bank.num_skipped) == int(dino.num_skipped) == 1
    with pytest.raises(moco_fast.NonFiniteFeaturesError, match="#1 or earlier"):
        bank.update(torch.arange(6), features(6, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        dino([features(6, 0)], [features(6, 1), features(6, 2)])
