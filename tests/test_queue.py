"""KeyQueue and the backends' enqueue_: ring semantics against the queue model (oracle.RingModel),
persistence, NaN/Inf safety (all or nothing), dtypes, checks — the contract function on every backend."""

from __future__ import annotations

import io
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import contract, no_host_sync, requires_cuda
from oracle import RingModel, close_1ulp

from moco_fast import KeyQueue, NonFiniteKeysError

pytestmark = pytest.mark.usefixtures("one_thread")  # many small cases: see conftest.one_thread


def state(queue: KeyQueue) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in queue.named_buffers()}


def assert_same_state(queue: KeyQueue, before: dict[str, torch.Tensor]) -> None:
    after = dict(queue.named_buffers())
    assert after.keys() == before.keys()
    for name, buf in before.items():
        assert after[name].dtype == buf.dtype, name
        assert torch.equal(after[name], buf), f"buffer {name} changed"


def assert_matches_model(queue: KeyQueue, model: RingModel) -> None:
    assert queue.ptr.tolist() == [model.ptr]
    assert queue.count.tolist() == [model.count]
    assert queue.filled == model.count
    assert queue.is_full == (model.count == model.size)
    neg = queue.negatives()
    assert neg.shape == (model.count, model.dim)
    assert torch.equal(neg.float(), model.negatives())


# ------------------------------------------------------------------------------------------------
# ring semantics
# ------------------------------------------------------------------------------------------------


def test_buffers_and_initial_state():
    q = KeyQueue(10, 4)
    names = {name for name, _ in q.named_buffers()}
    assert {"keys", "ptr", "count"} <= names
    assert q.keys.shape == (10, 4) and q.keys.dtype == torch.float32
    assert q.ptr.shape == (1,) and q.ptr.dtype == torch.int64 and q.ptr.item() == 0
    assert q.count.shape == (1,) and q.count.dtype == torch.int64 and q.count.item() == 0
    assert q.negatives().shape == (0, 4)
    assert not q.is_full
    assert set(q.state_dict()) >= {"keys", "ptr", "count"}


@pytest.mark.parametrize("size,batches", [(10, (3, 7, 1, 10, 4)), (7, (2, 5, 3)), (1, (1,)), (16, (16, 5))])
def test_wrap_around_matches_python_model(size, batches):
    dim = 5
    queue = KeyQueue(size, dim)
    model = RingModel(size, dim)
    for step, batch in zip(range(40), itertools.cycle(batches)):
        keys = torch.randn(batch, dim)
        queue.enqueue(keys)
        model.enqueue(keys)
        assert_matches_model(queue, model)
        if step == 0:
            assert queue.negatives().shape[0] == min(batch, size)
    assert model.count == size  # the run did fill and wrap the queue many times


def test_negatives_grow_until_full_then_whole_buffer():
    queue = KeyQueue(10, 3)
    sizes = []
    for batch in (3, 3, 3, 3, 3):
        queue.enqueue(torch.randn(batch, 3))
        sizes.append(queue.negatives().shape[0])
    assert sizes == [3, 6, 9, 10, 10]
    assert queue.negatives().data_ptr() == queue.keys.data_ptr()  # not a copy
    assert queue.negatives().shape == queue.keys.shape


def test_init_random_starts_full_with_unit_rows():
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        queue = KeyQueue(50, 16, dtype=dtype, init="random")
        assert queue.count.item() == 50 and queue.filled == 50 and queue.is_full
        neg = queue.negatives()
        assert neg.shape == (50, 16) and neg.dtype == dtype
        norms = neg.double().norm(dim=1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=tol, rtol=0)
        assert torch.unique(neg.float(), dim=0).shape[0] == 50  # random, not constant
        # the first enqueue overwrites row 0 onward (the official pointer starts at 0)
        keys = torch.randn(3, 16)
        queue.enqueue(keys)
        assert torch.equal(queue.keys[:3], keys.to(dtype))
        assert queue.ptr.item() == 3 and queue.count.item() == 50


def test_state_dict_round_trip_then_continue():
    dim = 6
    a = KeyQueue(10, dim)
    for batch in (3, 4):  # 7 of 10: partly filled, so the restored fill count matters
        a.enqueue(torch.randn(batch, dim))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = KeyQueue(10, dim)
    b.load_state_dict(torch.load(buf))
    assert b.filled == 7 and torch.equal(b.negatives(), a.negatives())
    for batch in (3, 7, 1, 10, 4, 2):
        keys = torch.randn(batch, dim)
        a.enqueue(keys)
        b.enqueue(keys)
        for name, buf_a in a.named_buffers():
            assert torch.equal(buf_a, dict(b.named_buffers())[name]), name
        assert torch.equal(a.negatives(), b.negatives())


