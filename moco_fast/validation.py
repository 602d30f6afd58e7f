"""Input checks and dtype rules shared by every op, the queue, the heads and the encoders.

Every public entry point validates here before any work is done, so a bad call raises a
TypeError/ValueError that names the argument and changes no state. Nothing in this module depends
on a backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: The storage/compute dtypes of the fused kernels (float64 runs on the "torch" and "reference" backends).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The accumulation dtype of an op: fp32, or fp64 when an input is fp64 (gradcheck)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_positive_int(value: object, name: str) -> int:
    """A positive Python int (not a bool), else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_matrix(x: object, name: str, dim: int | None = None) -> Tensor:
    """A 2-D floating tensor (with ``dim`` columns if given), else a TypeError/ValueError naming it."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dim {x.shape[1]} but {dim} was expected, shape {tuple(x.shape)}")
    return x


def check_nonempty(x: Tensor, name: str) -> Tensor:
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (0 rows)")
    return x


def check_same_shape(x: Tensor, name: str, like: Tensor, like_name: str) -> None:
    if x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(x.shape)}")


def check_same_device(reference: tuple[str, Tensor], *others: tuple[str, Tensor]) -> None:
    """Every tensor on the device of the first: else a ValueError naming both."""
    ref_name, ref = reference
    for name, t in others:
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put all inputs on one device")


def check_temperature(temperature: object, name: str = "temperature") -> float:
    """A positive, finite number (a 1-element tensor is accepted) as a Python float."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(temperature.shape)}")
        temperature = float(temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"{name} must be positive and finite, got {temperature}")
    return float(temperature)


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    return reduction


def reduce(loss: Tensor, reduction: str) -> Tensor:
    """Apply a checked reduction ("mean" | "sum" | "none") to per-row losses."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def check_momentum(momentum: object, name: str = "momentum") -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1], got {type(momentum).__name__}")
    if not (0.0 <= momentum <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {momentum}")
    return float(momentum)


def as_tensor_list(x: torch.nn.Module | Iterable[Tensor], name: str) -> list[Tensor]:
    """The parameters of a module (``.data``, no autograd), or a sequence of tensors, as a list."""
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


def group_pairs(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> dict[tuple, tuple[list[Tensor], list[Tensor]]]:
    """Check target/source pairs; group them by (device, dtype, both contiguous), in order.

    Raises ValueError/TypeError naming the first bad pair: different counts, shapes, devices or
    dtypes, or a non-floating tensor.
    """
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
        group = groups.setdefault(key, ([], []))
        group[0].append(t)
        group[1].append(s)
    return groups


# --- NT-Xent / MoCo v3 / CMC / memory bank

INDEX_DTYPES = (torch.int64, torch.int32)


def check_indices(indices: object, name: str, upper: int, like: Tensor, like_name: str, lower: int = 0) -> Tensor:
    """Row indices for ``like`` (B rows): a 1-D int64/int32 tensor of B values in [lower, upper) on like's device.

    Returns them as int64. The range check reads the tensor on the host (a sync on a GPU). Raises
    TypeError/ValueError naming ``name``.
    """
    if not isinstance(indices, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 sample indices, got {type(indices).__name__}")
    if indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must be 1-D with one index per row of {like_name} ({like.shape[0]}), "
            f"got shape {tuple(indices.shape)}"
        )
    if indices.device != like.device:
        raise ValueError(f"{name} is on {indices.device} but {like_name} is on {like.device}; put them on one device")
    if indices.numel():
        low, high = (int(v) for v in torch.aminmax(indices))
        if low < lower or high >= upper:
            bad = low if low < lower else high
            raise ValueError(f"{name} must be in [{lower}, {upper}), got {bad}")
    return indices.long()


# --- BYOL / SwAV / DINO


def check_view_list(views: object, name: str, dim: int | None = None, allow_empty: bool = False) -> list[Tensor]:
    """A list/tuple of non-empty 2-D floating tensors, one per view (``dim`` columns if given), else an error."""
    if isinstance(views, Tensor) or not isinstance(views, (list, tuple)):
        raise TypeError(f"{name} must be a list of 2-D tensors, one per view; got {type(views).__name__}")
    views = list(views)
    if not views and not allow_empty:
        raise ValueError(f"{name} is an empty list: give at least one view")
    for i, v in enumerate(views):
        check_matrix(v, f"{name}[{i}]", dim)
        check_nonempty(v, f"{name}[{i}]")
    return views
