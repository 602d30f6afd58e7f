"""MemoryBank (InstDisc / NPID) and MemoryBankHead: the update against NPID's code, the exact softmax
against float64 math, duplicates, non-finite features, bad input, checkpoints, the GPU code path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moco_fast
import moco_fast.reference
from moco_fast import backends
from moco_fast import queue as queue_module
from moco_fast.reference import reference_memory_bank_loss, reference_memory_bank_update
from moco_fast.torch_backend import memory_bank as torch_bank

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
UPDATE_BACKENDS = ["torch", "reference"] + (
    ["triton"]
    if backends.is_available("triton")
    and backends.refusal("triton", "memory_bank_update", torch.device("cpu"), (F32,)) is None
    else []
)


def unit(n, d, dtype=F32):
    return F.normalize(torch.randn(n, d, dtype=F64), dim=1).to(dtype)


# ------------------------------------------------------------------------------------------------
# the update
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("bank_dtype, feat_dtype", [(F32, F32), (F32, BF16), (BF16, BF16), (F16, F32)])
def test_update_matches_npid_with_duplicates(backend, bank_dtype, feat_dtype):
    for n, d, b in [(1, 16, 1), (50, 96, 7), (300, 130, 37)]:
        bank = moco_fast.MemoryBank(n, d, momentum=0.5, dtype=bank_dtype, backend=backend)
        expected = bank.bank.clone().double()
        idx = torch.randint(n, (b,))
        if b > 2:
            idx[-1] = idx[0]  # a duplicate: the last occurrence wins
            idx[1] = idx[0]
        feats = unit(b, d, feat_dtype) * 1.7  # not unit: the update normalizes the mix, not f
        bank.update(idx, feats)
        reference_memory_bank_update(expected, idx, feats.double(), 0.5)
        tol = 2e-7 if bank_dtype == F32 else (2.0**-8 if bank_dtype == BF16 else 2.0**-11)
        err = (bank.bank.double() - expected).abs().max().item()
        assert err <= tol, f"n={n} d={d} b={b} {bank_dtype}/{feat_dtype} [{backend}]: {err:.2e}"
        untouched = torch.ones(n, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(bank.bank.double()[untouched], expected[untouched])


def test_duplicate_rule_is_last_occurrence():
    bank = moco_fast.MemoryBank(10, 8, momentum=0.25)
    old = bank.bank[3].clone()
    feats = unit(3, 8)
    bank.update(torch.tensor([3, 5, 3]), feats)
    assert torch.allclose(bank.bank[3], F.normalize(0.25 * old + 0.75 * feats[2], dim=0), atol=1e-7)


def test_last_occurrence_helper():
    idx = torch.tensor([4, 1, 4, 4, 2, 1])
    assert torch.equal(torch_bank.last_occurrence(idx), torch.tensor([3, 5, 3, 3, 4, 5]))


@pytest.mark.parametrize("backend", UPDATE_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_write_nothing(backend, bad):
    bank = moco_fast.MemoryBank(20, 16, backend=backend)
    before = bank.bank.clone()
    feats = unit(4, 16)
    feats[2, 5] = bad
    with pytest.raises(moco_fast.NonFiniteFeaturesError, match="call #1"):
        bank.update(torch.tensor([0, 1, 2, 3]), feats)
    assert torch.equal(bank.bank, before)
    skipper = moco_fast.MemoryBank(20, 16, on_nonfinite="skip", backend=backend)
    before = skipper.bank.clone()
    skipper.update(torch.tensor([0, 1, 2, 3]), feats)
    assert torch.equal(skipper.bank, before) and skipper.num_skipped.item() == 1


def test_bad_input_names_the_argument_and_changes_nothing():
    bank = moco_fast.MemoryBank(20, 16)
    before = bank.bank.clone()
    f = unit(4, 16)
    cases = [
        ((torch.tensor([0, 1, 2, 20]), f), ValueError, r"indices must be in \[0, 20\), got 20"),
        ((torch.tensor([0, -1, 2, 3]), f), ValueError, r"indices must be in \[0, 20\), got -1"),
        ((torch.tensor([0.0, 1, 2, 3]), f), TypeError, "indices must be an int64"),
        ((torch.tensor([0, 1, 2]), f), ValueError, "one index per row of features"),
        ((torch.tensor([[0, 1, 2, 3]]), f), ValueError, "indices must be 1-D"),
        ((torch.tensor([0, 1, 2, 3], device="meta"), f), ValueError, "indices is on meta"),
        ((torch.tensor([0, 1, 2, 3]), unit(4, 8)), ValueError, "features has dim 8 but 16"),
        ((torch.tensor([0, 1, 2, 3]), [1, 2]), TypeError, "features must be a torch.Tensor"),
        ((torch.tensor([], dtype=torch.long), unit(0, 16)), ValueError, "features is an empty batch"),
    ]
    for (idx, feats), err, match in cases:
        with pytest.raises(err, match=match):
            bank.update(idx, feats)
    assert torch.equal(bank.bank, before)
    with pytest.raises(ValueError, match="momentum"):
        moco_fast.MemoryBank(20, 16, momentum=1.5)
    with pytest.raises(TypeError, match="dtype"):
        moco_fast.MemoryBank(20, 16, dtype=torch.float64)


def test_state_dict_round_trip():
    a = moco_fast.MemoryBank(30, 8)
    a.update(torch.arange(5), unit(5, 8))
    b = moco_fast.MemoryBank(30, 8)
    assert not torch.equal(a.bank, b.bank)  # random init
    assert set(a.state_dict()) == {"bank", "num_skipped"}
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.bank, b.bank)
    feats = unit(2, 8)
    a.update(torch.tensor([9, 1]), feats)
    b.update(torch.tensor([9, 1]), feats)
    assert torch.equal(a.bank, b.bank)
    assert torch.allclose(a.bank.norm(dim=1), torch.ones(30), atol=1e-6)  # unit rows throughout


@pytest.fixture
def device_code_path(monkeypatch):
    """Run the GPU code path (no host read of the verdict) on CPU tensors."""
    monkeypatch.setattr(queue_module, "_reads_are_free", lambda t: False)
    monkeypatch.setattr(torch_bank, "_update_host_", torch_bank._update_device_)


def test_device_path_refusal_is_raised_by_the_next_update(device_code_path):
    bank = moco_fast.MemoryBank(20, 16, backend="torch")
    feats = unit(3, 16)
    feats[0, 0] = float("nan")
    before = bank.bank.clone()
    bank.update(torch.tensor([1, 2, 3]), feats)  # refused on the device, no exception yet
    assert torch.equal(bank.bank, before) and bank.num_skipped.item() == 1
    with pytest.raises(moco_fast.NonFiniteFeaturesError, match="#1 or earlier"):
        bank.update(torch.tensor([4]), unit(1, 16))
    bank.update(torch.tensor([4]), unit(1, 16))  # reported once
    bank.update(torch.tensor([5]), feats[:1])
    with pytest.raises(moco_fast.NonFiniteFeaturesError):
        bank.check()


def test_device_path_update_matches_host_path(device_code_path):
    bank = moco_fast.MemoryBank(40, 16, backend="torch")
    expected = bank.bank.clone()
    idx = torch.tensor([3, 9, 3, 0, 9])
    feats = unit(5, 16)
    bank.update(idx, feats)
    reference_memory_bank_update(expected, idx, feats, 0.5)
    assert torch.allclose(bank.bank, expected, atol=2e-7)


# ------------------------------------------------------------------------------------------------
# the head
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["triton"] if "triton" in UPDATE_BACKENDS else []))
def test_exact_head_matches_float64_and_updates_after_the_loss(backend):
    for n, d, b in [(2, 16, 1), (300, 96, 7), (37, 130, 37)]:
        head = moco_fast.MemoryBankHead(n, d, temperature=0.07, momentum=0.5, backend=backend)
        old_bank = head.bank.bank.clone()
        raw = torch.randn(b, d, requires_grad=True)
        idx = torch.randperm(n)[:b] if b <= n else torch.randint(n, (b,))
        loss, stats = head(raw, idx, return_stats=True)
        raw64 = raw.detach().double().requires_grad_()
        ref = reference_memory_bank_loss(F.normalize(raw64, dim=1), old_bank.double(), idx, 0.07)
        (ref_grad,) = torch.autograd.grad(ref, raw64)
        assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item(), (n, d, b, backend)
        loss.backward()  # after the bank update: the backward must not read the bank
        err = (raw.grad.double() - ref_grad).norm() / ref_grad.norm()
        assert err < 1e-5, (n, d, b, backend, err.item())
        expected = old_bank.clone().double()
        reference_memory_bank_update(expected, idx, F.normalize(raw.detach().double(), dim=1), 0.5)
        assert torch.allclose(head.bank.bank.double(), expected, atol=3e-7)
        logits = F.normalize(raw.detach().double(), dim=1) @ old_bank.double().T
        assert torch.equal(stats.rank, (logits > logits.gather(1, idx[:, None])).sum(1))


def test_head_eval_does_not_update_and_failed_call_changes_nothing():
    head = moco_fast.MemoryBankHead(50, 16)
    before = head.bank.bank.clone()
    head.eval()
    head(torch.randn(4, 16), torch.arange(4))
    assert torch.equal(head.bank.bank, before)
    head.train()
    with pytest.raises(ValueError, match="indices must be in"):
        head(torch.randn(4, 16), torch.tensor([0, 1, 2, 50]))
    with pytest.raises(ValueError, match="features has dim 8"):
        head(torch.randn(4, 8), torch.arange(4))
    assert torch.equal(head.bank.bank, before)


def test_sampled_negatives_head():
    torch.manual_seed(0)
    head = moco_fast.MemoryBankHead(100, 16, temperature=0.1, num_negatives=20)
    bank = head.bank.bank.clone()
    f = torch.randn(8, 16, requires_grad=True)
    idx = torch.arange(8) * 3
    torch.manual_seed(5)
    loss = head(f, idx)
    torch.manual_seed(5)
    sampled = torch.randint(100, (20,))
    fn = F.normalize(f, dim=1)
    expected = moco_fast.reference.reference_info_nce(fn, bank[idx], bank[sampled], 0.1)[0]
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="num_negatives must be at most num_samples - 1 = 99"):
        moco_fast.MemoryBankHead(100, 16, num_negatives=100)


def test_exact_softmax_over_a_large_bank():
    """N = 200,000 rows, the fused pass end to end (its memory is measured by benchmarks/bench_memory_bank.py)."""
    head = moco_fast.MemoryBankHead(200_000, 32)
    f = torch.randn(64, 32, requires_grad=True)
    loss = head(f, torch.arange(64))
    loss.backward()
    assert torch.isfinite(loss) and f.grad is not None
