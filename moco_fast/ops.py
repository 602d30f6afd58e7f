"""Functional ops: input checks, torch.library registration and autograd.

``info_nce`` is one custom op (``moco_fast::info_nce_forward``) whose backward is another
(``moco_fast::info_nce_backward`` and, only when the negatives require grad,
``moco_fast::info_nce_backward_negatives``). The op's ``impl`` argument names the concrete backend
("torch" | "triton" | "cuda"), chosen by ``moco_fast.backends.resolve`` before the call, so
torch.compile and opcheck see one op whatever runs inside. The "reference" backend bypasses the ops
and runs the naive PyTorch code under ordinary autograd.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import backends
from .chunked import compute_dtype
from .reference import reference_info_nce

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")


class InfoNCEStats(NamedTuple):
    """Instance-discrimination statistics computed without logits.

    acc1, acc5: 0-dim fp32 tensors, the fraction of rows whose positive is the top-1 / in the top-5
    of its K+1 logits (``rank < 1`` / ``rank < 5``). rank: (B,) int64, negatives beating the
    positive. lse: (B,) fp32 logsumexp of each row's logits.
    """

    acc1: Tensor
    acc5: Tensor
    rank: Tensor
    lse: Tensor


# ----------------------------------------------------------------------------------------------
# Input checks (shared by the ops, the queue and the head)
# ----------------------------------------------------------------------------------------------


def check_matrix(x: object, name: str, dim: int | None = None) -> Tensor:
    """A 2-D floating tensor (with ``dim`` columns if given), else a TypeError/ValueError naming it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dim {x.shape[1]} but {dim} was expected, shape {tuple(x.shape)}")
    return x


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a number, got a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return float(temperature)


