"""SwAV: the log-domain Sinkhorn (exact against float64 exp-domain math, finite where lightly overflows),
SwaVLoss against lightly, the prototypes, the queue (state_dict) and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LazyPeer

from moco_fast import SwaVLoss, SwaVPrototypes, SwaVQueue, sinkhorn
from moco_fast.reference import reference_sinkhorn, reference_swav_loss

lightly_swav = LazyPeer("lightly.loss.swav_loss")  # only the tests that use it skip without lightly


def scores(B, P, dtype=torch.float32, scale=1.0):
    """Cosine-like scores in [-1, 1] (unit features against unit prototypes), optionally scaled."""
    z = F.normalize(torch.randn(B, 32, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(P, 32, dtype=torch.float64), dim=1)
    return ((z @ c.T) * scale).to(dtype)


def exact(s, iterations, epsilon):
    """The official exp-domain algorithm in float64 (e^(1/0.01) = e^100 is far inside fp64's range)."""
    return reference_sinkhorn(s.double(), iterations, epsilon)


@pytest.mark.parametrize("B,P", [(1, 3), (5, 300), (37, 3000), (256, 17)])
@pytest.mark.parametrize("iterations", [0, 1, 3, 10])
@pytest.mark.parametrize("epsilon", [0.05, 0.01])
def test_sinkhorn_is_the_exp_domain_fixed_point(B, P, iterations, epsilon):
    s = scores(B, P)
    codes = sinkhorn(s, iterations, epsilon)
    ref = exact(s, iterations, epsilon)
    assert codes.dtype == torch.float32 and codes.shape == (B, P) and torch.isfinite(codes).all()
    assert torch.allclose(codes.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    if iterations:
        assert torch.allclose(codes.sum(dim=1).double(), torch.ones(B, dtype=torch.float64), atol=1e-5)


def test_sinkhorn_fp64_is_bit_close():
    s = scores(37, 300, torch.float64)
    assert torch.allclose(sinkhorn(s, 3, 0.05), exact(s, 3, 0.05), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "dtype,epsilon", [(torch.float32, 0.01), (torch.bfloat16, 0.01), (torch.float16, 0.05), (torch.float16, 0.01)]
)
def test_sinkhorn_finite_where_lightly_overflows(dtype, epsilon):
    """Scores near 1 with ε = 0.01 give exp(100) (> fp32's 3.4e38); fp16 overflows already at 11/ε."""
    s = scores(64, 300, scale=1.0)
    s[:, 0] = 0.999  # one prototype near every feature: the largest exponent, 99.9 (fp16: 20 at ε 0.05)
    s = s.to(dtype)
    theirs = lightly_swav.sinkhorn(s.clone(), 3, epsilon)
    assert not torch.isfinite(theirs).all(), "lightly was expected to overflow here"
    ours = sinkhorn(s, 3, epsilon)
    ref = exact(s, 3, epsilon)  # the same rounded scores, in float64
    assert torch.isfinite(ours).all() and ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-6)


def test_sinkhorn_matches_lightly_where_lightly_is_finite():
    s = scores(64, 500)
    assert torch.allclose(sinkhorn(s, 3, 0.05), lightly_swav.sinkhorn(s, 3, 0.05), rtol=1e-4, atol=1e-7)


def test_sinkhorn_bad_input():
    with pytest.raises(ValueError, match="epsilon must be positive"):
        sinkhorn(scores(4, 5), 3, 0.0)
    with pytest.raises(ValueError, match="iterations must be a non-negative int"):
        sinkhorn(scores(4, 5), -1)
    with pytest.raises(ValueError, match="scores must be 2-D"):
        sinkhorn(torch.randn(4))
    with pytest.raises(ValueError, match="scores is an empty batch"):
        sinkhorn(torch.randn(0, 5))


# ------------------------------------------------------------------------------------------------
# SwaVLoss
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n_high,n_low,queue", [(2, 0, False), (2, 4, False), (2, 6, True), (1, 1, False), (3, 2, True)]
)
def test_swav_loss_matches_lightly(n_high, n_low, queue):
    B, P = 16, 100
    high = [scores(B, P).requires_grad_() for _ in range(n_high)]
    low = [scores(B, P).requires_grad_() for _ in range(n_low)]
    queue_outputs = [scores(48, P) for _ in range(n_high)] if queue else None
    ours = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    theirs = lightly_swav.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    a = ours(high, low, queue_outputs)
    ga = torch.autograd.grad(a, high + low, allow_unused=True)  # 1 high + 1 low: the high crop only codes
    b = theirs(high, low, queue_outputs)
    gb = torch.autograd.grad(b, high + low, allow_unused=True)
    assert a.shape == () and torch.allclose(a, b.reshape(()), rtol=1e-5)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        assert x is None or float((x - y).norm()) <= 1e-5 * float(y.norm())
    c = reference_swav_loss([h.double() for h in high], [v.double() for v in low],
                            None if queue_outputs is None else [q.double() for q in queue_outputs])  # fmt: skip
    assert abs(a.item() - float(c)) < 1e-5 * float(c)