def test_load_state_dict_into_a_used_queue_resets_the_fill_count():
    full = KeyQueue(8, 2)
    full.enqueue(torch.randn(8, 2))
    empty = KeyQueue(8, 2)
    full.load_state_dict(empty.state_dict())
    assert full.filled == 0 and full.negatives().shape == (0, 2)


# ------------------------------------------------------------------------------------------------
# non-finite keys
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("prefill", [0, 4, 9, 10])
def test_non_finite_keys_raise_and_leave_queue_unchanged(bad, prefill):
    dim = 4
    queue = KeyQueue(10, dim)
    model = RingModel(10, dim)
    if prefill:
        keys = torch.randn(prefill, dim)
        queue.enqueue(keys)
        model.enqueue(keys)
    negatives_before = queue.negatives().clone()
    before = state(queue)
    for batch, row, col in ((1, 0, 0), (5, 4, 3), (10, 7, 1), (3, 1, 2)):  # 5 and 10 rows wrap around
        keys = torch.randn(batch, dim)
        keys[row, col] = bad
        with pytest.raises(NonFiniteKeysError, match="NaN or Inf"):
            queue.enqueue(keys)
        assert_same_state(queue, before)
        assert queue.filled == prefill
        assert torch.equal(queue.negatives(), negatives_before)
    # the queue still works afterwards
    keys = torch.randn(3, dim)
    queue.enqueue(keys)
    model.enqueue(keys)
    assert_matches_model(queue, model)


def test_non_finite_error_is_a_value_error():
    assert issubclass(NonFiniteKeysError, ValueError)


def test_non_finite_with_normalize_and_half_queue():
    queue = KeyQueue(6, 3, dtype=torch.bfloat16, normalize=True)
    queue.enqueue(torch.randn(2, 3))
    before = state(queue)
    keys = torch.randn(4, 3, dtype=torch.float16)
    keys[2, 0] = float("inf")
    with pytest.raises(NonFiniteKeysError):
        queue.enqueue(keys)
    assert_same_state(queue, before)


def test_on_nonfinite_skip_drops_batch_and_counts_it():
    dim = 4
    queue = KeyQueue(10, dim, on_nonfinite="skip")
    model = RingModel(10, dim)
    skipped = 0
    for step, batch in zip(range(20), itertools.cycle((3, 7, 1, 10, 4))):
        keys = torch.randn(batch, dim)
        if step % 3 == 1:
            keys[batch // 2, step % dim] = float("nan") if step % 2 else float("inf")
            before = state(queue)
            queue.enqueue(keys)  # no raise
            skipped += 1
            assert queue.num_skipped.item() == skipped
            for name in ("keys", "ptr", "count"):
                assert torch.equal(dict(queue.named_buffers())[name], before[name]), name
        else:
            queue.enqueue(keys)
            model.enqueue(keys)
        assert_matches_model(queue, model)
    assert queue.num_skipped.item() == skipped > 0


def test_skip_on_an_empty_queue_keeps_it_empty():
    queue = KeyQueue(5, 2, on_nonfinite="skip")
    queue.enqueue(torch.full((2, 2), float("nan")))
    assert queue.filled == 0 and queue.negatives().shape == (0, 2)
    assert queue.num_skipped.item() == 1
    queue.enqueue(torch.ones(1, 2))
    assert queue.filled == 1 and queue.ptr.item() == 1


# ------------------------------------------------------------------------------------------------
# normalize, dtypes
# ------------------------------------------------------------------------------------------------


def test_normalize_writes_unit_rows():
    queue = KeyQueue(8, 5, normalize=True)
    model = RingModel(8, 5)
    for batch in (3, 7, 2):
        keys = torch.randn(batch, 5) * 10
        queue.enqueue(keys)
        model.enqueue(F.normalize(keys, dim=1))
    assert queue.ptr.item() == model.ptr and queue.count.item() == model.count
    assert torch.allclose(queue.negatives(), model.negatives(), rtol=1e-6, atol=1e-7)
    norms = queue.negatives().norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)


def test_normalize_off_writes_keys_as_given():
    queue = KeyQueue(4, 3)
    keys = torch.randn(4, 3) * 7
    queue.enqueue(keys)
    assert torch.equal(queue.keys, keys)


