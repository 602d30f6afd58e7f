"""Build script for moco_fast.

The pure-Python package always installs. The CUDA extension ``moco_fast._C`` (sources in csrc/) is
built when a CUDA build of torch and a CUDA toolkit exist; ``MOCO_FAST_BUILD_CUDA`` controls it:

* ``auto`` (default): build when possible; if the build fails, say how to skip it and fail.
* ``1``: build, and fail loudly when it cannot be built.
* ``0``: never build (pure-Python install; the "torch" and "triton" backends still work).

Two things a plain ``pip install -e .`` gets wrong on some machines are handled here:

* pip builds in an isolated environment that hides the user's torch. We look up the torch of the
  interpreter that runs pip (same executable, without pip's overlay) so the extension is built
  against exactly the torch it will be loaded by. ``--no-build-isolation`` also works.
* ``nvcc`` on PATH may be a wrapper script, so torch's guess of CUDA_HOME (the grandparent of
  ``which nvcc``) points at a folder with no libcudart. We find the real toolkit and set CUDA_HOME
  before torch.utils.cpp_extension reads it.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_MODE = os.environ.get("MOCO_FAST_BUILD_CUDA", "auto").strip().lower()
SKIP_HINT = "moco_fast: to install without the CUDA extension, set MOCO_FAST_BUILD_CUDA=0"


def _log(msg: str) -> None:
    print(f"moco_fast setup: {msg}", file=sys.stderr)


def _import_outer_torch():
    """Import torch, reaching past pip's isolated build environment if needed."""
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    site_dir = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
    if not site_dir:
        return None
    sys.path.append(site_dir)
    try:
        import torch

        _log(f"using the torch of the installing interpreter from {site_dir}")
        return torch
    except ImportError:
        return None


def _real_nvcc_home() -> str | None:
    """Folder of the real CUDA toolkit (the one whose bin/nvcc is a binary next to lib64/libcudart)."""
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.environ["CUDA_HOME"])
    if os.environ.get("CUDA_PATH"):
        candidates.append(os.environ["CUDA_PATH"])
    nvcc = shutil.which("nvcc")
    if nvcc:
        # A wrapper script typically ends in `exec /real/path/bin/nvcc "$@"`: follow it.
        try:
            with open(nvcc, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"#!"):
                for token in head.decode(errors="ignore").split():
                    if token.endswith("/bin/nvcc") and os.path.isfile(token):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/usr/local/cuda"]
    for home in candidates:
        has_nvcc = os.path.isfile(os.path.join(home, "bin", "nvcc"))
        has_rt = glob.glob(os.path.join(home, "lib64", "libcudart*")) or glob.glob(
            os.path.join(home, "targets", "*", "lib", "libcudart*")
        )
        if has_nvcc and has_rt:
            return os.path.realpath(home)
    return None


def _cuda_extension():
    """Return (ext_modules, cmdclass) for moco_fast._C, or ([], {}) when it is not built."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if BUILD_MODE in ("0", "false", "no", "off"):
        _log("MOCO_FAST_BUILD_CUDA=0: pure-Python install")
        return [], {}
    if BUILD_MODE not in ("auto", "1", "true", "yes", "on"):
        raise SystemExit(f"MOCO_FAST_BUILD_CUDA must be auto, 0 or 1, got {BUILD_MODE!r}")
    required = BUILD_MODE != "auto"

    def unavailable(why: str):
        if required:
            raise SystemExit(f"moco_fast: MOCO_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
        _log(f"not building the CUDA extension ({why}); pure-Python install")
        return [], {}

    if not any(s.endswith(".cu") for s in sources):
        return unavailable("no CUDA sources in csrc/")
    cuda_home = _real_nvcc_home()
    if cuda_home is None:
        return unavailable("no CUDA toolkit (nvcc + libcudart) found; set CUDA_HOME")
    os.environ["CUDA_HOME"] = cuda_home  # before cpp_extension reads it
    torch = _import_outer_torch()
    if torch is None:
        return unavailable("torch is not importable; install torch first")
    if torch.version.cuda is None:
        return unavailable(f"torch {torch.__version__} is a CPU build")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        visible = False
        try:
            visible = torch.cuda.is_available()
        except Exception:  # noqa: BLE001 - a broken driver means "no GPU visible"
            visible = False
        if not visible:
            # No GPU to detect the arch from: build for Ampere and Hopper (PTX for later chips).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
            _log("no GPU visible: TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX")
        else:
            # The kernels use bf16/TF32 tensor cores and cp.async: sm_80 (Ampere) or newer only.
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            archs = sorted(f"{major}.{minor}" for major, minor in caps if major >= 8)
            if not archs:
                return unavailable(f"the visible GPUs {sorted(caps)} predate sm_80, which the kernels need")
            if len(archs) < len(caps):
                os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
                _log(f"building for the sm_80+ GPUs only: TORCH_CUDA_ARCH_LIST={';'.join(archs)}")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    _log(f"building moco_fast._C with CUDA_HOME={cuda_home}, arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'native')}")
    ext = CUDAExtension(
        name="moco_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std flag: torch's BuildExtension adds the standard its headers need (C++17 up to torch 2.9,
        # C++20 from torch 2.10 on) when none is given.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-Xptxas=-v"]},
    )

    class Build(BuildExtension):
        def run(self):
            try:
                super().run()
            except BaseException:
                if not required:
                    _log("building the CUDA extension failed.")
                    print(SKIP_HINT, file=sys.stderr)
                raise

    return [ext], {"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _cuda_extension()

# moco_fast and its subpackages (every folder with an __init__.py), plus the Triton kernels from kernels/.
packages = ["moco_fast", "moco_fast.kernels"] + sorted(
    f"moco_fast.{entry}"
    for entry in os.listdir("moco_fast")
    if os.path.isfile(os.path.join("moco_fast", entry, "__init__.py"))
)

setup(
    packages=packages,
    package_dir={"moco_fast": "moco_fast", "moco_fast.kernels": "kernels"},
    package_data={"moco_fast": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