def test_swav_loss_finite_at_small_epsilon_in_bf16():
    high = [scores(32, 200, torch.bfloat16).requires_grad_() for _ in range(2)]
    for h in high:
        h.data[:, 0] = 0.999
    loss = SwaVLoss(sinkhorn_epsilon=0.01)(high, [])
    theirs = lightly_swav.SwaVLoss(sinkhorn_epsilon=0.01)(high, [])
    assert not torch.isfinite(theirs).all()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(h.grad).all() for h in high)


def test_swav_loss_bad_input():
    loss = SwaVLoss()
    s = scores(8, 10)
    with pytest.raises(ValueError, match="at least two crops"):
        loss([s], [])
    with pytest.raises(ValueError, match="high_resolution_outputs is an empty list"):
        loss([], [s, s])
    with pytest.raises(ValueError, match=r"low_resolution_outputs\[0\] has shape"):
        loss([s, s], [scores(8, 11)])
    with pytest.raises(ValueError, match="queue_outputs has 1 entries"):
        loss([s, s], [], [scores(4, 10)])
    with pytest.raises(ValueError, match=r"queue_outputs\[0\] has 9 prototypes"):
        loss([s, s], [], [scores(4, 9), scores(4, 9)])
    with pytest.raises(TypeError, match="must be a list"):
        loss(s, [])
    for bad in dict(temperature=0.0), dict(sinkhorn_epsilon=-1.0), dict(sinkhorn_iterations=-2):
        with pytest.raises(ValueError):
            SwaVLoss(**bad)


# ------------------------------------------------------------------------------------------------
# prototypes and queue
# ------------------------------------------------------------------------------------------------


def test_prototypes_normalized_and_frozen():
    protos = SwaVPrototypes(16, 30, n_steps_frozen_prototypes=5)
    assert torch.allclose(protos.weight.norm(dim=1), torch.ones(30))
    with torch.no_grad():
        protos.weight.mul_(3.0)
    protos.normalize()
    assert torch.allclose(protos.weight.norm(dim=1), torch.ones(30), atol=1e-6)
    x = F.normalize(torch.randn(4, 16), dim=1)
    with pytest.raises(ValueError, match="pass the current training step"):
        protos(x)
    protos(x, step=2).sum().backward()
    assert protos.weight.grad is not None and torch.count_nonzero(protos.weight.grad) == 0  # frozen: zero grad
    protos.weight.grad = None
    protos(x, step=5).sum().backward()
    assert torch.count_nonzero(protos.weight.grad) > 0
    assert torch.allclose(protos(x, step=9), x @ protos.weight.T)


def test_queue_fills_scores_and_round_trips():
    q = SwaVQueue(2, 12, 8)
    protos = SwaVPrototypes(8, 5)
    assert q.outputs(protos) is None  # not full yet
    batches = [[F.normalize(torch.randn(5, 8), dim=1) for _ in range(2)] for _ in range(3)]
    for b in batches:
        q.enqueue(b)
    outs = q.outputs(protos)
    assert outs is not None and [o.shape for o in outs] == [(12, 5), (12, 5)]
    assert torch.allclose(outs[0], q.queues[0].negatives() @ protos.weight.T)
    state = q.state_dict()
    r = SwaVQueue(2, 12, 8)
    r.load_state_dict(state)
    assert r.is_full and all(torch.equal(a, b) for a, b in zip(q.outputs(protos), r.outputs(protos)))
    with pytest.raises(ValueError, match="got 1 projection batches for 2 queues"):
        q.enqueue([batches[0][0]])
    with pytest.raises(ValueError, match=r"projections\[1\] has dim 7"):
        q.enqueue([batches[0][0], torch.randn(5, 7)])
