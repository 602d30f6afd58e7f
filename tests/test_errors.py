"""Bad input gets a clear ValueError/TypeError that names the argument (docs/design.md, "Op contracts")."""

from __future__ import annotations

import pytest
import torch

import moco_fast
from moco_fast import KeyQueue, MoCoHead, info_nce

B, D, K = 4, 8, 10


def good():
    return torch.randn(B, D), torch.randn(B, D), torch.randn(K, D)


# Every argument is checked before a backend is chosen, so every installed backend (and "auto") must give
# the same error for CPU tensors, the cuda backend included.
@pytest.fixture(params=["auto", *moco_fast.available_backends()])
def backend(request):
    return request.param


# ------------------------------------------------------------------------------------------------
# info_nce
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["q", "k", "negatives"])
@pytest.mark.parametrize("shape", [(D,), (2, B, D), ()], ids=["1d", "3d", "0d"])
def test_wrong_rank(backend, which, shape):
    args = dict(zip(("q", "k", "negatives"), good(), strict=True))
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"^{which} must be 2-D"):
        info_nce(args["q"], args["k"], args["negatives"], 0.1, backend=backend)


def test_dim_mismatch(backend):
    q, k, n = good()
    with pytest.raises(ValueError, match="negatives have dim 9 but q has dim 8"):
        info_nce(q, k, torch.randn(K, D + 1), 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"^k must have the shape of q"):
        info_nce(q, torch.randn(B, D + 1), n, 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"^k must have the shape of q"):
        info_nce(q, torch.randn(B + 1, D), n, 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"^k must have the shape of q"):
        info_nce(torch.randn(B, D + 1), k, torch.randn(K, D + 1), 0.1, backend=backend)


@pytest.mark.parametrize("which", ["k", "negatives"])
def test_mixed_devices(backend, which):
    args = dict(zip(("q", "k", "negatives"), good(), strict=True))
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=rf"^{which} is on meta but q is on cpu"):
        info_nce(args["q"], args["k"], args["negatives"], 0.1, backend=backend)


def test_q_on_another_device(backend):
    q, k, n = good()
    with pytest.raises(ValueError, match=r"^k is on cpu but q is on meta"):
        info_nce(q.to("meta"), k, n, 0.1, backend=backend)


@pytest.mark.parametrize("which", ["q", "k", "negatives"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
def test_non_float_dtype(backend, which, dtype):
    args = dict(zip(("q", "k", "negatives"), good(), strict=True))
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=rf"^{which} must be a floating tensor"):
        info_nce(args["q"], args["k"], args["negatives"], 0.1, backend=backend)


@pytest.mark.parametrize("which", ["q", "k", "negatives"])
def test_not_a_tensor(which):
    args = dict(zip(("q", "k", "negatives"), good(), strict=True))
    args[which] = args[which].tolist()
    with pytest.raises(TypeError, match=rf"^{which} must be a torch.Tensor"):
        info_nce(args["q"], args["k"], args["negatives"], 0.1)


@pytest.mark.parametrize("temperature", [0, 0.0, -0.07, -1, float("nan"), float("inf"), -float("inf")])
def test_bad_temperature_value(backend, temperature):
    with pytest.raises(ValueError, match="temperature"):
        info_nce(*good(), temperature, backend=backend)


@pytest.mark.parametrize("temperature", ["0.07", None, True, [0.07], 1j])
def test_temperature_not_a_number(backend, temperature):
    with pytest.raises(TypeError, match="temperature"):
        info_nce(*good(), temperature, backend=backend)


def test_temperature_tensor():
    with pytest.raises(ValueError, match="temperature"):
        info_nce(*good(), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(*good(), torch.tensor(-0.1))
    # a one-element tensor is a number
    assert torch.equal(info_nce(*[t.clone() for t in good()], torch.tensor(0.1)).isfinite(), torch.tensor(True))


def test_empty_batch(backend):
    with pytest.raises(ValueError, match=r"^q is an empty batch"):
        info_nce(torch.randn(0, D), torch.randn(0, D), torch.randn(K, D), 0.1, backend=backend)


@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "batchmean"])
def test_bad_reduction(backend, reduction):
    with pytest.raises(ValueError, match="reduction"):
        info_nce(*good(), 0.1, reduction=reduction, backend=backend)


