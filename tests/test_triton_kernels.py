"""Triton backend internals (moco_fast.kernels): launch plans, split counts, tiles, fused/finalize paths,
the momentum chunk table, device guards, plan memoization, packaging.

Public-op correctness of this backend (forward, backward, momentum, enqueue against float64 math) lives in
the by-op files (tests/test_info_nce.py, test_momentum.py, test_queue.py) with every other backend. Without a
GPU these run under TRITON_INTERPRET=1 (tests/conftest.py sets it before triton is imported) on CPU tensors
with small sizes; the tests named *_gpu_* need a CUDA GPU.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
from conftest import backend_device, backend_status, infonce_inputs
from oracle import assert_infonce_forward

_reason, _expected = backend_status("triton")
if _reason is not None:
    if _expected:  # CI sets MOCO_FAST_EXPECT_TRITON=1: there a missing / unusable Triton backend is a failure
        pytest.fail(f"MOCO_FAST_EXPECT_TRITON=1 but {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

import moco_fast.kernels as KN  # noqa: E402
from moco_fast.kernels import heuristics as H  # noqa: E402

DEV = backend_device("triton")
needs_gpu = pytest.mark.skipif(DEV.type != "cuda", reason="needs a CUDA GPU (not the interpreter)")
TEMP = 0.07


def run_forward_check(q, k, n, scale, tol, **plan):
    """The launcher's forward under plan overrides (num_splits, config, fuse) against float64."""
    outputs = KN.infonce_forward(q, k, n, scale, **plan)
    assert_infonce_forward(outputs, q, k, n, scale, tol)
    return outputs[1:]


# ---------------------------------------------------------------------------------------------
# forward plans: splits, fused finalize, TRANS_COPY, SM counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "splits,fuse", [(1, True), (1, False), (2, None), (3, None), (8, None), (64, None), (1000, None)]
)
def test_forward_split_counts_agree(splits, fuse):
    """Small tiles force many splits (and the combine kernel) even in the interpreter; fuse=False
    runs a single split through the combine kernel, as the GPU does for the unfused configs."""
    B, K, d = 37, 1000, 96
    q, k, n = infonce_inputs(B, K, d, device=DEV)
    cfg = H.TileConfig(16, 16, 4, 1)
    lse, delta, rank = run_forward_check(q, k, n, 1 / TEMP, 1e-5, num_splits=splits, config=cfg, fuse=fuse)
    _, lse1, delta1, rank1 = KN.infonce_forward(q, k, n, 1 / TEMP, num_splits=1, config=cfg)
    assert torch.equal(rank, rank1)
    assert (lse - lse1).abs().max().item() < 1e-5
    assert (delta - delta1).abs().max().item() < 1e-5


@pytest.mark.parametrize("B,K,d,splits", [(37, 1000, 96, 3), (7, 63, 16, None), (5, 300, 256, 2)])
def test_forward_transposed_second_copy(monkeypatch, B, K, d, splits):
    """TRANS_COPY (the sm_90 tf32 path: the tile loaded a second time as its transpose for p @ n),
    forced on in the interpreter: ragged K, padded d, split and fused."""
    monkeypatch.setattr(H, "trans_copy", lambda *args: True)
    H.fwd_plan.cache_clear()
    try:
        q, k, n = infonce_inputs(B, K, d, device=DEV)
        plan = H.fwd_plan(B, K, d, "float32", "float32", "ieee", (9, 0), 1, True, splits)
        assert plan.trans_copy
        run_forward_check(q, k, n, 1 / TEMP, 1e-5, num_splits=splits)
    finally:
        H.fwd_plan.cache_clear()


@pytest.mark.parametrize("B,K,d", [(37, 1000, 96), (5, 1100, 16)])
def test_forward_with_a_132_sm_plan(monkeypatch, B, K, d):
    """The split counts and the small combine row blocks (2 rows) an H100/H200 would get."""
    from moco_fast.kernels import runtime as R

    monkeypatch.setattr(R, "device_info", lambda device: (132, (9, 0)))
    q, k, n = infonce_inputs(B, K, d, device=DEV)
    plan = H.fwd_plan(B, K, d, "float32", "float32", "ieee", (9, 0), 132, True)
    assert plan.splits > 1 and plan.combine_block_m == 2
    run_forward_check(q, k, n, 1 / TEMP, 1e-5)


# ---------------------------------------------------------------------------------------------
# momentum: the chunk-table cache
# ---------------------------------------------------------------------------------------------


