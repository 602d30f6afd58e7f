"""MoCoHead against the official MoCo computation, step by step.

``Official`` below is the official MoCo code (moco/builder.py) reduced to its head: F.normalize,
einsum l_pos / l_neg against a (dim, K) queue buffer, cat, /T, cross_entropy against zero labels,
then _dequeue_and_enqueue with the transposed write. The official code asserts K % B == 0; here
1000 % 96 != 0, so its write uses modular column indices (the only change).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import EXACT_BACKENDS
from oracle import check_rank, infonce_forward, rel

import moco_fast
from moco_fast import MoCoHead, NonFiniteKeysError
from moco_fast.reference import topk_accuracy

RTOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")

# The 30-step comparisons with the official code run on the exact backends (the interpreter is too slow
# for them); test_symmetric_stats_are_both_directions_in_order runs on every backend.
# (MoCoHead(backend="reference") enqueues into the very tensor the reference einsum saved for the
# backward, so loss.backward() after a training-mode call would raise "modified by an inplace operation"
# if the reference path did not contrast against a copy, as the official code's queue.clone().detach().)
head_backends = pytest.mark.parametrize("backend", EXACT_BACKENDS, indirect=True)


class Official:
    def __init__(self, queue_rows: torch.Tensor, temperature: float):
        self.queue = queue_rows.T.clone().float()  # (dim, K), as register_buffer("queue", randn(dim, K))
        self.queue_ptr = torch.zeros(1, dtype=torch.long)
        self.T = temperature

    def logits(self, q, k):
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1)
        return logits / self.T

    def loss(self, q, k):
        logits = self.logits(q, k)
        labels = torch.zeros(logits.shape[0], dtype=torch.long)
        return F.cross_entropy(logits, labels), logits

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        size = self.queue.shape[1]
        cols = (ptr + torch.arange(batch_size)) % size  # the official code: self.queue[:, ptr:ptr + B]
        self.queue[:, cols] = keys.T
        ptr = (ptr + batch_size) % size
        self.queue_ptr[0] = ptr

    def forward(self, q_raw, k_raw):
        q = F.normalize(q_raw, dim=1)
        with torch.no_grad():
            k = F.normalize(k_raw, dim=1)
        loss, logits = self.loss(q, k)
        self._dequeue_and_enqueue(k)
        return loss, logits

    def forward_symmetric(self, q1_raw, q2_raw, k1_raw, k2_raw):
        q1, q2 = F.normalize(q1_raw, dim=1), F.normalize(q2_raw, dim=1)
        with torch.no_grad():
            k1, k2 = F.normalize(k1_raw, dim=1), F.normalize(k2_raw, dim=1)
        loss_12, logits_12 = self.loss(q1, k2)
        loss_21, logits_21 = self.loss(q2, k1)
        loss = 0.5 * (loss_12 + loss_21)  # the demo sums; MoCoHead averages
        self._dequeue_and_enqueue(torch.cat([k1, k2], dim=0))
        return loss, torch.cat([logits_12, logits_21])


def make_views(encoder_q, x, noise):
    """Queries from a trainable encoder; keys correlated with them (varied strength) and without grad."""
    q_raw = encoder_q(x)
    with torch.no_grad():
        k_raw = q_raw.detach() + noise * q_raw.std() * torch.randn_like(q_raw)
    return q_raw, k_raw


@head_backends
@pytest.mark.parametrize("temperature", [0.07, 0.2])
def test_asymmetric_matches_official_over_30_steps(backend, temperature):
    batch, dim, size, in_dim = 96, 128, 1000, 32
    head = MoCoHead(dim, size, temperature, queue_init="random", backend=backend)
    assert head.queue.is_full
    official = Official(head.queue.keys, temperature)
    enc = nn.Linear(in_dim, dim)
    enc_off = copy.deepcopy(enc)
    noise = torch.linspace(0.1, 6.0, batch)[:, None]  # rows from easy to hard: acc1 strictly in (0, 1)
    acc1_seen, acc5_seen = [], []
    for step in range(30):
        x = torch.randn(batch, in_dim)
        q_raw, k_raw = make_views(enc, x, noise)
        q_leaf = q_raw.detach().clone().requires_grad_()
        q_leaf_off = q_raw.detach().clone().requires_grad_()

        loss, stats = head(enc(x) if step % 2 else q_leaf, k_raw, return_stats=True)
        loss_off, logits_off = official.forward(enc_off(x) if step % 2 else q_leaf_off, k_raw)
        assert loss.dtype == torch.float32 and loss.shape == ()
        assert abs(loss.item() - loss_off.item()) <= RTOL * abs(loss_off.item()), step

        enc.zero_grad()
        enc_off.zero_grad()
        loss.backward()  # after the enqueue: the backward does not need the old queue
        loss_off.backward()
        if step % 2:
            assert rel(enc.weight.grad, enc_off.weight.grad) < RTOL, step
            assert rel(enc.bias.grad, enc_off.bias.grad) < RTOL, step
        else:
            assert rel(q_leaf.grad, q_leaf_off.grad) < RTOL, step

        # queue contents: the same normalized keys at the same rows
        assert torch.equal(head.queue.keys, official.queue.T), step
        assert head.queue.ptr.item() == official.queue_ptr.item() == (step + 1) * batch % size

        acc1, acc5 = topk_accuracy(logits_off.detach(), (1, 5))
        assert head.last_stats is stats
        assert stats.acc1.item() == acc1.item(), step
        assert stats.acc5.item() == acc5.item(), step
        acc1_seen.append(acc1.item())
        acc5_seen.append(acc5.item())
    assert 0 < min(acc1_seen) and max(acc1_seen) < 1 and max(acc5_seen) > min(acc1_seen)


@head_backends
def test_symmetric_matches_official_over_30_steps(backend):
    batch, dim, size, temperature = 96, 128, 1000, 0.2
    head = MoCoHead(dim, size, temperature, queue_init="random", symmetric=True, backend=backend)
    official = Official(head.queue.keys, temperature)
    noise = torch.linspace(0.1, 6.0, batch)[:, None]
    acc1_seen = []
    for step in range(30):
        q1_raw, q2_raw = torch.randn(batch, dim), torch.randn(batch, dim)
        k1_raw = q1_raw + noise * torch.randn(batch, dim)
        k2_raw = q2_raw + noise * torch.randn(batch, dim)
        # InfoNCE(q1, k2): make the cross-view pairs positives, as in the demo
        k1_raw, k2_raw = k2_raw.clone(), k1_raw.clone()
        leaves = [t.clone().requires_grad_() for t in (q1_raw, q2_raw)]
        leaves_off = [t.clone().requires_grad_() for t in (q1_raw, q2_raw)]
        if step % 5 == 0:  # float64 rows in the head's order: InfoNCE(q1, k2), InfoNCE(q2, k1); queue before
            n = lambda t: F.normalize(t, dim=1)
            queue_before = official.queue.T.clone()
            ref12 = infonce_forward(n(q1_raw), n(k2_raw), queue_before, 1 / temperature)
            ref21 = infonce_forward(n(q2_raw), n(k1_raw), queue_before, 1 / temperature)
        loss, stats = head(*leaves, k1_raw, k2_raw, return_stats=True)
        loss_off, logits_off = official.forward_symmetric(*leaves_off, k1_raw, k2_raw)
        assert abs(loss.item() - loss_off.item()) <= RTOL * abs(loss_off.item()), step
        loss.backward()
        loss_off.backward()
        for ours, theirs in zip(leaves, leaves_off, strict=True):
            assert rel(ours.grad, theirs.grad) < RTOL, step
        assert torch.equal(head.queue.keys, official.queue.T), step
        assert head.queue.ptr.item() == (step + 1) * 2 * batch % size
        acc1, acc5 = topk_accuracy(logits_off.detach(), (1, 5))
        assert stats.rank.shape == (2 * batch,) and stats.lse.shape == (2 * batch,)
        assert stats.acc1.item() == acc1.item() and stats.acc5.item() == acc5.item(), step
        if step % 5 == 0:  # row by row, in order (averages like acc1 cannot see two halves swapped or repeated)
            check_rank(stats.rank, torch.cat([ref12.pos, ref21.pos]), torch.cat([ref12.neg, ref21.neg]), eps=1e-4)
            lse64 = torch.cat([ref12.lse, ref21.lse])
            assert ((stats.lse.double() - lse64).abs() / lse64.abs()).max().item() < RTOL, step
        acc1_seen.append(acc1.item())
    assert 0 < min(acc1_seen) and max(acc1_seen) < 1


@head_backends
def test_backward_after_the_enqueue(backend):
    """A training step calls head(q, k) (which enqueues k) and only then loss.backward()."""
    head = MoCoHead(16, 40, 0.1, queue_init="random", backend=backend)
    negatives = head.queue.negatives().clone()
    q = torch.randn(5, 16, requires_grad=True)
    k = torch.randn(5, 16)
    head(q, k).backward()
    q_ref = q.detach().clone().requires_grad_()
    moco_fast.info_nce(F.normalize(q_ref, dim=1), F.normalize(k, dim=1), negatives, 0.1).backward()
    assert rel(q.grad, q_ref.grad) < RTOL


def test_symmetric_loss_is_the_average_of_both_directions():
    head = MoCoHead(16, 40, 0.1, queue_init="random", symmetric=True, backend="torch")
    negatives = head.queue.negatives().clone()
    q1, q2, k1, k2 = (torch.randn(5, 16) for _ in range(4))
    loss = head(q1, q2, k1, k2)
    n = lambda t: F.normalize(t, dim=1)
    expected = 0.5 * (
        moco_fast.info_nce(n(q1), n(k2), negatives, 0.1) + moco_fast.info_nce(n(q2), n(k1), negatives, 0.1)
    )
    assert torch.allclose(loss, expected, rtol=1e-6)
    # both key batches enqueued once, after both losses: k1 first, then k2
    assert torch.equal(head.queue.keys[:10], torch.cat([n(k1), n(k2)]))
    assert head.queue.ptr.item() == 10


def test_symmetric_stats_are_both_directions_in_order(backend, device):
    """stats.rank and stats.lse are InfoNCE(q1, k2)'s rows followed by InfoNCE(q2, k1)'s, element by
    element, and the loss is their average: the same calls made by hand give the same bits."""
    head = MoCoHead(16, 40, 0.1, queue_init="random", symmetric=True, backend=backend).to(device)
    negatives = head.queue.negatives().clone()
    q1, q2, k1, k2 = (torch.randn(5, 16, device=device) for _ in range(4))
    loss, stats = head(q1, q2, k1, k2, return_stats=True)
    n = lambda t: F.normalize(t, dim=1)
    loss12, s12 = moco_fast.info_nce(n(q1), n(k2), negatives, 0.1, backend=backend, return_stats=True)
    loss21, s21 = moco_fast.info_nce(n(q2), n(k1), negatives, 0.1, backend=backend, return_stats=True)
    assert not torch.equal(s12.lse, s21.lse), "the two directions must differ, or the order could not be seen"
    assert torch.equal(stats.rank, torch.cat([s12.rank, s21.rank]))
    assert torch.equal(stats.lse, torch.cat([s12.lse, s21.lse]))
    assert stats.acc1.item() == (stats.rank < 1).float().mean().item()
    assert stats.acc5.item() == (stats.rank < 5).float().mean().item()
    assert torch.equal(loss, 0.5 * (loss12 + loss21))
    assert head.last_stats is stats


@pytest.mark.parametrize("symmetric", [False, True])
def test_eval_mode_does_not_enqueue(symmetric):
    head = MoCoHead(16, 40, 0.1, queue_init="random", symmetric=symmetric, backend="torch")
    before = {name: b.clone() for name, b in head.named_buffers()}
    head.eval()
    tensors = [torch.randn(5, 16) for _ in range(4 if symmetric else 2)]
    loss = head(*tensors)
    assert torch.isfinite(loss)
    for name, b in head.named_buffers():
        assert torch.equal(b, before[name]), name
    head.train()
    head(*tensors)
    assert head.queue.ptr.item() == (10 if symmetric else 5)


def test_nan_key_raises_and_leaves_queue_unchanged():
    head = MoCoHead(16, 40, 0.1, queue_init="random", backend="torch")
    head(torch.randn(5, 16), torch.randn(5, 16))
    before = {name: b.clone() for name, b in head.named_buffers()}
    k = torch.randn(5, 16)
    k[3, 7] = float("nan")
    with pytest.raises(NonFiniteKeysError):
        head(torch.randn(5, 16), k)
    for name, b in head.named_buffers():
        assert torch.equal(b, before[name]), name
    k[3, 7] = float("inf")
    with pytest.raises(NonFiniteKeysError):
        head(torch.randn(5, 16), k)
    for name, b in head.named_buffers():
        assert torch.equal(b, before[name]), name


def test_empty_queue_start_grows_like_the_queue():
    """queue_init="empty": the first batch has no negatives (loss 0), later ones see the filled part."""
    head = MoCoHead(8, 20, 0.1, backend="torch")
    q, k = torch.randn(6, 8), torch.randn(6, 8)
    loss = head(q, k)
    assert loss.item() == 0.0 and head.queue.filled == 6
    q2, k2 = torch.randn(6, 8), torch.randn(6, 8)
    loss2 = head(q2, k2)
    expected = moco_fast.info_nce(F.normalize(q2, dim=1), F.normalize(k2, dim=1), F.normalize(k, dim=1), 0.1)
    assert torch.allclose(loss2, expected, rtol=1e-6)


def test_bf16_queue_and_inputs():
    head = MoCoHead(32, 100, 0.07, queue_dtype=torch.bfloat16, queue_init="random", backend="torch")
    assert head.queue.keys.dtype == torch.bfloat16
    negatives = head.queue.negatives().clone()
    q = torch.randn(10, 32, requires_grad=True)
    k = torch.randn(10, 32)
    loss = head(q, k)
    assert loss.dtype == torch.float32
    ref = moco_fast.info_nce(F.normalize(q, dim=1), F.normalize(k, dim=1), negatives, 0.07, backend="reference")
    assert torch.allclose(loss, ref, rtol=1e-5)
    loss.backward()
    assert torch.isfinite(q.grad).all()
    assert torch.equal(head.queue.keys[:10], F.normalize(k, dim=1).to(torch.bfloat16))


def test_head_state_dict_round_trip():
    a = MoCoHead(8, 20, 0.1, backend="torch")
    a(torch.randn(7, 8), torch.randn(7, 8))
    b = MoCoHead(8, 20, 0.1, backend="torch")
    b.load_state_dict(a.state_dict())
    q, k = torch.randn(7, 8), torch.randn(7, 8)
    assert torch.equal(a(q, k), b(q, k))
    assert torch.equal(a.queue.keys, b.queue.keys)


def test_head_argument_checks():
    head = MoCoHead(16, 40, 0.1, backend="torch")
    with pytest.raises(TypeError, match="q, k"):
        head(torch.randn(5, 16))
    with pytest.raises(ValueError, match="k"):
        head(torch.randn(5, 16), torch.randn(4, 16))
    with pytest.raises(ValueError, match="q"):
        head(torch.randn(5, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="meta"):
        head(torch.randn(5, 16, device="meta"), torch.randn(5, 16, device="meta"))
    with pytest.raises(ValueError, match="k"):
        head(torch.randn(5, 16), torch.randn(5, 16, device="meta"))
    sym = MoCoHead(16, 40, 0.1, symmetric=True, backend="torch")
    with pytest.raises(TypeError, match="q1, q2, k1, k2"):
        sym(torch.randn(5, 16), torch.randn(5, 16))
    with pytest.raises(ValueError, match="temperature"):
        MoCoHead(16, 40, 0.0)
    with pytest.raises(ValueError, match="backend"):
        MoCoHead(16, 40, 0.1, backend="bogus")
    assert head.queue.ptr.item() == 0  # nothing was enqueued by the failed calls
