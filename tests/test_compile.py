"""The custom ops under torch.library.opcheck and torch.compile (CPU, impl "torch"), and backend routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moco_fast
import moco_fast.functional as functional


@pytest.fixture
def fresh_compile():
    """Compile without the AOTAutograd cache: it keys a compiled graph by the forward graph, not by the
    Python autograd formulas registered for the custom ops (moco_fast/ops.py), so after a change to a
    backward -- or from another checkout sharing /tmp/torchinductor_$USER -- it would replay a stale
    backward and the comparison with eager would test that instead."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    with functorch_config.patch(enable_autograd_cache=False):
        yield


OPCHECK_CASES = [
    # (B, K, d, q dtype, negatives dtype)
    (5, 13, 8, torch.float32, torch.float32),
    (3, 0, 8, torch.float32, torch.float32),
    (4, 7, 16, torch.bfloat16, torch.bfloat16),
    (4, 7, 16, torch.float32, torch.bfloat16),
    (1, 1, 4, torch.float64, torch.float64),
]


@pytest.mark.parametrize(
    "case", OPCHECK_CASES, ids=lambda c: f"B{c[0]}-K{c[1]}-d{c[2]}-{c[3]}-{c[4]}".replace("torch.", "")
)
@pytest.mark.parametrize("negatives_grad", [False, True])
def test_opcheck_info_nce_forward(case, negatives_grad):
    batch, num_keys, dim, dtype, neg_dtype = case
    q = F.normalize(torch.randn(batch, dim), dim=1).to(dtype).requires_grad_()
    k = F.normalize(torch.randn(batch, dim), dim=1).to(dtype).requires_grad_()
    n = F.normalize(torch.randn(num_keys, dim), dim=1).to(neg_dtype).requires_grad_(negatives_grad)
    torch.library.opcheck(torch.ops.moco_fast.info_nce_forward.default, (q, k, n, 1 / 0.07, "torch"))


def test_opcheck_backward_ops():
    q, k, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(11, 8)
    loss, lse, delta, rank = torch.ops.moco_fast.info_nce_forward(q, k, n, 5.0, "torch")
    grad = torch.rand(5)
    torch.library.opcheck(torch.ops.moco_fast.info_nce_backward.default, (grad, q, k, loss, delta, 5.0, "torch"))
    torch.library.opcheck(torch.ops.moco_fast.info_nce_backward_negatives.default, (grad, q, n, lse, 5.0, "torch"))


def test_forward_op_outputs():
    q, k, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(11, 8)
    loss, lse, delta, rank = torch.ops.moco_fast.info_nce_forward(q, k, n, 5.0, "torch")
    assert loss.shape == lse.shape == rank.shape == (5,)
    assert delta.shape == (5, 8)
    assert loss.dtype == lse.dtype == delta.dtype == torch.float32 and rank.dtype == torch.int64
    out = delta.double() + k.double()  # O = k + delta
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ n.T], 1).double() * 5.0
    p = torch.softmax(logits, 1)
    expected_out = p[:, :1] * k.double() + p[:, 1:] @ n.double()
    assert torch.allclose(out.double(), expected_out, rtol=1e-5, atol=1e-6)
    assert torch.allclose(lse.double(), torch.logsumexp(logits, 1), rtol=1e-6)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager(fresh_compile):
    """torch.compile(fullgraph=True) of a MoCo-style loss: same loss and grads as eager."""

    def step(q_raw, k_raw, queue):
        q = F.normalize(q_raw, dim=1)
        k = F.normalize(k_raw, dim=1)
        loss, stats = moco_fast.info_nce(q, k, queue, 0.07, backend="torch", return_stats=True)
        return loss * 2.0, stats.acc1, stats.rank

    compiled = torch.compile(step, fullgraph=True)
    for batch, num_keys, dim in [(8, 100, 16), (8, 100, 16), (5, 0, 16)]:
        q_raw = torch.randn(batch, dim)
        k_raw = torch.randn(batch, dim)
        queue = F.normalize(torch.randn(num_keys, dim), dim=1)
        qe, qc = q_raw.clone().requires_grad_(), q_raw.clone().requires_grad_()
        ke, kc = k_raw.clone().requires_grad_(), k_raw.clone().requires_grad_()
        loss_e, acc_e, rank_e = step(qe, ke, queue)
        loss_c, acc_c, rank_c = compiled(qc, kc, queue)
        assert torch.allclose(loss_c, loss_e, rtol=1e-6, atol=1e-7)
        assert torch.equal(acc_c, acc_e) and torch.equal(rank_c, rank_e)
        loss_e.backward()
        loss_c.backward()
        assert torch.allclose(qc.grad, qe.grad, rtol=1e-5, atol=1e-7)
        assert torch.allclose(kc.grad, ke.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_compile_negatives_with_grad(fresh_compile):
    fn = torch.compile(lambda q, k, n: moco_fast.info_nce(q, k, n, 0.2, backend="torch"), fullgraph=True)
    q, k, n = (torch.randn(s, 8) for s in (4, 4, 9))
    args_e = [t.clone().requires_grad_() for t in (q, k, n)]
    args_c = [t.clone().requires_grad_() for t in (q, k, n)]
    fn(*args_c).backward()
    moco_fast.info_nce(*args_e, 0.2, backend="torch").backward()
    for c, e in zip(args_c, args_e, strict=True):
        assert torch.allclose(c.grad, e.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# MOCO_FAST_BACKEND routing
# ------------------------------------------------------------------------------------------------


def _spy(monkeypatch):
    """Record the backend every info_nce call runs on (all of them go through the one custom op)."""
    calls = []
    real_op = functional.ops.info_nce_forward

    def op(q, k, n, scale, impl, *rest):
        calls.append(impl)
        return real_op(q, k, n, scale, impl, *rest)

    monkeypatch.setattr(functional.ops, "info_nce_forward", op)
    return calls


def test_env_var_routes_auto_to_reference(monkeypatch):
    calls = _spy(monkeypatch)
    q, k, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8)
    monkeypatch.setenv("MOCO_FAST_BACKEND", "reference")
    loss = moco_fast.info_nce(q, k, n, 0.1)
    assert calls == ["reference"]
    expected, _, _ = moco_fast.reference.reference_info_nce(q, k, n, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    # an explicit backend wins over the variable
    moco_fast.info_nce(q, k, n, 0.1, backend="torch")
    assert calls == ["reference", "torch"]


def test_env_var_routes_auto_to_torch(monkeypatch):
    calls = _spy(monkeypatch)
    q, k, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(10, 8)
    monkeypatch.setenv("MOCO_FAST_BACKEND", "torch")
    moco_fast.info_nce(q, k, n, 0.1)
    monkeypatch.setenv("MOCO_FAST_BACKEND", "auto")
    moco_fast.info_nce(q, k, n, 0.1)
    monkeypatch.delenv("MOCO_FAST_BACKEND")
    moco_fast.info_nce(q, k, n, 0.1)
    assert calls == ["torch", "torch", "torch"]


def test_env_var_reaches_the_head(monkeypatch):
    calls = _spy(monkeypatch)
    monkeypatch.setenv("MOCO_FAST_BACKEND", "reference")
    head = moco_fast.MoCoHead(8, 20, 0.1, queue_init="random")
    head.eval()  # no enqueue: see test_head.py for the reference backend's training-mode backward
    head(torch.randn(4, 8), torch.randn(4, 8))
    assert calls == ["reference"]
