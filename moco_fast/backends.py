"""Which implementation runs an op: "auto" | "cuda" | "triton" | "torch" | "reference".

The backend contract. Every implementation module — ``moco_fast.torch_backend`` ("torch", blockwise
PyTorch, any device), ``moco_fast.kernels`` ("triton"), ``moco_fast.cuda_ext`` ("cuda", the compiled
``moco_fast._C``) and ``moco_fast.reference`` ("reference", the official formulation, materializing
everything) — declares what it can serve in a module-level ``SUPPORT`` dict, op name → :class:`Support`
(devices, dtypes, largest feature dim, contiguity, modes), and provides the functions below. One
function, :func:`select`, picks the implementation of a call with the same rule for every op:

* an explicitly requested backend that cannot serve the call raises :class:`BackendError` saying why
  (not installed, wrong device, dtype, feature dim, mode); nothing silently runs elsewhere;
* "auto" (or the ``MOCO_FAST_BACKEND`` environment variable, which overrides "auto" only) takes the
  first backend of :data:`AUTO_ORDER` for the tensors' device type that can serve the call.

The functions are called (by ``moco_fast.ops`` and the modules) with arguments that are already
validated: same device, 2-D, contiguous, matching d, and within the declared support. A backend
function never hands work to another backend: given an input it cannot serve it raises.

``infonce_forward(q, k, negatives, scale, need_rank=True) -> (loss, lse, delta, rank)``
    q, k: (B, d), negatives: (K, d), any of fp32/bf16/fp16; scale = 1/temperature (Python float).
    Row i's logits are scale·[q_i·k_i, q_i·n_0, …, q_i·n_{K-1}] (fp32 accumulation), pos_i the first.
    The positive is kept apart from the negatives (docs/design.md "Numerics"): with
    m = max(pos, max_j s_j), l_neg = Σ_j exp(s_j − m) and w0 = exp(pos − m),
    loss: (B,) fp32 per-row loss (m − pos) + log1p(l_neg + expm1(pos − m)) (= lse − pos, computed
    without cancelling when the positive dominates), by the backend itself;
    lse: (B,) fp32 natural-log logsumexp of the row;
    delta: (B, d) fp32 = O − k = Σ_j softmax_ij·(n_j − k_i) = (Σ_j exp(s_j − m)·n_j − l_neg·k_i) / (w0 + l_neg)
    (O = Σ softmax·x over x = [k_i, n_0, …]; never formed as O − k);
    rank: (B,) int64 = #{j : logit of n_j > logit of k_i}. With ``need_rank=False`` a backend that
    saves time by skipping the rank may return -1s. K = 0 gives loss 0 and delta 0 exactly.
    Per-row loss and delta within 1e-5 of float64 relative to |loss_i| and ‖delta_i‖ at any loss size
    (fp32 IEEE dots). (fp64 inputs, torch backend only: loss, lse and delta are fp64.)
``infonce_backward(grad, q, k, loss, delta, scale) -> (dq, dk)``
    grad: (B,) fp32 gradient of the per-row loss; loss, delta: the forward's. dq = grad·scale·delta in
    q.dtype; dk = grad·scale·(p0 − 1)·q in k.dtype with p0 − 1 = expm1(−loss) (exactly 0 when K = 0).
``infonce_backward_negatives(grad, q, negatives, lse, scale) -> dn``
    dn_j = scale·Σ_i grad_i·softmax_ij·q_i, (K, d) in negatives.dtype (recomputes the logits blockwise).
``momentum_update_(targets, sources, momentum, exact=False) -> None``
    Lists of tensors of one device and dtype; target ← target + (1 − momentum)·(source − target)
    in place (a lerp: fp32 math, fp64 for fp64, one rounding to the storage dtype). ``exact=True``
    (mode "exact") is the official two-rounding formula ``target·m + source·(1 − m)``, bit for bit.
``enqueue_(queue, ptr, count, keys, normalize) -> ok``
    queue (K, d); ptr, count: (1,) int64 device tensors; keys (B, d) with 1 ≤ B ≤ K. Writes row
    (ptr + i) mod K (L2-normalized first if ``normalize``, cast to queue.dtype), advances ptr and
    count on the device, and returns ok: a (1,) bool device tensor. If any key is NaN/Inf nothing is
    written, ptr and count stay, and ok is False — the caller decides whether to raise.

--- NT-Xent / MoCo v3 / CMC / memory bank (op names "contrast", "memory_bank_update"):

``contrast_forward(q, keys, target, exclude, scale, need_rank=True) -> (loss, lse, dloss_dq, rank)``
    q (M, d), keys (N, d), any of fp32/bf16/fp16; target (M,) int64 in [0, N); exclude None or (M,)
    int64 in [-1, N) (-1: none), never equal to target. Row i's logits are scale·q_i·k_j over every
    j ≠ exclude_i (fp32 accumulation). loss: (M,) fp32 lse_i − scale·q_i·k_{t_i}; lse: (M,) fp32;
    dloss_dq: (M, d) fp32 = scale·(Σ_j P_ij·k_j − k_{t_i}) = ∂loss_i/∂q_i (so the backward of q never
    reads the keys); rank: (M,) int64 = #{j ∉ {t_i, exclude_i} : logit_ij > logit_{i,t_i}} (-1s allowed
    with ``need_rank=False``). (fp64 inputs, torch/reference only: fp64 loss, lse, dloss_dq.)
``contrast_backward_keys(grad, q, keys, target, exclude, lse, scale) -> dkeys``
    dkeys_j = scale·Σ_i grad_i·(P_ij − [j = t_i])·q_i, (N, d) in keys.dtype; P recomputed blockwise
    from lse, excluded entries 0. Only called when the keys require grad.
``memory_bank_update_(bank, indices, features, momentum) -> ok``
    bank (N, d) in place; indices (B,) int64 in [0, N); features (B, d). bank[i_b] ←
    normalize(m·bank[i_b] + (1 − m)·f_b) in fp32 (x / max(‖x‖, 1e-12)), cast to bank.dtype. Duplicate
    indices: the last occurrence in the batch wins, mixed with the row as it was before the batch.
    All-or-nothing on non-finite features; returns ok, a (1,) bool device tensor (no host sync on a GPU).
--- BYOL / SwAV / DINO (op "dino_loss"; the pair bookkeeping is moco_fast/dino_pairs.py):

``dino_softmax_pass(x, keys, values, bias, scale) -> (lse, out)``
    x (R, b); keys, values (P, b) (values may be keys itself), P ≥ 1; bias (P,) fp32 or None; scale =
    1/temperature. Row r's logits z_rk = scale·(x_r·keys_k − bias_k) (fp32 accumulation); lse (R,) fp32
    natural-log logsumexp; out (R, b) fp32 = Σ_k softmax(z_r)_k·values_k. Never forms (R, P).
    (fp64 inputs, torch/reference only: fp64 outputs.)
``dino_prototype_grad(student, teacher, prototypes, teacher_prototypes, center, lse_s, lse_t, num_views,
num_teacher_views, student_scale, teacher_scale, grad_scale) -> dw``
    student (S·B, b), teacher (T·B, b) view-major; prototypes, teacher_prototypes (P, b); center (P,);
    lse_s/lse_t from the passes above (student: no bias; teacher: bias = center). With P_s, P_t the two
    softmaxes recomputed blockwise, h[v] student view v, H = Σ_v h[v] and n_v = T − [v < T]:
    dw = grad_scale·(Σ_v n_v·P_s[v]ᵀ·h[v] + Σ_u P_t[u]ᵀ·([u < S]·h[u] − H)), (P, b) in prototypes.dtype.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")
CONCRETE = ("triton", "cuda", "torch", "reference")
ENV_VAR = "MOCO_FAST_BACKEND"

#: What "auto" tries, in order, for tensors of a device type (the reference is never picked).
#: CUDA: Triton first (its kernels are proven in CI under the interpreter), then the CUDA extension,
#: then the portable torch code. Anything else (CPU, ...): the torch code.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch")}
AUTO_ORDER_DEFAULT = ("torch",)

_MODULES = {
    "torch": "moco_fast.torch_backend",
    "triton": "moco_fast.kernels",
    "cuda": "moco_fast.cuda_ext",
    "reference": "moco_fast.reference",
}


class BackendError(ValueError):
    """An explicitly requested backend cannot serve this call; the message says why."""


@dataclass(frozen=True)
class Support:
    """What one backend serves for one op.

    devices: device types ("cpu", "cuda"), or None for any device torch runs on.
    dtypes: the input/storage dtypes accepted.
    max_dim: the largest feature dimension d (None: any).
    contiguous: the inputs must be contiguous (the caller does not copy them).
    modes: optional behaviours the caller may ask for (e.g. {"lerp", "exact"} for momentum_update).
    """

    devices: frozenset[str] | None
    dtypes: frozenset[torch.dtype]
    max_dim: int | None = None
    contiguous: bool = False
    modes: frozenset[str] = frozenset()

    def refusal(
        self, device: torch.device, dtypes: Iterable[torch.dtype], dim: int | None, contiguous: bool, mode: str | None
    ) -> str | None:
        """Why this support does not cover a call, or None when it does."""
        if self.devices is not None and device.type not in self.devices:
            return f"it runs on {'/'.join(sorted(self.devices))} tensors, got tensors on {device}"
        for dtype in dtypes:
            if dtype not in self.dtypes:
                names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
                return f"it takes {names}, got {str(dtype).replace('torch.', '')}"
        if self.max_dim is not None and dim is not None and dim > self.max_dim:
            return f"its largest feature dim is {self.max_dim}, got d={dim}"
        if self.contiguous and not contiguous:
            return "it needs contiguous tensors"
        if mode is not None and mode not in self.modes:
            return f"it has no {mode!r} mode (it has {', '.join(sorted(self.modes)) or 'none'})"
        return None


def check_name(backend: object, argument: str = "backend") -> str:
    """The lower-cased backend name, or a ValueError naming ``argument``."""
    if not isinstance(backend, str) or backend.lower() not in BACKENDS:
        raise ValueError(f"{argument} must be one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend.lower()


def _import_error(name: str) -> str | None:
    """None when backend ``name``'s module imports and says it is usable, else the reason."""
    module = importlib.import_module(_MODULES[name])  # a broken module raises: that is a bug, not "unavailable"
    if getattr(module, "AVAILABLE", True):
        return None
    return str(getattr(module, "IMPORT_ERROR", None) or "not available")


