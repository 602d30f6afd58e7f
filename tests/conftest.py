"""Test configuration and helpers shared by every test file.

Triton decides at import time whether @triton.jit kernels run compiled or in the interpreter, so
TRITON_INTERPRET=1 must be set before anything imports triton: on a machine without a CUDA GPU
the "triton" backend is then tested on CPU tensors (slowly, with exact fp32 dots).

Backends. The ``backend`` fixture runs a test once per concrete backend — "torch", "reference",
"triton" (the interpreter on CPU tensors without a GPU, compiled on CUDA tensors with one) and
"cuda" (moco_fast._C, CUDA tensors only) — and skips, saying why, where one cannot run here;
``device`` is the device that backend's tensors live on. Narrow it with
``@pytest.mark.parametrize("backend", [...], indirect=True)`` where a test is too slow for the
interpreter or needs a mode a backend does not declare. MOCO_FAST_EXPECT_TRITON=1 /
MOCO_FAST_EXPECT_CUDA_EXT=1 (set by .ci/run; MOCO_FAST_BUILD_CUDA=1 implies the second) turn
"not installed / not built" into failures; a missing GPU always skips.

The float64 oracle and the error metrics are in tests/oracle.py.
"""

import contextlib
import functools
import importlib.util
import os
import shutil
import socket
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# The "train" extra (torchvision, mlxtend, matplotlib, tqdm) is optional: on a bare GPU box the suite must still
# collect and run, so tests needing it skip. CI sets MOCO_FAST_REQUIRE_TRAIN_DEPS=1 so they run there, not skip.
REQUIRE_TRAIN_DEPS = os.environ.get("MOCO_FAST_REQUIRE_TRAIN_DEPS", "0") not in ("", "0")

# CI: a missing / unusable Triton backend, or a CUDA extension that was not built, is a failure there.
EXPECT_TRITON = os.environ.get("MOCO_FAST_EXPECT_TRITON", "0") not in ("", "0")
EXPECT_CUDA_EXT = os.environ.get("MOCO_FAST_EXPECT_CUDA_EXT", "") == "1" or os.environ.get(
    "MOCO_FAST_BUILD_CUDA", ""
).strip().lower() in ("1", "true", "yes", "on")

#: Every concrete backend, in the order the by-op tests run them.
ALL_BACKENDS = ("torch", "reference", "triton", "cuda")
#: The backends that compute everything in fp32 (fp64 for fp64) on any device: the tight error model of
#: tests/test_info_nce.py and float64 inputs hold for them only (the kernels round p for half dots).
EXACT_BACKENDS = ("torch", "reference")


def train_dependency(name: str):
    """Import module ``name`` of the train extra; skip the caller if it is missing (unless CI requires it)."""
    if REQUIRE_TRAIN_DEPS:
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"needs {name} (pip install -e '.[train]')")


def peer(name: str):
    """Import module ``name`` of a peer library (lightly: the parity oracle); skip the caller if it is
    missing, unless CI requires it (MOCO_FAST_REQUIRE_TRAIN_DEPS=1; the test extra installs it)."""
    if REQUIRE_TRAIN_DEPS:
        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"needs {name} (pip install -e '.[test]')")


class LazyPeer:
    """A peer module imported at first attribute access, so only the tests that use it skip without it
    (a module-level importorskip would skip the whole file)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        return getattr(peer(self._name), attr)


@functools.cache
def backend_status(name: str) -> tuple[str | None, bool]:
    """(None, _) when backend ``name`` can run tests here, else (why not, whether CI expects it to)."""
    if name in EXACT_BACKENDS:
        return None, False
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed", EXPECT_TRITON
        import moco_fast.kernels as kernels

        if not kernels.AVAILABLE:
            return f"triton backend unavailable: {kernels.IMPORT_ERROR!r}", EXPECT_TRITON
        if not kernels.INTERPRETED and not HAS_CUDA:
            return "no CUDA GPU and TRITON_INTERPRET is not set", EXPECT_TRITON
        return None, False
    if name == "cuda":
        from moco_fast import cuda_ext

        if not cuda_ext.AVAILABLE:
            return f"moco_fast._C is not available ({cuda_ext.IMPORT_ERROR})", EXPECT_CUDA_EXT
        if not HAS_CUDA:
            return "the cuda backend needs a CUDA GPU", False
        return None, False
    raise ValueError(f"unknown backend {name!r}")


def require_backend(name: str) -> None:
    """Skip the caller (or fail it, where CI expects the backend) unless backend ``name`` can run here."""
    reason, expected = backend_status(name)
    if reason is None:
        return
    if expected:
        pytest.fail(f"the {name} backend is expected here (MOCO_FAST_EXPECT_*) but {reason}", pytrace=False)
    pytest.skip(f"{name}: {reason}")


def backend_device(name: str) -> torch.device:
    """Where backend ``name``'s tensors live in the tests: the CPU for torch/reference (and Triton's
    interpreter), the GPU for the cuda backend and compiled Triton."""
    if name == "cuda":
        return torch.device("cuda")
    if name == "triton":
        import moco_fast.kernels as kernels

        return torch.device("cpu" if kernels.INTERPRETED else "cuda")
    return torch.device("cpu")


def require_support(backend: str, op: str, dtypes, *, dim=None, contiguous=True, mode=None) -> None:
    """Skip the caller, saying why, when ``backend`` does not declare support for this call of ``op``
    (its SUPPORT in moco_fast; e.g. float64 or the exact momentum mode on the kernel backends)."""
    from moco_fast import backends

    why = backends.refusal(backend, op, backend_device(backend), tuple(dtypes), dim, contiguous, mode)
    if why is not None:
        pytest.skip(f"{backend} does not serve this {op}: {why}")


@pytest.fixture(params=ALL_BACKENDS)
def backend(request) -> str:
    """A concrete backend that can run here (see the module docstring)."""
    require_backend(request.param)
    return request.param


@pytest.fixture
def device(backend) -> torch.device:
    """The device of ``backend``'s tensors."""
    return backend_device(backend)