def _check_info_nce_inputs(q: Tensor, k: Tensor, negatives: Tensor) -> None:
    check_matrix(q, "q")
    check_matrix(k, "k")
    check_matrix(negatives, "negatives")
    if q.shape[0] == 0:
        raise ValueError("q is an empty batch (0 rows)")
    if k.shape != q.shape:
        raise ValueError(f"k must have the shape of q {tuple(q.shape)}, got {tuple(k.shape)}")
    if negatives.shape[1] != q.shape[1]:
        raise ValueError(f"negatives have dim {negatives.shape[1]} but q has dim {q.shape[1]}")
    for name, t in (("k", k), ("negatives", negatives)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; put all inputs on one device")


# ----------------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------------


def _forward_impl(q: Tensor, k: Tensor, negatives: Tensor, scale: float, impl: str, need_rank: bool):
    return backends.implementation(impl).infonce_forward(q, k, negatives, scale, need_rank=need_rank)


@torch.library.custom_op("moco_fast::info_nce_forward", mutates_args=())
def info_nce_forward(
    q: Tensor, k: Tensor, negatives: Tensor, scale: float, impl: str, need_rank: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row loss (B,), lse (B,), O (B, d) and rank (B,) int64 of InfoNCE; see moco_fast.backends.

    With ``need_rank=False`` a backend may skip the rank and return -1s.
    """
    return _forward_impl(q.contiguous(), k.contiguous(), negatives.contiguous(), scale, impl, need_rank)


@info_nce_forward.register_fake
def _(q, k, negatives, scale, impl, need_rank=True):
    ct = compute_dtype(q, k, negatives)
    rows = q.shape[0]
    return (
        q.new_empty((rows,), dtype=ct),
        q.new_empty((rows,), dtype=ct),
        q.new_empty((rows, q.shape[1]), dtype=ct),
        q.new_empty((rows,), dtype=torch.int64),
    )


@torch.library.custom_op("moco_fast::info_nce_backward", mutates_args=())
def info_nce_backward(
    grad: Tensor, q: Tensor, k: Tensor, lse: Tensor, out: Tensor, scale: float, impl: str
) -> tuple[Tensor, Tensor]:
    """(dq, dk) from the saved lse and O: dq = g/T·(O − k), dk = g/T·(p0 − 1)·q."""
    return backends.implementation(impl).infonce_backward(
        grad.contiguous(), q.contiguous(), k.contiguous(), lse, out, scale
    )


@info_nce_backward.register_fake
def _(grad, q, k, lse, out, scale, impl):
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.custom_op("moco_fast::info_nce_backward_negatives", mutates_args=())
def info_nce_backward_negatives(
    grad: Tensor, q: Tensor, negatives: Tensor, lse: Tensor, scale: float, impl: str
) -> Tensor:
    """dn (K, d): recomputes the logits blockwise; only runs when the negatives require grad."""
    module = backends.implementation(impl)
    return module.infonce_backward_negatives(grad.contiguous(), q.contiguous(), negatives.contiguous(), lse, scale)


@info_nce_backward_negatives.register_fake
def _(grad, q, negatives, lse, scale, impl):
    return torch.empty_like(negatives)


def _setup_context(ctx, inputs, output):
    q, k, negatives, scale, impl, _ = inputs
    _, lse, out, rank = output
    ctx.scale, ctx.impl = scale, impl
    ctx.negatives_need_grad = negatives.requires_grad
    # The negatives are saved only when they need a gradient: the fast path never reads them again,
    # so the queue may be overwritten right after the forward.
    ctx.save_for_backward(q, k, lse, out, negatives if negatives.requires_grad else None)
    ctx.mark_non_differentiable(lse, out, rank)


def _backward(ctx, grad_loss, grad_lse, grad_out, grad_rank):
    q, k, lse, out, negatives = ctx.saved_tensors
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    dq, dk = info_nce_backward(grad_loss, q, k, lse, out, ctx.scale, ctx.impl)
    dn = None
    if ctx.negatives_need_grad:
        dn = info_nce_backward_negatives(grad_loss, q, negatives, lse, ctx.scale, ctx.impl)
    return dq, dk, dn, None, None, None


info_nce_forward.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _kernel_impl(backend: str, *tensors: Tensor) -> str:
    impl = backends.resolve(backend, tensors[0].device)
    if impl in ("triton", "cuda"):
        for t in tensors:
            if t.dtype not in _KERNEL_DTYPES:
                raise TypeError(f"backend {impl!r} supports float32, bfloat16 and float16 inputs, got {t.dtype}")
    return impl


def info_nce(
    q: Tensor,
    k: Tensor,
    negatives: Tensor,
    temperature: float = 0.07,
    *,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
):
    """InfoNCE of each query against its positive key and a shared set of negatives.

    Row i's logits are [q_i·k_i, q_i·n_0, …, q_i·n_{K−1}] / temperature with target index 0, and
    loss_i = logsumexp(row_i) − row_i[0]. Inputs are used as given (normalize them first).
    The B×(K+1) logits are never materialized (except by backend="reference").

    Args:
        q: (B, d) queries, fp32/bf16/fp16 (fp64 on the "torch"/"reference" backends).
        k: (B, d) positive keys, any of those dtypes.
        negatives: (K, d) negative keys (K may be 0); usually a queue without grad.
        temperature: T > 0.
        reduction: "mean" | "sum" | "none" (per-row (B,) losses).
        backend: "auto" | "cuda" | "triton" | "torch" | "reference" (env MOCO_FAST_BACKEND overrides "auto").
        return_stats: also return an :class:`InfoNCEStats` (acc@1, acc@5, rank, lse).

    Returns:
        The fp32 loss (fp64 for fp64 inputs), or ``(loss, stats)`` when ``return_stats``.
    """
    _check_info_nce_inputs(q, k, negatives)
    temperature = check_temperature(temperature)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}; got {reduction!r}")
    impl = _kernel_impl(backend, q, k, negatives)
    if impl == "reference":
        # Like the official code's `queue.clone().detach()`: the queue may change before backward.
        frozen = negatives if negatives.requires_grad else negatives.detach().clone()
        loss, lse, rank = reference_info_nce(q, k, frozen, temperature, reduction="none")
    else:
        loss, lse, _, rank = info_nce_forward(q, k, negatives, 1.0 / temperature, impl, return_stats)
    loss = _reduce(loss, reduction)
    if not return_stats:
        return loss
    return loss, stats_from_rank(rank, lse)


def stats_from_rank(rank: Tensor, lse: Tensor) -> InfoNCEStats:
    """acc@1 and acc@5 from the positive's rank (no logits needed)."""
    return InfoNCEStats(acc1=(rank < 1).float().mean(), acc5=(rank < 5).float().mean(), rank=rank, lse=lse.detach())


def _as_tensor_list(x: torch.nn.Module | Iterable[Tensor], name: str) -> list[Tensor]:
    if isinstance(x, torch.nn.Module):
        return [p.data for p in x.parameters()]
    if isinstance(x, Tensor):
        raise TypeError(f"{name} must be an nn.Module or a sequence of tensors, got a single tensor")
    try:
        tensors = [t.data if isinstance(t, torch.nn.Parameter) else t for t in x]
    except TypeError:
        raise TypeError(f"{name} must be an nn.Module or a sequence of tensors, got {type(x).__name__}") from None
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return tensors


def check_momentum(momentum: object) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a number in [0, 1], got {type(momentum).__name__}")
    if not (0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    return float(momentum)


def group_pairs(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> dict[tuple, tuple[list[Tensor], list[Tensor]]]:
    """Check target/source pairs and group them by (device, dtype, contiguity) for one launch per group."""
    if len(targets) != len(sources):
        raise ValueError(f"target has {len(targets)} tensors but source has {len(sources)}")
    groups: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
    for i, (t, s) in enumerate(zip(targets, sources)):
        if t.shape != s.shape:
            raise ValueError(f"target[{i}] has shape {tuple(t.shape)} but source[{i}] has {tuple(s.shape)}")
        if t.device != s.device:
            raise ValueError(f"target[{i}] is on {t.device} but source[{i}] is on {s.device}")
        if not t.is_floating_point() or not s.is_floating_point():
            raise TypeError(f"target[{i}] and source[{i}] must be floating tensors, got {t.dtype} and {s.dtype}")
        if t.dtype != s.dtype:
            raise TypeError(f"target[{i}] is {t.dtype} but source[{i}] is {s.dtype}")
        key = (t.device, t.dtype, t.is_contiguous() and s.is_contiguous())
        groups.setdefault(key, ([], []))
        groups[key][0].append(t)
        groups[key][1].append(s)
    return groups


@torch.no_grad()
def momentum_update(
    target: torch.nn.Module | Sequence[Tensor],
    source: torch.nn.Module | Sequence[Tensor],
    momentum: float,
    *,
    backend: str = "auto",
) -> None:
    """In place: target ← momentum·target + (1 − momentum)·source, for every parameter pair.

    ``target`` and ``source`` are two nn.Modules (their parameters, in order; buffers are left alone,
    as in MoCo) or two matching sequences of tensors. Everything is checked before anything is
    written, and each (device, dtype) group is updated by one fused call.
    """
    momentum = check_momentum(momentum)
    targets = _as_tensor_list(target, "target")
    sources = _as_tensor_list(source, "source")
    groups = group_pairs(targets, sources)
    plans = []
    for (device, dtype, contiguous), pair in groups.items():
        impl = backends.resolve(backend, device)
        if impl == "reference" or not contiguous or dtype not in _KERNEL_DTYPES:
            impl = "torch"  # the kernels take contiguous fp32/bf16/fp16 tensors
        plans.append((impl, pair))
    for impl, (tgt, src) in plans:
        backends.implementation(impl).momentum_update_(tgt, src, momentum)
