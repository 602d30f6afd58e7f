"""Numeric constants and the float32 matmul precision in force, named once for the whole package.

The Triton kernels (``moco_fast.kernels``) and the CUDA extension's wrapper (``moco_fast.cuda_ext``)
read the precision here; the C++ sources name their own copies of the constants once, in
``csrc/common.cuh``.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): log(x) == log2(x) * LN2
assert abs(LOG2E - 1.0 / math.log(2.0)) < 1e-15 and abs(LN2 - math.log(2.0)) < 1e-15


def fp32_matmul_precision() -> str:
    """ "ieee" or "tf32": how float32 dots on CUDA may run, as the user configured torch.

    Reads the new API (``torch.backends.cuda.matmul.fp32_precision``, torch >= 2.9, which also
    resolves an inherited ``torch.backends.fp32_precision``) when it is set, the legacy
    ``torch.get_float32_matmul_precision()`` otherwise ("highest" -> "ieee", "high"/"medium" ->
    "tf32"). Never raises: torch >= 2.9 raises from the legacy getter once the two APIs are mixed,
    and this is called on every forward.
    """
    matmul = getattr(torch.backends.cuda, "matmul", None)
    new = getattr(matmul, "fp32_precision", None)
    if new in ("ieee", "tf32"):
        return new
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed legacy/new settings on other backends: TF32 is what torch would allow
        return "tf32"
    return "ieee" if legacy == "highest" else "tf32"