def contract(name: str):
    """The module of backend ``name`` (its functions follow the contract in moco_fast/backends.py)."""
    from moco_fast import backends

    return backends.module(name)


def rows(n: int, d: int, dtype: torch.dtype, normalized: bool = True, scale: float = 1.0, device="cpu") -> torch.Tensor:
    """n random rows (unit rows by default, times ``scale``) drawn in float64, rounded to ``dtype``."""
    x = torch.randn(n, d, dtype=torch.float64, device=device)
    if normalized:
        x = torch.nn.functional.normalize(x, dim=1)
    return (x * scale).to(dtype)


def infonce_inputs(B, K, d, dq=torch.float32, dk=None, dn=None, *, normalize=True, device="cpu"):
    """q, k (B, d) and negatives (K, d) of random (unit) rows in dtypes dq, dk (default dq), dn (default dk)."""
    dk = dk or dq
    dn = dn or dk
    return tuple(rows(r, d, dt, normalize, device=device) for r, dt in ((B, dq), (B, dk), (K, dn)))


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """Random data every run, but reproducible within a test; IEEE fp32 dots unless a test asks."""
    torch.manual_seed(torch.randint(0, 2**31 - 1, ()).item() if os.environ.get("MOCO_FAST_RANDOM_SEED") else 1234)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


NEW_PRECISION_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture
def restore_precision():
    """Both fp32 precision APIs back to their defaults afterwards (the autouse fixture reads the legacy
    getter, which raises once the new API has been set)."""
    yield
    if NEW_PRECISION_API:
        torch.backends.fp32_precision = "none"
        torch.backends.cuda.matmul.fp32_precision = "none"
    torch.set_float32_matmul_precision("highest")


@pytest.fixture
def one_thread():
    """Many small cases: intra-op threads only add sync overhead (4-10x slower on a busy 2-core
    machine); the setting is restored afterwards. Modules use it as ``pytestmark``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a gloo rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int, timeout_s: float) -> None:
    """In a spawned worker: one intra-op thread, then join the gloo group on 127.0.0.1:port."""
    import datetime

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def run_ranks(worker, world: int, out_dir, timeout_s: float) -> list[dict]:
    """Spawn ``worker(rank, port, out_dir)`` on ``world`` processes (a fresh gloo port), fail the caller if
    they take over ``timeout_s`` (killing them), and load what each saved as ``out_dir/rank{r}.pt``; a rank
    whose result says ``ok: False`` fails the caller with its ``error``. Skips without gloo."""
    import time

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")

    ctx = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for rank in range(world):
        path = os.path.join(str(out_dir), f"rank{rank}.pt")
        assert os.path.exists(path), f"rank {rank} wrote no result"
        results.append(torch.load(path, weights_only=False))
        assert results[-1].get("ok", True), f"rank {rank} failed:\n{results[-1].get('error')}"
    return results


def poison_allocator(device) -> None:
    """Fill cached CUDA allocator blocks with 0xFF bytes (NaN as float, -1 as int64) before a kernel runs,
    so an output element a kernel fails to write shows up. A no-op off the GPU."""
    if torch.device(device).type != "cuda":
        return
    small = [torch.empty(1 << 20, dtype=torch.uint8, device=device).fill_(255) for _ in range(4)]
    large = torch.empty(512 << 20, dtype=torch.uint8, device=device).fill_(255)
    del small, large


@contextlib.contextmanager
def no_host_sync(device):
    """On a GPU, torch raises on any synchronizing CUDA call inside (the ops must not sync); else nothing."""
    if torch.device(device).type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def compile_python(which: str) -> str:
    """The interpreter a machine-code test compiles under: this one ("main") or the triton 3.6 side venv
    ("triton36", MOCO_FAST_TRITON36_PYTHON, which .ci/run sets; the test skips without it)."""
    if which == "main":
        return sys.executable
    python = os.environ.get("MOCO_FAST_TRITON36_PYTHON")
    if not python:
        pytest.skip("MOCO_FAST_TRITON36_PYTHON is not set (.ci/run sets it to a venv with triton==3.6.0)")
    return python


def find_cuobjdump() -> str | None:
    """A cuobjdump to read SASS with: triton's bundled one (backends/nvidia/bin, found without importing
    triton), else a CUDA toolkit's (CUDA_HOME / CUDA_PATH / PATH / /usr/local/cuda); None if there is none.
    Used by the machine-code tests (tests/machine_code)."""
    candidates = []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)