def test_normalize_of_a_zero_row_is_zero_not_nan():
    queue = KeyQueue(4, 3, normalize=True)
    queue.enqueue(torch.zeros(2, 3))  # F.normalize's eps: a zero row stays zero
    assert torch.equal(queue.negatives(), torch.zeros(2, 3))


@pytest.mark.parametrize("queue_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_half_queue_casts_keys(queue_dtype, key_dtype, normalize):
    queue = KeyQueue(10, 16, dtype=queue_dtype, normalize=normalize)
    assert queue.keys.dtype == queue_dtype
    written = []
    for batch in (3, 7, 4):  # wraps
        keys = torch.randn(batch, 16).to(key_dtype)
        queue.enqueue(keys)
        written.append(F.normalize(keys.float(), dim=1) if normalize else keys.float())
    expected = torch.cat(written)[-10:]  # last 10 keys, in ring order starting at ptr
    ptr = queue.ptr.item()
    assert ptr == 4
    ring = torch.cat([expected[-ptr:], expected[:-ptr]])
    assert queue.negatives().dtype == queue_dtype
    if normalize:
        # normalized in fp32, then rounded once: within one ulp of the fp32 value
        ulp = 2.0**-7 if queue_dtype == torch.bfloat16 else 2.0**-10
        err = (queue.negatives().float() - ring).abs()
        assert (err <= ulp * ring.abs() + 1e-7).all()
    else:
        assert torch.equal(queue.negatives(), ring.to(queue_dtype))


def test_fp32_queue_takes_half_keys():
    queue = KeyQueue(4, 8)
    keys = torch.randn(4, 8).to(torch.bfloat16)
    queue.enqueue(keys)
    assert queue.keys.dtype == torch.float32 and torch.equal(queue.keys, keys.float())


def test_fp64_keys_are_cast_into_fp32_queue():
    queue = KeyQueue(4, 8)
    keys = torch.randn(3, 8, dtype=torch.float64)
    queue.enqueue(keys)
    assert torch.equal(queue.negatives(), keys.float())


def test_enqueue_does_not_keep_autograd_history():
    queue = KeyQueue(4, 3)
    keys = torch.randn(2, 3, requires_grad=True)
    queue.enqueue(keys * 2)
    assert not queue.keys.requires_grad and queue.keys.grad_fn is None
    assert not queue.negatives().requires_grad


def test_enqueue_copies_the_keys():
    queue = KeyQueue(4, 3)
    keys = torch.randn(2, 3)
    written = keys.clone()
    queue.enqueue(keys)
    keys.fill_(5.0)  # the caller reuses its buffer: the queue keeps what was enqueued
    assert torch.equal(queue.negatives(), written)


def test_non_contiguous_keys():
    queue = KeyQueue(6, 4)
    keys = torch.randn(4, 8)[:, ::2]
    assert not keys.is_contiguous()
    queue.enqueue(keys)
    assert torch.equal(queue.negatives(), keys)


def test_to_dtype_and_back_keeps_fill_count():
    queue = KeyQueue(6, 4)
    queue.enqueue(torch.randn(3, 4))
    queue = queue.to(torch.bfloat16)
    assert queue.keys.dtype == torch.bfloat16 and queue.ptr.dtype == torch.int64
    assert queue.filled == 3 and queue.negatives().shape == (3, 4)


# ------------------------------------------------------------------------------------------------
# argument checks
# ------------------------------------------------------------------------------------------------


def test_batch_larger_than_queue_raises_and_changes_nothing():
    queue = KeyQueue(5, 3)
    queue.enqueue(torch.randn(2, 3))
    before = state(queue)
    with pytest.raises(ValueError, match="size 5"):
        queue.enqueue(torch.randn(6, 3))
    assert_same_state(queue, before)
    queue.enqueue(torch.randn(5, 3))  # B == K is fine


def test_wrong_dim_raises():
    queue = KeyQueue(5, 3)
    before = state(queue)
    with pytest.raises(ValueError, match="keys"):
        queue.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match="keys"):
        queue.enqueue(torch.randn(3))
    with pytest.raises(ValueError, match="keys"):
        queue.enqueue(torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match="keys"):
        queue.enqueue(torch.randn(0, 3))
    assert_same_state(queue, before)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_keys_raise_type_error(dtype):
    queue = KeyQueue(5, 3)
    before = state(queue)
    with pytest.raises(TypeError, match="keys"):
        queue.enqueue(torch.ones(2, 3).to(dtype))
    assert_same_state(queue, before)