@functools.cache
def unavailable_reason(name: str) -> str | None:
    """None when concrete backend ``name`` can run in this process, else the reason (cached)."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; the concrete ones are {', '.join(CONCRETE)}")
    return _import_error(name)


def is_available(name: str) -> bool:
    """Whether backend ``name`` can run somewhere in this process (its module imports and is usable)."""
    return name in _MODULES and unavailable_reason(name) is None


def availability() -> dict[str, str | None]:
    """Every concrete backend mapped to None when it can run in this process, else the reason it cannot."""
    return {name: unavailable_reason(name) for name in CONCRETE}


def available_backends() -> list[str]:
    """Concrete backends that import in this process, in order of preference."""
    return [b for b in CONCRETE if is_available(b)]


def module(name: str):
    """The implementation module of concrete backend ``name`` (its functions follow the contract above)."""
    return importlib.import_module(_MODULES[name])


def support(name: str, op: str) -> Support | None:
    """What backend ``name`` declares for ``op`` (None: it does not implement the op)."""
    return getattr(module(name), "SUPPORT", {}).get(op)


def refusal(
    name: str,
    op: str,
    device: torch.device,
    dtypes: Iterable[torch.dtype],
    dim: int | None = None,
    contiguous: bool = True,
    mode: str | None = None,
) -> str | None:
    """Why concrete backend ``name`` cannot serve this call of ``op``, or None when it can."""
    reason = unavailable_reason(name)
    if reason is not None:
        return f"it is not available in this installation ({reason})"
    declared = support(name, op)
    if declared is None:
        return f"it does not implement {op}"
    return declared.refusal(device, tuple(dtypes), dim, contiguous, mode)


def select(
    op: str,
    backend: str,
    device: torch.device,
    dtypes: Iterable[torch.dtype],
    dim: int | None = None,
    *,
    contiguous: bool = True,
    mode: str | None = None,
) -> str:
    """The concrete backend that runs this call of ``op`` (see the module docstring for the rule).

    ``backend`` is the user's argument ("auto" or a name, any case). Raises ValueError for an unknown
    name (or a bad ``MOCO_FAST_BACKEND``) and :class:`BackendError` when the requested backend (or,
    for "auto", every candidate) cannot serve the call. Decisions are cached (a call costs ~1 µs).
    """
    name = check_name(backend)
    if name == "auto":
        name = check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)
    return _select(op, name, device, tuple(dtypes), dim, contiguous, mode)


# torch.compile: the choice depends only on Python values (names, device, dtypes, sizes), so the tracer
# runs it once and bakes the answer into the graph instead of tracing importlib. This is what
# torch.compiler.assume_constant_result does, set directly: the public decorator imports torch._dynamo,
# which would add ~3 s to `import moco_fast` (tests/test_compile.py proves fullgraph compiles).
select._dynamo_marked_constant = True


@functools.lru_cache(maxsize=4096)
def _select(op, name, device, dtypes, dim, contiguous, mode) -> str:
    if name != "auto":
        why = refusal(name, op, device, dtypes, dim, contiguous, mode)
        if why is not None:
            raise BackendError(f"backend {name!r} cannot run {op} here: {why}")
        return name
    reasons = []
    for candidate in AUTO_ORDER.get(device.type, AUTO_ORDER_DEFAULT):
        why = refusal(candidate, op, device, dtypes, dim, contiguous, mode)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise BackendError(f"no backend can run {op} here ({'; '.join(reasons)})")
