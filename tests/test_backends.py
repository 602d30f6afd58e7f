"""The backend contract: declared support, one selection rule for every op, loud failures.

Selection is pure Python over declared capabilities, so CUDA placements are checked here with
``torch.device("cuda")`` objects (no GPU needed: nothing runs).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moco_fast
from moco_fast import backends
from moco_fast.backends import BackendError, Support

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
OPS = ("info_nce", "momentum_update", "enqueue")


def test_every_backend_declares_every_op_with_a_support():
    for name in backends.CONCRETE:
        if not backends.is_available(name):
            continue
        for op in OPS:
            assert isinstance(backends.support(name, op), Support), (name, op)


def test_support_refusals_name_the_reason():
    s = Support(devices=frozenset({"cuda"}), dtypes=frozenset({F32}), max_dim=256, contiguous=True)
    assert s.refusal(CUDA, (F32,), 128, True, None) is None
    assert "cuda" in s.refusal(CPU, (F32,), 128, True, None)
    assert "float64" in s.refusal(CUDA, (F32, F64), 128, True, None)
    assert "d=300" in s.refusal(CUDA, (F32,), 300, True, None)
    assert "contiguous" in s.refusal(CUDA, (F32,), 128, False, None)
    assert "'exact'" in s.refusal(CUDA, (F32,), 128, True, "exact")


def test_auto_on_cpu_is_torch_never_the_interpreter_or_reference():
    for op in OPS:
        assert backends.select(op, "auto", CPU, (F32,), 16) == "torch"


@pytest.mark.skipif(not backends.is_available("triton"), reason="triton not importable")
def test_auto_on_cuda_prefers_triton_then_cuda_then_torch(monkeypatch):
    # In the interpreter the triton backend serves CPU tensors only, so fake a compiled-triton declaration.
    kernels = backends.module("triton")
    compiled = dict(kernels.SUPPORT)
    compiled["info_nce"] = Support(devices=frozenset({"cuda"}), dtypes=frozenset({F32, BF16}), max_dim=256)
    monkeypatch.setattr(kernels, "SUPPORT", compiled)
    backends._select.cache_clear()
    try:
        assert backends.select("info_nce", "auto", CUDA, (BF16,), 128) == "triton"
        expected = "cuda" if backends.is_available("cuda") else "torch"
        assert backends.select("info_nce", "auto", CUDA, (F32,), 300) == "torch"  # d > 256: neither kernel
        assert backends.select("info_nce", "auto", CUDA, (F64,), 128) == "torch"  # fp64: the torch code
        monkeypatch.setattr(kernels, "SUPPORT", {})
        backends._select.cache_clear()
        assert backends.select("info_nce", "auto", CUDA, (BF16,), 128) == expected
    finally:
        backends._select.cache_clear()


@pytest.mark.parametrize(
    "op, backend, device, dtypes, dim, kwargs, match",
    [
        ("info_nce", "cuda", CPU, (F32,), 16, {}, "runs on cuda tensors"),
        ("info_nce", "cuda", CUDA, (F64,), 16, {}, "float64"),
        ("info_nce", "cuda", CUDA, (F32,), 512, {}, "d=512"),
        ("momentum_update", "cuda", CUDA, (F32,), None, {"contiguous": False}, "contiguous"),
        ("momentum_update", "cuda", CUDA, (F32,), None, {"mode": "exact"}, "exact"),
    ],
)
def test_an_explicit_backend_that_cannot_serve_raises_why(op, backend, device, dtypes, dim, kwargs, match):
    if not backends.is_available(backend):
        with pytest.raises(BackendError, match="not available"):
            backends.select(op, backend, device, dtypes, dim, **kwargs)
        return
    with pytest.raises(BackendError, match=match):
        backends.select(op, backend, device, dtypes, dim, **kwargs)


def test_same_rule_for_every_op_through_the_public_api():
    """fp64 with an explicit kernel backend raises for info_nce, momentum and enqueue alike."""
    q = torch.randn(3, 8, dtype=F64)
    with pytest.raises(BackendError, match="cuda"):
        moco_fast.info_nce(q, q, q, 0.1, backend="cuda")
    with pytest.raises(BackendError, match="cuda"):
        moco_fast.momentum_update([q.clone()], [q], 0.9, backend="cuda")
    queue = moco_fast.KeyQueue(8, 8, backend="cuda")
    with pytest.raises(BackendError, match="cuda"):
        queue.enqueue(q.float())
    assert int(queue.count) == 0  # nothing happened


def test_exact_momentum_is_served_by_torch_under_auto_and_refused_by_kernel_backends():
    t, s = [torch.randn(5)], [torch.randn(5)]
    assert backends.select("momentum_update", "auto", CPU, (F32,), mode="exact") == "torch"
    if backends.is_available("triton"):
        with pytest.raises(BackendError, match="exact"):
            moco_fast.momentum_update(t, s, 0.9, exact=True, backend="triton")


def test_env_var_overrides_auto_only(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("info_nce", "auto", CPU, (F32,), 8) == "reference"
    assert backends.select("info_nce", "torch", CPU, (F32,), 8) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(BackendError, match="cuda"):
        backends.select("info_nce", "auto", CPU, (F32,), 8)
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.select("info_nce", "auto", CPU, (F32,), 8)


def test_availability_reports_a_reason_for_each_missing_backend():
    status = backends.availability()
    assert set(status) == set(backends.CONCRETE)
    assert status["torch"] is None and status["reference"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), name


_BROKEN = """
import sys, types
import moco_fast.torch_backend as c
del c.SUPPORT  # a backend module that lost its declaration is a bug: selection must not run elsewhere
import torch, moco_fast
try:
    moco_fast.info_nce(torch.randn(2, 4), torch.randn(2, 4), torch.randn(3, 4), 0.1, backend="torch")
except moco_fast.backends.BackendError as e:
    print("refused:", e)
"""


def test_a_backend_without_a_declaration_serves_nothing():
    out = subprocess.run([sys.executable, "-c", _BROKEN], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "does not implement info_nce" in out.stdout
