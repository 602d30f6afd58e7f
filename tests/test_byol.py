"""BYOL / SimSiam losses: lightly parity, float64 math, half-precision inputs, the heads, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import LazyPeer

from moco_fast import BYOLLoss, BYOLPredictionHead, BYOLProjectionHead, NegativeCosineSimilarity, byol_loss

lightly_ncs = LazyPeer("lightly.loss.negative_cosine_similarity")  # only the tests that use it skip without lightly


@pytest.mark.parametrize("shape,dim", [((7, 33), 1), ((5, 4, 9), 2), ((1, 16), 1), ((6, 3), 0)])
def test_negative_cosine_similarity_matches_lightly(shape, dim):
    x0 = torch.randn(*shape, requires_grad=True)
    x1 = torch.randn(*shape, requires_grad=True)
    ours = NegativeCosineSimilarity(dim=dim)(x0, x1)
    g_ours = torch.autograd.grad(ours, [x0, x1])
    theirs = lightly_ncs.NegativeCosineSimilarity(dim=dim)(x0, x1)
    g_theirs = torch.autograd.grad(theirs, [x0, x1])
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(g_ours, g_theirs))
    ref = -F.cosine_similarity(x0.double(), x1.double(), dim=dim).mean()
    assert abs(ours.item() - ref.item()) < 1e-6


def test_negative_cosine_similarity_accumulates_half_inputs_in_fp32():
    x0, x1 = torch.randn(512, 256).bfloat16(), torch.randn(512, 256).bfloat16()
    ours = NegativeCosineSimilarity()(x0, x1)
    ref = -F.cosine_similarity(x0.double(), x1.double()).mean()
    assert ours.dtype == torch.float32 and abs(ours.item() - ref.item()) < 1e-6


def test_byol_loss_is_two_minus_two_cos_without_cancellation():
    p = torch.randn(37, 64, dtype=torch.float64, requires_grad=True)
    z = torch.randn(37, 64, dtype=torch.float64)
    loss = byol_loss(p, z)
    ref = (2 - 2 * F.cosine_similarity(p, z)).mean()
    assert torch.allclose(loss, ref, rtol=1e-12)
    (g,) = torch.autograd.grad(loss, p)
    (g_ref,) = torch.autograd.grad(ref, p)
    assert torch.allclose(g, g_ref, rtol=1e-10, atol=1e-14)
    # Near convergence 2 − 2·cos in fp32 loses every digit; ‖p̂ − ẑ‖² keeps them.
    z32 = F.normalize(torch.randn(64, 128, dtype=torch.float64), dim=1)
    p32 = z32 + 1e-5 * torch.randn(64, 128, dtype=torch.float64)
    exact = byol_loss(p32, z32, reduction="none")
    ours = byol_loss(p32.float(), z32.float(), reduction="none")
    naive = 2 - 2 * F.cosine_similarity(p32.float(), z32.float())
    assert float((ours - exact).abs().max() / exact.abs().max()) < 0.05
    assert float((naive.double() - exact).abs().max() / exact.abs().max()) > 0.5
    assert byol_loss(p, z, reduction="sum").shape == () and byol_loss(p, z, reduction="none").shape == (37,)


def test_byol_loss_symmetrized_and_target_detached():
    p1, p2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    z1, z2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
    loss = BYOLLoss()(p1, p2, z1, z2)
    assert torch.allclose(loss, byol_loss(p1, z2) + byol_loss(p2, z1))
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None


def test_heads():
    proj, pred = BYOLProjectionHead(32, 64, 16), BYOLPredictionHead(16, 64, 16)
    assert pred(proj(torch.randn(5, 32))).shape == (5, 16)
    assert [type(m).__name__ for m in proj] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
        BYOLProjectionHead(32, 0, 16)


def test_bad_input():
    with pytest.raises(ValueError, match="z must have the shape of p"):
        byol_loss(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="reduction must be one of"):
        byol_loss(torch.randn(4, 8), torch.randn(4, 8), reduction="max")
    with pytest.raises(ValueError, match="x1 must have the shape of x0"):
        NegativeCosineSimilarity()(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        NegativeCosineSimilarity(eps=0)
    with pytest.raises(TypeError, match="x0 must be a floating tensor"):
        NegativeCosineSimilarity()(torch.ones(4, 8, dtype=torch.long), torch.randn(4, 8))