@pytest.mark.parametrize("name", ["bogus", "", "gpu", None, 3])
def test_unknown_backend_argument(name):
    with pytest.raises(ValueError, match="backend must be one of"):
        info_nce(*good(), 0.1, backend=name)


def test_unknown_backend_env_var(monkeypatch):
    monkeypatch.setenv("MOCO_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MOCO_FAST_BACKEND must be one of"):
        info_nce(*good(), 0.1)
    # an explicit backend does not consult the variable
    assert info_nce(*good(), 0.1, backend="torch").isfinite()


def test_cuda_backend_on_cpu_tensors_is_refused():
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        info_nce(*good(), 0.1, backend="cuda")


def test_checks_happen_before_any_work():
    """A bad reduction is refused even though the tensors are fine and large."""
    q, k = torch.randn(B, D, requires_grad=True), torch.randn(B, D)
    with pytest.raises(ValueError):
        info_nce(q, k, torch.randn(K, D), 0.1, reduction="avg")
    assert q.grad is None


# ------------------------------------------------------------------------------------------------
# KeyQueue and MoCoHead
# ------------------------------------------------------------------------------------------------


def test_queue_errors():
    queue = KeyQueue(5, D)
    with pytest.raises(ValueError, match="cannot enqueue 6 keys"):
        queue.enqueue(torch.randn(6, D))
    with pytest.raises(ValueError, match=r"^keys has dim 9"):
        queue.enqueue(torch.randn(2, D + 1))
    with pytest.raises(ValueError, match=r"^keys must be 2-D"):
        queue.enqueue(torch.randn(D))
    with pytest.raises(ValueError, match=r"^keys is an empty batch"):
        queue.enqueue(torch.randn(0, D))
    with pytest.raises(TypeError, match=r"^keys must be a floating tensor"):
        queue.enqueue(torch.ones(2, D, dtype=torch.int64))
    with pytest.raises(ValueError, match="keys are on meta but the queue is on cpu"):
        queue.enqueue(torch.randn(2, D, device="meta"))
    assert queue.ptr.item() == 0 and queue.count.item() == 0


def test_head_errors():
    head = MoCoHead(D, 20, 0.1)
    with pytest.raises(ValueError, match=r"^q has dim 9"):
        head(torch.randn(B, D + 1), torch.randn(B, D + 1))
    with pytest.raises(ValueError, match=r"^k has shape"):
        head(torch.randn(B, D), torch.randn(B + 1, D))
    with pytest.raises(ValueError, match=r"^k must be 2-D"):
        head(torch.randn(B, D), torch.randn(B, 1, D))
    with pytest.raises(TypeError, match=r"^q must be a floating tensor"):
        head(torch.ones(B, D, dtype=torch.int64), torch.randn(B, D))
    with pytest.raises(ValueError, match="q is on meta but the queue is on cpu"):
        head(torch.randn(B, D, device="meta"), torch.randn(B, D, device="meta"))
    with pytest.raises(ValueError, match="cannot enqueue 21 keys"):
        MoCoHead(D, 20, 0.1)(torch.randn(21, D), torch.randn(21, D))
    with pytest.raises(ValueError, match="temperature"):
        MoCoHead(D, 20, -1.0)
    with pytest.raises(ValueError, match="temperature"):
        MoCoHead(D, 20, float("nan"))
    with pytest.raises(ValueError, match="backend"):
        MoCoHead(D, 20, 0.1, backend="bogus")
    with pytest.raises(ValueError, match="size"):
        MoCoHead(D, 0, 0.1)
    with pytest.raises(TypeError, match="dtype"):
        MoCoHead(D, 20, 0.1, queue_dtype=torch.int8)


def test_head_empty_batch():
    head = MoCoHead(D, 20, 0.1)
    with pytest.raises(ValueError, match="empty batch"):
        head(torch.randn(0, D), torch.randn(0, D))
    assert head.queue.ptr.item() == 0
