"""Test configuration shared by every test file.

Triton decides at import time whether @triton.jit kernels run compiled or in the interpreter, so
TRITON_INTERPRET=1 must be set before anything imports triton: on a machine without a CUDA GPU
the "triton" backend is then tested on CPU tensors (slowly, with exact fp32 dots).
"""

import importlib.util
import os
import shutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# The "train" extra (torchvision, mlxtend, matplotlib, tqdm) is optional: on a bare GPU box the suite must still
# collect and run, so tests needing it skip. CI sets MOCO_FAST_REQUIRE_TRAIN_DEPS=1 so they run there, not skip.
REQUIRE_TRAIN_DEPS = os.environ.get("MOCO_FAST_REQUIRE_TRAIN_DEPS", "0") not in ("", "0")


def train_dependency(name: str):
    """Import module ``name`` of the train extra; skip the caller if it is missing (unless CI requires it)."""
    if REQUIRE_TRAIN_DEPS:
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name, reason=f"needs {name} (pip install -e '.[train]')")


@pytest.fixture(autouse=True)
def _seed_and_precision():
    """Random data every run, but reproducible within a test; IEEE fp32 dots unless a test asks."""
    torch.manual_seed(torch.randint(0, 2**31 - 1, ()).item() if os.environ.get("MOCO_FAST_RANDOM_SEED") else 1234)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


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