def test_momentum_table_cache_keeps_its_source():
    """The chunk table is cached per (addresses, sizes); the entry keeps the host copy it was built
    from (pinned on CUDA, copied with non_blocking=True), so a reused table is never re-uploaded."""
    from moco_fast.kernels import momentum as M

    ts = [torch.randn(n, device=DEV) for n in (5, 70001, 3)]
    ss = [torch.randn(n, device=DEV) for n in (5, 70001, 3)]
    M._TABLES.clear()
    table, aligned = M._chunk_table(ts, ss)
    (entry,) = M._TABLES.values()
    assert entry[0] is table and entry[2].device.type == "cpu"
    assert entry[2].shape == table.shape and torch.equal(entry[2], table.cpu())
    assert table[:, 2].tolist() == [5, H.MOMENTUM_CHUNK, 70001 - H.MOMENTUM_CHUNK, 3]
    again, _ = M._chunk_table(ts, ss)
    assert again is table and len(M._TABLES) == 1


@needs_gpu
def test_gpu_momentum_table_is_pinned():
    from moco_fast.kernels import momentum as M

    ts = [torch.randn(n, device="cuda") for n in (5, 70001)]
    ss = [torch.randn(n, device="cuda") for n in (5, 70001)]
    M._TABLES.clear()
    table, _ = M._chunk_table(ts, ss)
    (entry,) = M._TABLES.values()
    assert entry[2].is_pinned() and table.device == ts[0].device


# ---------------------------------------------------------------------------------------------
# the launchers' own argument checks
# ---------------------------------------------------------------------------------------------


def test_momentum_rejects_mismatch():
    with pytest.raises(ValueError):
        KN.momentum_update_([torch.zeros(3, device=DEV)], [torch.zeros(4, device=DEV)], 0.9)
    KN.momentum_update_([], [], 0.9)  # nothing to do


def test_enqueue_rejects_bad_sizes():
    queue = torch.zeros(4, 16, device=DEV)
    ptr = torch.zeros(1, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError):
        KN.enqueue_(queue, ptr, ptr.clone(), torch.ones(5, 16, device=DEV), False)


# ---------------------------------------------------------------------------------------------
# packaging
# ---------------------------------------------------------------------------------------------


