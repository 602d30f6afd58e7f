"""Which implementation runs an op: "auto" | "cuda" | "triton" | "torch" | "reference".

Every implementation module (``moco_fast.chunked`` for "torch", ``moco_fast.kernels`` for "triton",
``moco_fast.cuda_ext`` for "cuda") provides the same functions, called by ``moco_fast.ops`` with
arguments that are already validated (same device, 2-D, contiguous, matching d, and within the
dtypes and sizes the backend declares it supports). A backend function never hands work to another
backend behind the caller's back: given an input it cannot serve it raises a ValueError/TypeError.

``infonce_forward(q, k, negatives, scale, need_rank=True) -> (loss, lse, out, rank)``
    q, k: (B, d), negatives: (K, d), any of fp32/bf16/fp16; scale = 1/temperature (Python float).
    Row i's logits are scale·[q_i·k_i, q_i·n_0, …, q_i·n_{K-1}] (fp32 accumulation).
    loss: (B,) fp32 per-row loss lse_i − scale·q_i·k_i, computed by the backend itself;
    lse: (B,) fp32 natural-log logsumexp of the row; out: (B, d) fp32 = Σ_j softmax_ij·x_j over
    x = [k_i, n_0, …]; rank: (B,) int64 = #{j : logit of n_j > logit of k_i}. With
    ``need_rank=False`` a backend that saves time by skipping the rank may return -1s.
    (fp64 inputs, torch backend only: loss, lse and out are fp64.)
``infonce_backward(grad, q, k, lse, out, scale) -> (dq, dk)``
    grad: (B,) fp32 gradient of the per-row loss. dq = grad·scale·(out − k) in q.dtype;
    dk = grad·scale·(p0 − 1)·q in k.dtype with p0 = exp(scale·q_i·k_i − lse_i).
``infonce_backward_negatives(grad, q, negatives, lse, scale) -> dn``
    dn_j = scale·Σ_i grad_i·softmax_ij·q_i, (K, d) in negatives.dtype (recomputes the logits blockwise).
``momentum_update_(targets, sources, momentum) -> None``
    Lists of tensors of one device and dtype; target ← target + (1 − momentum)·(source − target)
    in place (a lerp: fp32 math, fp64 for fp64, one rounding to the storage dtype). The official
    two-rounding formula ``target·m + source·(1 − m)`` is the "torch" backend's ``exact`` mode.
``enqueue_(queue, ptr, count, keys, normalize) -> ok``
    queue (K, d); ptr, count: (1,) int64 device tensors; keys (B, d) with 1 ≤ B ≤ K. Writes row
    (ptr + i) mod K (L2-normalized first if ``normalize``, cast to queue.dtype), advances ptr and
    count on the device, and returns ok: a (1,) bool device tensor. If any key is NaN/Inf nothing is
    written, ptr and count stay, and ok is False — the caller decides whether to raise.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
ENV_VAR = "MOCO_FAST_BACKEND"

_MODULES = {"torch": "moco_fast.chunked", "triton": "moco_fast.kernels", "cuda": "moco_fast.cuda_ext"}


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def is_available(name: str) -> bool:
    """Whether backend ``name`` can run somewhere in this process (import succeeds)."""
    if name in ("torch", "reference"):
        return True
    if name not in _MODULES:
        return False
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return bool(getattr(module, "AVAILABLE", True))


def availability() -> dict[str, str | None]:
    """Every concrete backend mapped to None when it can run in this process, else the reason it cannot."""
    out: dict[str, str | None] = {}
    for name in ("triton", "cuda", "torch", "reference"):
        if is_available(name):
            out[name] = None
            continue
        try:
            module = importlib.import_module(_MODULES[name])
            out[name] = str(getattr(module, "IMPORT_ERROR", None) or "not available")
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def available_backends() -> list[str]:
    """Concrete backends that import in this process, in "auto"'s order of preference."""
    return [b for b in ("triton", "cuda", "torch", "reference") if is_available(b)]


def check_name(backend: object, argument: str = "backend") -> str:
    """The lower-cased backend name, or a ValueError naming ``argument``."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"{argument} must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend.lower()


def resolve(backend: str, device: torch.device) -> str:
    """Turn a requested backend into a concrete one for tensors on ``device``.

    "auto" reads MOCO_FAST_BACKEND (if set and not "auto"), else picks "triton" → "cuda" for CUDA
    tensors and "torch" otherwise. (Triton first: its kernels run in CI under the interpreter, while
    the CUDA extension's kernels have not yet been run on a GPU; revisit once GPU numbers exist.)
    An explicit name must be able to run on ``device``.
    """
    name = check_name(backend)
    if name == "auto":
        name = check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if is_available(candidate):
                    return candidate
        return "torch"
    if name in ("cuda", "triton") and not is_available(name):
        raise RuntimeError(f"backend {name!r} is not available in this installation")
    if name == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors; got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import); got {device}")
    return name


def implementation(name: str):
    """The module implementing concrete backend ``name`` (see the module docstring for its functions)."""
    if name == "reference":
        raise ValueError("the reference backend has no kernel module; ops call moco_fast.reference")
    return importlib.import_module(_MODULES[name])
