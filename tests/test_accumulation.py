"""Gradient accumulation, exactly: N micro-batches of one optimizer step == one batch N times larger.

The official code enqueues keys and moves the key encoder at every forward, so micro-batches see
different dictionaries; ``accumulate()`` blocks keep the dictionary fixed for the step and move it once.
Models without BatchNorm (its statistics would differ between micro-batches and the large batch).
"""

from __future__ import annotations

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
