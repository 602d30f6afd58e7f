"""moco_fast.NTXentLoss against lightly.loss.NTXentLoss (lightly 1.6): same arguments, same loss and
gradients step after step, with and without a memory bank; the documented differences (a wrapping,
checkpointed bank) and argument errors."""

from __future__ import annotations

import pytest
import torch
from conftest import LazyPeer

import moco_fast

lightly_loss = LazyPeer("lightly.loss")  # only the tests that use it skip without lightly


def steps(ours, theirs, batch, dim, count, *, dtype=torch.float32):
    """Run both losses on the same random batches; return the worst loss and gradient differences."""
    worst_loss = worst_grad = 0.0
    for _ in range(count):
        x0 = torch.randn(batch, dim, dtype=dtype, requires_grad=True)
        x1 = torch.randn(batch, dim, dtype=dtype, requires_grad=True)
        a = theirs(x0, x1)
        ga = torch.autograd.grad(a, (x0, x1))
        b = ours(x0, x1)
        gb = torch.autograd.grad(b, (x0, x1))
        worst_loss = max(worst_loss, abs(a.item() - b.item()) / max(1.0, abs(a.item())))
        for u, v in zip(ga, gb):
            worst_grad = max(worst_grad, ((u - v).norm() / u.norm()).item())
    return worst_loss, worst_grad


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch, dim", [(1, 16), (7, 96), (64, 130)])
def test_in_batch_parity(temperature, batch, dim):
    ours, theirs = moco_fast.NTXentLoss(temperature), lightly_loss.NTXentLoss(temperature)
    loss_err, grad_err = steps(ours, theirs, batch, dim, 2)
    assert loss_err < 2e-6 and grad_err < 2e-5, (loss_err, grad_err)


@pytest.mark.parametrize("batch, bank", [(8, 64), (16, 48), (1, 5)])
def test_memory_bank_parity_over_steps(batch, bank):
    """K % B == 0: the banks hold the same rows after every step (same random init from the same seed)."""
    torch.manual_seed(3)
    theirs = lightly_loss.NTXentLoss(0.2, memory_bank_size=(bank, 32))
    torch.manual_seed(3)
    ours = moco_fast.NTXentLoss(0.2, memory_bank_size=(bank, 32))
    assert torch.equal(ours.memory_bank.keys, theirs.memory_bank.bank)
    loss_err, grad_err = steps(ours, theirs, batch, 32, 2 * bank // batch + 1)
    assert loss_err < 2e-6 and grad_err < 2e-5, (loss_err, grad_err)
    assert torch.allclose(ours.memory_bank.keys, theirs.memory_bank.bank, atol=1e-7)


def test_bank_is_not_updated_without_grad():
    ours = moco_fast.NTXentLoss(0.5, memory_bank_size=(16, 8))
    before = ours.memory_bank.keys.clone()
    with torch.no_grad():
        ours(torch.randn(4, 8), torch.randn(4, 8))
    assert torch.equal(ours.memory_bank.keys, before)


def test_bank_wraps_and_is_checkpointed_where_lightly_drops_rows():
    """K = 10, B = 4: lightly writes rows 8, 9 and drops two keys at the wrap; ours wraps around."""
    ours = moco_fast.NTXentLoss(0.5, memory_bank_size=(10, 8))
    for _ in range(3):
        ours(torch.randn(4, 8, requires_grad=True), torch.randn(4, 8))
    assert ours.memory_bank.ptr.item() == 2
    assert "memory_bank.keys" in ours.state_dict()


def test_argument_errors_like_lightly():
    with pytest.raises(ValueError, match="does not specify the feature dimension"):
        moco_fast.NTXentLoss(memory_bank_size=128)
    with pytest.raises(ValueError, match="temperature"):
        moco_fast.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="out0 and out1 must have the same shape"):
        moco_fast.NTXentLoss()(torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match="memory_bank_size"):
        moco_fast.NTXentLoss(memory_bank_size=(4, 8, 2))