def test_non_tensor_keys_raise_type_error():
    with pytest.raises(TypeError, match="keys"):
        KeyQueue(5, 3).enqueue([[1.0, 2.0, 3.0]])


def test_device_mismatch_raises():
    queue = KeyQueue(5, 3)
    before = state(queue)
    with pytest.raises(ValueError, match="meta"):
        queue.enqueue(torch.randn(2, 3, device="meta"))
    assert_same_state(queue, before)
    meta_queue = KeyQueue(5, 3, device="meta")
    assert meta_queue.keys.device.type == "meta"
    with pytest.raises(ValueError, match="cpu"):
        meta_queue.enqueue(torch.randn(2, 3))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(size=0, dim=3), ValueError, "size"),
        (dict(size=-1, dim=3), ValueError, "size"),
        (dict(size=2.5, dim=3), ValueError, "size"),
        (dict(size=True, dim=3), ValueError, "size"),
        (dict(size=4, dim=0), ValueError, "dim"),
        (dict(size=4, dim=3, dtype=torch.int64), TypeError, "dtype"),
        (dict(size=4, dim=3, dtype=torch.float64), TypeError, "dtype"),
        (dict(size=4, dim=3, init="zeros"), ValueError, "init"),
        (dict(size=4, dim=3, on_nonfinite="ignore"), ValueError, "on_nonfinite"),
        (dict(size=4, dim=3, backend="bogus"), ValueError, "backend"),
    ],
)
def test_constructor_checks(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        KeyQueue(**kwargs)


# ------------------------------------------------------------------------------------------------
# the backends' enqueue_ (the contract) on every backend
# ------------------------------------------------------------------------------------------------


def state_tensors(K, d, dtype, ptr, count, device):
    """A (K, d) queue of random rows in ``dtype`` and its (1,) int64 ptr and count."""
    queue = torch.randn(K, d, device=device).to(dtype)
    return queue, torch.tensor([ptr], device=device), torch.tensor([count], device=device)


@pytest.mark.parametrize(
    "K,B,d,ptr0,count0,qdt,kdt,normalize",
    [
        (10, 3, 16, 0, 0, torch.float32, torch.float32, False),
        (10, 4, 16, 8, 8, torch.float32, torch.float32, True),  # wraps around
        (37, 37, 96, 5, 37, torch.bfloat16, torch.float32, True),  # B == K, full queue
        (1000, 130, 128, 950, 990, torch.float16, torch.bfloat16, False),
        (64, 7, 128, 63, 10, torch.float32, torch.float64, True),
    ],
)
def test_contract_enqueue_matches_ring_model(backend, device, K, B, d, ptr0, count0, qdt, kdt, normalize):
    queue, ptr, count = state_tensors(K, d, qdt, ptr0, count0, device)
    keys = (torch.randn(B, d) * 3).to(kdt).to(device)
    model = RingModel(K, d, queue, ptr0, count0)
    model.enqueue(keys, normalize)
    ok = contract(backend).enqueue_(queue, ptr, count, keys, normalize)
    assert ok.dtype == torch.bool and ok.shape == (1,) and ok.item() is True
    assert ptr.item() == model.ptr and count.item() == model.count
    assert close_1ulp(queue, model.buffer(qdt))


def test_contract_enqueue_wraps_around(backend, device):
    queue, ptr, count = state_tensors(10, 7, torch.float32, 8, 8, device)
    before = queue.clone()
    keys = torch.randn(5, 7, device=device)
    with no_host_sync(device):
        ok = contract(backend).enqueue_(queue, ptr, count, keys, False)
    assert ok.dtype == torch.bool and ok.shape == (1,) and bool(ok)
    rows = [8, 9, 0, 1, 2]
    torch.testing.assert_close(queue[rows], keys, rtol=0, atol=0)
    torch.testing.assert_close(queue[3:8], before[3:8], rtol=0, atol=0)
    assert ptr.item() == 3 and count.item() == 10


@pytest.mark.parametrize("qdt", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("kdt", [torch.float32, torch.bfloat16, torch.float64])
def test_contract_enqueue_normalizes_and_casts(backend, device, qdt, kdt):
    K, d, B = 37, 96, 37  # B == K: every row, starting mid-queue
    queue, ptr, count = state_tensors(K, d, qdt, 5, 0, device)
    keys = (torch.randn(B, d, device=device) * 3).to(kdt)
    ok = contract(backend).enqueue_(queue, ptr, count, keys, True)
    assert bool(ok) and ptr.item() == 5 and count.item() == 37
    expect = F.normalize(keys.double(), dim=1).to(qdt)
    got = queue[(5 + torch.arange(B, device=device)) % K]
    tol = {torch.float32: 1e-6, torch.float64: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[qdt]
    torch.testing.assert_close(got.double(), expect.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_contract_enqueue_non_finite_writes_nothing(backend, device, bad):
    K, B, d = 50, 20, 96
    queue = torch.randn(K, d, device=device)
    keys = torch.randn(B, d, device=device)
    keys[B - 1, d - 1] = bad  # the very last value: a partial write would already have happened
    ptr = torch.tensor([45], dtype=torch.int64, device=device)
    count = torch.tensor([45], dtype=torch.int64, device=device)
    before = queue.clone()
    impl = contract(backend)
    ok = impl.enqueue_(queue, ptr, count, keys, True)
    assert ok.item() is False
    assert torch.equal(queue, before)
    assert ptr.item() == 45 and count.item() == 45
    keys[B - 1, d - 1] = 0.5  # fixed: now it goes in
    ok = impl.enqueue_(queue, ptr, count, keys, False)
    assert ok.item() is True and ptr.item() == (45 + B) % K and count.item() == K


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_contract_enqueue_rejects_non_finite_keys_atomically(backend, device, bad):
    queue, ptr, count = state_tensors(64, 33, torch.bfloat16, 60, 60, device)
    before = queue.clone()
    keys = torch.randn(9, 33, device=device)
    keys[8, 32] = bad  # the very last element
    ok = contract(backend).enqueue_(queue, ptr, count, keys, True)
    assert not bool(ok)
    assert torch.equal(queue.view(torch.int16), before.view(torch.int16))
    assert ptr.item() == 60 and count.item() == 60


def test_key_queue_on_every_backend(backend, device):
    """KeyQueue(backend=...) through the backend: wraps, refuses a NaN batch whole."""
    queue = KeyQueue(10, 16, gather_distributed=False, device=device, backend=backend)
    keys = torch.randn(4, 16, device=device)
    model = RingModel(10, 16)
    for step in range(3):  # 12 keys into 10 slots: wraps
        queue.enqueue(keys + step)
        model.enqueue(keys + step)
    assert int(queue.ptr) == 2 and int(queue.count) == 10
    assert torch.equal(queue.negatives().cpu(), model.negatives())
    bad = keys.clone()
    bad[1, 1] = float("nan")
    before = queue.keys.clone()
    with pytest.raises(ValueError):
        queue.enqueue(bad)
        queue.check()  # on a GPU the refusal is raised by the next call or check()
    assert torch.equal(queue.keys, before) and int(queue.ptr) == 2


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda"], indirect=True)
def test_gpu_contract_enqueue_large_batch_and_sequence(backend, device):
    K, d = 65536, 128
    queue, ptr, count = state_tensors(K, d, torch.bfloat16, 0, 0, device)
    seen = []
    for B in (4096, 7, 65536, 1000):
        keys = torch.randn(B, d, device=device)
        start = ptr.item()
        ok = contract(backend).enqueue_(queue, ptr, count, keys, True)
        assert bool(ok)
        rows = (start + torch.arange(B, device=device)) % K
        torch.testing.assert_close(queue[rows].float(), F.normalize(keys, dim=1).bfloat16().float(), rtol=0, atol=8e-3)
        seen.append(B)
        assert ptr.item() == (start + B) % K and count.item() == min(sum(seen), K)


@requires_cuda
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_gpu_contract_enqueue_no_host_sync_and_wraps(backend, device):
    K, d = 65536, 128
    queue = torch.randn(K, d, device=device, dtype=torch.bfloat16)
    ptr = torch.tensor([K - 100], dtype=torch.int64, device=device)
    count = torch.tensor([K], dtype=torch.int64, device=device)
    keys = torch.randn(4096, d, device=device)
    model = RingModel(K, d, queue, K - 100, K)
    model.enqueue(keys, normalize=True)
    impl = contract(backend)
    ok = impl.enqueue_(queue, ptr, count, keys, True)
    assert ok.item() is True and ptr.item() == model.ptr and count.item() == model.count
    assert close_1ulp(queue, model.buffer(torch.bfloat16))
    keys[0, 0] = math.nan
    before = queue.clone()
    assert impl.enqueue_(queue, ptr, count, keys, True).item() is False
    assert torch.equal(queue, before) and ptr.item() == model.ptr
