"""The momentum (EMA) key encoder: θk ← m·θk + (1 − m)·θq, with momentum schedules.

``MomentumEncoder`` owns a deep copy of the online network. The copy's parameters are views into
one flat buffer per (device, dtype), so ``update()`` is one fused call per group (the official
code issues about two kernel launches per parameter). The online model is only read, never changed.
Buffers (BatchNorm statistics) stay the key encoder's own, as in MoCo.

``update()`` validates the parameter pairs and picks the backends once, then reuses that plan for
as long as the online model's parameters are the same tensors: no parameter or submodule has been
registered anywhere since (a global registration hook counts them) and every parameter still has its
address (``p.data = ...`` and ``.to()`` move it). The per-step host cost is then ~10 µs plus one fused
call per group.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .functional import MomentumStep, momentum_plan, run_momentum_plan
from .validation import check_momentum

SCHEDULES = (None, "constant", "cosine")

# Bumped whenever any module registers a parameter or a submodule (``m.fc = nn.Linear(...)``,
# ``m.weight = nn.Parameter(...)``): a cached update plan is only reused while this has not moved.
_registrations = 0


def _count_registration(*args) -> None:
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def cosine_momentum(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """MoCo v3 / BYOL schedule: ``final − (final − base)·(cos(π·t/T) + 1)/2``; base at t=0, final at t ≥ T."""
    t = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * t / total_steps) + 1.0) / 2.0


class MomentumEncoder(nn.Module):
    """A momentum-updated copy of ``online`` whose forward runs under ``torch.no_grad()``.

    Args:
        online: the query encoder (any nn.Module); deep-copied once, then only read.
        momentum: m at step 0 (0.999 in MoCo v1/v2; 0.99 in MoCo v3).
        schedule: None/"constant" (m fixed) or "cosine" (m → ``final_momentum`` over ``total_steps``).
        final_momentum: the cosine schedule's end value.
        total_steps: number of update() calls of the schedule (required for "cosine").
        exact: use the official two-rounding ``θk·m + θq·(1 − m)`` bit for bit (the "torch" and
            "reference" backends only) instead of the default one-pass lerp ``θk + (1 − m)·(θq − θk)``,
            which differs from it only in the last bit.
        backend: implementation of the update ("auto" | "cuda" | "triton" | "torch" | "reference").

    ``update()`` applies one EMA step with the current momentum and advances the step counter; the
    step is part of the state_dict (extra state), so a resumed run continues the schedule.
    """

    def __init__(
        self,
        online: nn.Module,
        momentum: float = 0.999,
        schedule: str | None = None,
        final_momentum: float = 1.0,
        total_steps: int | None = None,
        *,
        exact: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(online, nn.Module):
            raise TypeError(f"online must be an nn.Module, got {type(online).__name__}")
        self.base_momentum = check_momentum(momentum)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be None, 'constant' or 'cosine', got {schedule!r}")
        self.final_momentum = check_momentum(final_momentum)
        if schedule == "cosine" and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1
        ):
            raise ValueError(f"schedule='cosine' needs total_steps, a positive int; got {total_steps!r}")
        self.schedule = schedule
        self.total_steps = total_steps
        self.exact = bool(exact)
        self.backend = backend
        self.step = 0
        # The online model is kept outside the module tree so it is not saved or moved twice.
        self._online = [online]
        self.module = copy.deepcopy(online)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._flat: list[torch.Tensor] = []
        self._flatten()
        # The cached update plan and what it was built for: (online module, its parameters, their addresses).
        self._plan: list[MomentumStep] | None = None
        self._plan_key: tuple | None = None

    @property
    def online(self) -> nn.Module:
        return self._online[0]

    def _flatten(self) -> None:
        """Make each parameter of the copy a view into one flat buffer per (device, dtype)."""
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in self.module.parameters():
            groups.setdefault((p.device, p.dtype), []).append(p)
        self._flat = []
        for (device, dtype), params in groups.items():
            flat = torch.empty(sum(p.numel() for p in params), device=device, dtype=dtype)
            offset = 0
            for p in params:
                n = p.numel()
                flat[offset : offset + n].copy_(p.data.reshape(-1))
                p.data = flat[offset : offset + n].view_as(p)
                offset += n
            self._flat.append(flat)
        self._plan = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._flatten()  # .to()/.cuda()/.half() give the parameters new storage: flatten it again
        return out

    @property
    def momentum(self) -> float:
        """The momentum the next update() uses."""
        if self.schedule == "cosine":
            return cosine_momentum(self.step, self.total_steps, self.base_momentum, self.final_momentum)
        return self.base_momentum

    def _update_plan(self, online: nn.Module) -> list[MomentumStep]:
        """The validated plan for ``online``, rebuilt only when its parameter tensors changed."""
        key = self._plan_key
        if self._plan is not None and key[0] is online and key[1] == _registrations:
            if tuple(p.data_ptr() for p in key[2]) == key[3]:
                return self._plan
        params = list(online.parameters())
        targets = [p.data for p in self.module.parameters()]
        self._plan = momentum_plan(targets, [p.data for p in params], self.backend, self.exact)
        self._plan_key = (online, _registrations, params, tuple(p.data_ptr() for p in params))
        return self._plan

    @torch.no_grad()
    def update(self, online: nn.Module | None = None) -> float:
        """One EMA step from ``online`` (default: the model given at construction); returns the m used.

        Replaced or moved parameters are noticed and the plan rebuilt (see the module docstring);
        only a parameter deleted (``del m.weight``) is not: call :meth:`refresh` after that.
        """
        m = self.momentum
        run_momentum_plan(self._update_plan(self.online if online is None else online), m, self.exact)
        self.step += 1
        return m

    def refresh(self) -> None:
        """Forget the cached update plan (after deleting parameters of the online model)."""
        self._plan = None

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def get_extra_state(self):
        return {"step": self.step}

    def set_extra_state(self, state) -> None:
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return f"momentum={self.base_momentum}, schedule={self.schedule!r}, exact={self.exact}, step={self.step}"