def test_import_without_triton_is_unavailable():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import moco_fast.kernels as k\n"
        "assert k.AVAILABLE is False, k.AVAILABLE\n"
        "try:\n    k.infonce_forward(None, None, None, 1.0)\nexcept RuntimeError as e:\n    print('ok', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def test_import_error_of_a_kernel_module_propagates():
    """Only a missing triton means "not available": a broken kernel module must raise, not turn
    into AVAILABLE = False (which would silently skip every Triton test)."""
    code = (
        "import sys, importlib.abc\n"
        "class Broken(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'moco_fast.kernels.momentum':\n"
        "            raise RuntimeError('boom from a broken kernel module')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import moco_fast.kernels as k\n"
        "print('imported', k.AVAILABLE)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0, f"import succeeded: {res.stdout}"
    assert "boom from a broken kernel module" in res.stderr, res.stderr[-2000:]


def test_heuristics_pick_sane_configs():
    assert H.d_pad(96) == 128 and H.d_pad(16) == 16 and H.d_pad(3) == 16 and H.d_pad(256) == 256
    # B=256 on 132 SMs: the row blocks are split so that ~a full wave of programs runs.
    s = H.num_splits(H.cdiv(256, 128), H.cdiv(65536, 64), 132)
    assert 32 <= s <= 132
    assert H.num_splits(1, 0, 132) == 1
    assert H.num_splits(10_000, 1024, 132) == 1
    for d in (16, 32, 64, 96, 128, 256):
        for qd, nd in (("bfloat16",) * 2, ("float16",) * 2, ("float32",) * 2, ("float32", "bfloat16")):
            dot = H.dot_dtype_name(qd, nd)
            for prec in ("ieee", "tf32"):
                for cc in ((9, 0), (8, 0)):
                    cfg = H.fwd_config(H.d_pad(d), dot, cc, precision=H.dot_precision(dot, prec))
                    assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.ctas_per_sm >= 1
    assert H.dot_precision("bfloat16", "tf32") == "ieee" and H.dot_precision("float32", "tf32") == "tf32"


def test_forward_plan_covers_the_keys_and_is_cached():
    for B, K, d in ((1, 65536, 128), (256, 65536, 128), (4096, 65536, 96), (37, 1000, 16), (5, 0, 256)):
        for dot, nd, prec in (("bfloat16", "bfloat16", "ieee"), ("float32", "float32", "tf32")):
            plan = H.fwd_plan(B, K, d, nd, dot, prec, (9, 0), 132, False)
            assert plan.splits * plan.keys_per_split >= K and (plan.splits - 1) * plan.keys_per_split < max(K, 1)
            assert plan.keys_per_split % plan.config.block_n == 0
            assert plan.trans_copy == (dot == "float32" and prec == "tf32")
            if not plan.fused:  # the workspace parts start on 16-byte boundaries and do not overlap
                offs = [0, plan.m_off, plan.l_off, plan.r_off, plan.pos_off, plan.ws_size]
                assert all(o % 4 == 0 for o in offs) and offs == sorted(offs)
                assert plan.m_off >= plan.splits * B * d and plan.ws_size - plan.pos_off >= B
            assert H.fwd_plan(B, K, d, nd, dot, prec, (9, 0), 132, False) is plan  # memoized
    # the bf16 forward counts 2 programs per SM, so B=256 splits over 2 x 132 slots
    plan = H.fwd_plan(256, 65536, 128, "bfloat16", "bfloat16", "ieee", (9, 0), 132, False)
    assert plan.config.ctas_per_sm == 2 and plan.row_blocks * plan.splits <= 2 * 132


class _Launches:
    """Replaces every kernel object of moco_fast.kernels by a recorder (no launch at all)."""

    def __init__(self, monkeypatch, on_launch=None):
        from moco_fast.kernels import enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum

        self.calls = []
        for mod in (enqueue, infonce_bwd, infonce_combine, infonce_fwd, momentum):
            for name in dir(mod):
                if name.endswith("_kernel"):
                    monkeypatch.setattr(mod, name, self._recorder(name, on_launch))

    def _recorder(self, name, on_launch):
        outer = self

        class Kernel:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    outer.calls.append(name)
                    if on_launch is not None:
                        on_launch(name, args)

                return launch

        return Kernel()


def _call_every_launcher(device=DEV):
    q, k, n = infonce_inputs(7, 63, 16, device=device)
    loss, lse, delta, _ = KN.infonce_forward(q, k, n, 1 / TEMP, num_splits=2, config=H.TileConfig(16, 16, 4, 1))
    grad = torch.ones(7, device=device)
    KN.infonce_backward(grad, q, k, loss, delta, 1 / TEMP)
    KN.infonce_backward_negatives(grad, q, n, lse, 1 / TEMP)
    ts = [torch.zeros(5, device=device), torch.zeros(3, device=device)]
    KN.momentum_update_(ts, [torch.ones_like(t) for t in ts], 0.9)  # two storages: the multi-tensor kernel
    KN.momentum_update_(ts[:1], [torch.ones(5, device=device)], 0.9)  # one tensor: the flat kernel
    queue = torch.zeros(10, 16, device=device)
    ptr = torch.zeros(1, dtype=torch.int64, device=device)
    KN.enqueue_(queue, ptr, ptr.clone(), torch.ones(2, 16, device=device), True)


def test_every_launch_runs_under_the_tensors_device_guard(monkeypatch):
    """Triton launches on the current CUDA device and stream: every launcher must enter the tensors'
    device around its launches (checked with a recording guard and recording kernels)."""
    from moco_fast.kernels import runtime as R

    inside: list = []
    entered = []

    @contextlib.contextmanager
    def guard(device):
        entered.append(device)
        inside.append(device)
        try:
            yield
        finally:
            inside.pop()

    seen = []
    monkeypatch.setattr(R, "device_guard", guard)
    launches = _Launches(monkeypatch, on_launch=lambda name, args: seen.append((name, list(inside))))
    _call_every_launcher()
    kernels = {name for name, _ in seen}
    assert kernels == {
        "infonce_fwd_split_kernel",
        "infonce_combine_kernel",
        "infonce_bwd_qk_kernel",
        "infonce_bwd_negatives_kernel",
        "momentum_multi_kernel",
        "momentum_flat_kernel",
        "enqueue_kernel",
    }, launches.calls
    for name, stack in seen:
        assert stack == [torch.device(DEV)], f"{name} launched outside the device guard: {stack}"


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    """The guard makes the tensors' CUDA device current (torch.cuda.device), and is a no-op on CPU."""
    from moco_fast.kernels import runtime as R

    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    with R.device_guard(torch.device("cuda", 1)):
        pass
    with R.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_launchers_on_the_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the launchers must run on cuda:1 (else an illegal
    memory access) and give the same results as on cuda:0."""
    torch.cuda.set_device(0)
    q, k, n = infonce_inputs(37, 1000, 96, device="cuda:1")
    run_forward_check(q, k, n, 1 / TEMP, 1e-5)
    _call_every_launcher("cuda:1")
    torch.cuda.synchronize(1)


def test_launchers_plan_once_per_shape(monkeypatch):
    """A repeated call does not rerun the split search (the plan is memoized per shape)."""
    from moco_fast.kernels import heuristics as HH

    _Launches(monkeypatch)
    q, k, n = infonce_inputs(37, 1000, 96, device=DEV)
    KN.infonce_forward(q, k, n, 1 / TEMP)
    calls = []
    real = HH.num_splits
    monkeypatch.setattr(HH, "num_splits", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    for _ in range(3):
        KN.infonce_forward(q, k, n, 1 / TEMP)
    assert calls == []
