"""DINO: the projection head and the loss, with the teacher center.

* :class:`DINOHead` — lightly's ``DINOProjectionHead`` (same arguments): a 3-layer MLP with GELU to a
  bottleneck, L2-normalization, and a weight-normalized bias-free last layer of ``output_dim``
  prototypes (g fixed to 1 unless ``norm_last_layer=False``). ``head(x)`` gives the logits, as lightly;
  :meth:`DINOHead.bottleneck` gives the normalized bottleneck h and :attr:`DINOHead.prototypes` the
  *effective* last-layer weight W = g·V/‖V‖ (P, b), so that ``head(x) == h @ W.T`` — what the fused
  :func:`moco_fast.dino_loss` takes instead of the logits.
* :class:`DINOLoss` — lightly's ``DINOLoss`` (same arguments, ``forward(teacher_out, student_out,
  teacher_temp=None, epoch=None)``, a ``center`` buffer of shape (1, 1, P)): the same loss, gradients and
  center update, in fp32 whatever the logits' dtype and with each row's cross entropy summed on its own
  (lightly's single (T, S) einsum over B·P products drifts by ~3e-4 relative at B = 128, P = 8192).
  :meth:`DINOLoss.forward_fused` takes the bottleneck features and the prototypes instead and never forms
  the (B, P) logits; its center update uses mean(t) = mean(h_t)·W_tᵀ.

The center. c ← m·c + (1 − m)·mean(teacher logits) after each loss, mean over the teacher views and the
batch; under torch.distributed the batch mean is averaged over the ranks (an all_reduce of P values, or of
b values for the fused path). A non-finite teacher output never enters the center: the update is refused
on the device (the center stays) and — as for :class:`moco_fast.KeyQueue` — ``on_nonfinite="raise"``
raises :class:`NonFiniteTeacherError` at once on the CPU and, on a GPU, from the next call once the
device's flag has been copied back (no host sync per step; :meth:`DINOLoss.check` forces it);
``on_nonfinite="skip"`` only counts refusals in ``num_skipped``.

Gradient accumulation, exactly. Inside ``with loss_fn.accumulate():`` the center stays as it was when the
block began (every micro-batch is centered and sharpened alike) and each call only adds its teacher
outputs' sum (fp64, P values) to the step's; when the block ends the center moves ONCE, from the mean over
all micro-batches' teacher rows (plain and fused calls alike), all-reduced once under torch.distributed —
what one large batch does. The non-finite policy then applies to the whole step. An exception inside the
block leaves the center unchanged; blocks do not nest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import queue as _queue
from .distributed import is_distributed
from .functional import dino_loss
from .validation import check_momentum, check_positive_int, check_temperature, check_view_list

__all__ = ["DINOHead", "DINOLoss", "NonFiniteTeacherError"]


class NonFiniteTeacherError(ValueError):
    """The teacher output of a DINOLoss call had NaN/Inf values; the center was not updated."""


# ------------------------------------------------------------------------------------------------
# Head
# ------------------------------------------------------------------------------------------------


class WeightNormLinear(nn.Module):
    """A bias-free linear layer with weight W = g·V/‖V‖ per output row (``nn.utils.weight_norm``, dim 0).

    Parameters ``weight_v`` (out, in) and ``weight_g`` (out, 1) — the names and shapes lightly's weight-normed
    layer has in its state_dict — but plain parameters, so the module deep-copies (a momentum teacher).
    ``g`` is fixed to 1 (no gradient) when ``norm=True``.
    """

    def __init__(self, in_features: int, out_features: int, norm: bool = True):
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)  # torch's default init of V
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not norm)

    @property
    def weight(self) -> Tensor:
        """The effective weight (out, in), differentiable in V (and g)."""
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.02, a=-2.0, b=2.0)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DINOHead(nn.Module):
    """DINO's projection head (lightly's ``DINOProjectionHead`` arguments).

    Args:
        input_dim, hidden_dim, bottleneck_dim, output_dim: MLP input → hidden → hidden → bottleneck b, then
            P = output_dim prototypes (2048, 2048, 256, 65536 in DINO).
        batch_norm: BatchNorm1d after the hidden layers (for CNN backbones).
        freeze_last_layer: the last layer gets no update in epochs < this value (lightly: by
            :meth:`cancel_last_layer_gradients` after backward; or pass ``frozen=True`` to
            :meth:`effective_weight`).
        norm_last_layer: fix g = 1 (the prototypes stay unit rows).

    ``forward(x)`` → logits (B, P) = ``bottleneck(x) @ prototypes.T``.
    """

    def __init__(
        self,
        input_dim: int = 2048,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        output_dim: int = 65536,
        batch_norm: bool = False,
        freeze_last_layer: int = -1,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        for name, v in (
            ("input_dim", input_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("output_dim", output_dim),
        ):
            check_positive_int(v, name)

        def bn(n):
            return [nn.BatchNorm1d(n)] if batch_norm else []

        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            *bn(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            *bn(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.layers.apply(_trunc_normal_init)
        self.last_layer = WeightNormLinear(bottleneck_dim, output_dim, norm=norm_last_layer)
        self.freeze_last_layer = int(freeze_last_layer)

    def bottleneck(self, x: Tensor) -> Tensor:
        """The L2-normalized bottleneck features h (B, b) — the rows the fused loss takes."""
        return F.normalize(self.layers(x), dim=-1, p=2)

    @property
    def prototypes(self) -> Tensor:
        """The effective last-layer weight W = g·V/‖V‖ (P, b): ``forward(x) == bottleneck(x) @ W.T``."""
        return self.last_layer.weight

    def effective_weight(self, frozen: bool = False) -> Tensor:
        """:attr:`prototypes`; when ``frozen`` (the first epochs of ``freeze_last_layer``) with an exact zero
        gradient — still in the graph, so DDP sees no unused parameter; weight decay then only rescales V,
        which leaves W = V/‖V‖ unchanged."""
        w = self.last_layer.weight
        return w.detach() + w * 0.0 if frozen else w

    def last_layer_frozen(self, epoch: int) -> bool:
        return epoch < self.freeze_last_layer

    def cancel_last_layer_gradients(self, current_epoch: int) -> None:
        """lightly's hook: drop the last layer's gradients (call after backward) in the frozen epochs."""
        if self.last_layer_frozen(current_epoch):
            for p in self.last_layer.parameters():
                p.grad = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.bottleneck(x), self.prototypes)


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    """DINO's loss with centering and sharpening of the teacher (lightly's ``DINOLoss``).

    Args:
        output_dim: P, the number of prototypes (the logits' width).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: T_t rises linearly from the first
            to the second over the warm-up epochs (``forward(..., epoch=e)``), then stays (lightly's
            ``torch.linspace`` schedule).
        student_temp: T_s.
        center_momentum: m of the center's moving average.
        on_nonfinite: "raise" (default) or "skip" — what a non-finite teacher output does (module docstring).
        backend: the fused path's backend ("auto" | "triton" | "torch" | "reference").

    Buffers: ``center`` (1, 1, P) fp32, ``num_skipped`` (1,) int64 (refused center updates).

    The loss is a mean over the batch rows: micro-batches of sizes B_i inside :meth:`accumulate`, each loss
    weighted by B_i / ΣB_j (1/N for N equal ones), give the loss, gradients and center of one batch of ΣB_j.
    """

    def __init__(
        self,
        output_dim: int = 65536,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        *,
        on_nonfinite: str = "raise",
        backend: str = "auto",
    ):
        super().__init__()
        self.output_dim = check_positive_int(output_dim, "output_dim")
        self.warmup_teacher_temp = check_temperature(warmup_teacher_temp, "warmup_teacher_temp")
        self.teacher_temp = check_temperature(teacher_temp, "teacher_temp")
        self.student_temp = check_temperature(student_temp, "student_temp")
        self.center_momentum = check_momentum(center_momentum, "center_momentum")
        if isinstance(warmup_teacher_temp_epochs, bool) or not isinstance(warmup_teacher_temp_epochs, int):
            raise ValueError(f"warmup_teacher_temp_epochs must be an int >= 0, got {warmup_teacher_temp_epochs!r}")
        if warmup_teacher_temp_epochs < 0:
            raise ValueError(f"warmup_teacher_temp_epochs must be >= 0, got {warmup_teacher_temp_epochs}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        from . import backends

        self.backend = backends.check_name(backend)
        self.on_nonfinite = on_nonfinite
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        # lightly's schedule, value for value (fp32 linspace)
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.register_buffer("num_skipped", torch.zeros(1, dtype=torch.int64))
        self._watcher: _queue._RefusalWatcher | None = None
        self._calls = 0
        self._refusals_seen = 0
        # Inside accumulate(): [sum of the step's teacher rows (P,) fp64, their number].
        self._pending: list | None = None

    # -------------------------------------------------------------- temperature

    def teacher_temperature(self, teacher_temp: float | None = None, epoch: int | None = None) -> float:
        """T_t for this call: ``teacher_temp`` if given, else the warm-up schedule at ``epoch``, else T_t."""
        if teacher_temp is not None:
            return check_temperature(teacher_temp, "teacher_temp")
        if epoch is not None:
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
            if epoch < self.warmup_teacher_temp_epochs:
                return float(self.teacher_temp_schedule[epoch])
        return self.teacher_temp

    # -------------------------------------------------------------- losses

    def forward(
        self,
        teacher_out: Sequence[Tensor],
        student_out: Sequence[Tensor],
        teacher_temp: float | None = None,
        epoch: int | None = None,
    ) -> Tensor:
        """lightly's DINOLoss.forward: teacher_out (T views of (B, P) logits, no gradient), student_out
        (S views of (B, P) logits, global crops first); returns the fp32 scalar and updates the center."""
        teacher = check_view_list(teacher_out, "teacher_out", self.output_dim)
        student = check_view_list(student_out, "student_out", self.output_dim)
        for name, views in (("teacher_out", teacher), ("student_out", student)):
            for i, v in enumerate(views):
                if v.shape != teacher[0].shape:
                    raise ValueError(
                        f"{name}[{i}] has shape {tuple(v.shape)}, teacher_out[0] {tuple(teacher[0].shape)}"
                    )
                if v.device != self.center.device:
                    raise ValueError(f"{name}[{i}] is on {v.device} but the center is on {self.center.device}")
        pairs = len(teacher) * len(student) - min(len(teacher), len(student))
        if pairs == 0:
            raise ValueError(
                f"DINOLoss needs at least two views in total: {len(teacher)} teacher and {len(student)} student "
                "view(s) leave no pair of different views"
            )
        temp = self.teacher_temperature(teacher_temp, epoch)
        self._raise_landed_refusal()
        ct = torch.float64 if any(v.dtype == torch.float64 for v in teacher + student) else torch.float32
        t_stack = torch.stack([v.detach().to(ct) for v in teacher])  # (T, B, P)
        t_probs = F.softmax((t_stack - self.center.to(ct)) / temp, dim=-1)
        s_logp = F.log_softmax(torch.stack([v.to(ct) for v in student]) / self.student_temp, dim=-1)
        # Per (pair, row) dot products over P, then the sum: lightly's one einsum to (T, S) accumulates B·P
        # products per entry in fp32 (3e-4 relative error at B = 128, P = 8192; this form: 2e-7).
        cross = -torch.einsum("tbd,sbd->tsb", t_probs, s_logp)
        diag = torch.eye(len(teacher), len(student), dtype=torch.bool, device=cross.device)
        loss = cross.masked_fill(diag[:, :, None], 0).sum() / (pairs * t_stack.shape[1])
        with torch.no_grad():
            self._center_step(t_stack.mean(dim=(0, 1)), t_stack.shape[0] * t_stack.shape[1])
        return loss

    def forward_fused(
        self,
        teacher_features: Sequence[Tensor],
        student_features: Sequence[Tensor],
        prototypes: Tensor,
        teacher_prototypes: Tensor | None = None,
        teacher_temp: float | None = None,
        epoch: int | None = None,
    ) -> Tensor:
        """The same loss and center update from bottleneck features, without the (B, P) logits.

        teacher_features: T views of (B, b) teacher bottleneck features; student_features: S views of (B, b);
        prototypes: (P, b) the student's effective last-layer weight (:attr:`DINOHead.prototypes`);
        teacher_prototypes: the teacher's (default: ``prototypes``, detached). See :func:`moco_fast.dino_loss`.
        """
        if not isinstance(prototypes, Tensor) or prototypes.dim() != 2 or prototypes.shape[0] != self.output_dim:
            shape = tuple(prototypes.shape) if isinstance(prototypes, Tensor) else type(prototypes).__name__
            raise ValueError(f"prototypes must be ({self.output_dim}, b) (output_dim rows), got {shape}")
        temp = self.teacher_temperature(teacher_temp, epoch)
        self._raise_landed_refusal()
        loss = dino_loss(
            student_features,
            teacher_features,
            prototypes,
            self.center,
            teacher_prototypes=teacher_prototypes,
            student_temp=self.student_temp,
            teacher_temp=temp,
            backend=self.backend,
        )
        w_t = (prototypes if teacher_prototypes is None else teacher_prototypes).detach()
        with torch.no_grad():
            ct = torch.float64 if w_t.dtype == torch.float64 else torch.float32
            mean = torch.stack([v.detach().to(ct).mean(dim=0) for v in teacher_features]).mean(dim=0)  # (b,)
            # mean(h_t)·W_tᵀ = the mean of the teacher logits; all-reduced as b values instead of P
            rows = len(teacher_features) * teacher_features[0].shape[0]
            self._center_step(mean, rows, project=w_t.to(ct))
        return loss

    # -------------------------------------------------------------- center

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """lightly's update from stacked teacher logits (views, B, P): c ← m·c + (1 − m)·mean (all ranks)."""
        dims = tuple(range(teacher_out.dim() - 1))
        self._center_step(teacher_out.float().mean(dim=dims), teacher_out[..., 0].numel())

    @contextlib.contextmanager
    def accumulate(self):
        """One optimizer step of micro-batches: the center is fixed inside the block and moves once when it
        ends, from the mean over every micro-batch's teacher rows (all-reduced once under torch.distributed),
        exactly as for one large batch. Nothing changes if the block raises; blocks do not nest. A refused
        update (NaN/Inf in any micro-batch) raises from the ``with`` statement (``on_nonfinite="raise"``)."""
        if self._pending is not None:
            raise RuntimeError("DINOLoss.accumulate() blocks do not nest")
        self._pending = [None, 0]
        try:
            yield self
            total, rows = self._pending
        finally:
            self._pending = None
        if rows:
            with torch.no_grad():
                mean = total / rows
                if is_distributed():
                    dist.all_reduce(mean)
                    mean /= dist.get_world_size()
                self._update_center(mean.float())

    @torch.no_grad()
    def _center_step(self, mean: Tensor, rows: int, project: Tensor | None = None) -> None:
        """This call's share of the center update: ``mean`` (P,) of its ``rows`` teacher rows — or, with
        ``project`` = W_t (P, b), the (b,) mean bottleneck whose logits are ``project @ mean``. Outside
        accumulate(): all-reduce the mean (b values when projected), then move the center; inside: add the
        rows' sum to the step's."""
        if self._pending is not None:
            total = (mean if project is None else project @ mean).double() * rows
            self._pending = [total if self._pending[0] is None else self._pending[0] + total, self._pending[1] + rows]
            return
        if is_distributed():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self._update_center((mean if project is None else project @ mean).float())

    @torch.no_grad()
    def _update_center(self, batch_center: Tensor) -> None:
        """Apply the moving average unless batch_center (P,) has a NaN/Inf: then refuse (and raise or count)."""
        self._calls += 1
        ok = torch.isfinite(batch_center).all()
        m = self.center_momentum
        new = self.center * m + batch_center.reshape(self.center.shape).to(self.center.dtype) * (1 - m)
        if _queue._reads_are_free(ok):
            if bool(ok):
                self.center.copy_(new)
            elif self.on_nonfinite == "raise":
                raise self._refusal_error(f"#{self._calls}")
            else:
                self.num_skipped += 1
            return
        # A GPU: no host read. Keep the old center where refused, count it, copy the count back async.
        self.center.copy_(torch.where(ok, new, self.center))
        self.num_skipped.add_(ok.logical_not())
        if self.on_nonfinite == "raise":
            if self._watcher is None:
                self._watcher = _queue._RefusalWatcher(self.num_skipped)
            self._watcher.after_call(self.num_skipped, self._calls)

    def _refusal_error(self, call: str) -> NonFiniteTeacherError:
        return NonFiniteTeacherError(
            f"the teacher output of DINOLoss call {call} had NaN or Inf values; the center was not updated "
            "(it holds every other batch)"
        )

    def _raise_landed_refusal(self) -> None:
        landed = self._watcher.landed() if self._watcher is not None else None
        if landed is not None and landed > self._refusals_seen:
            self._refusals_seen = landed
            raise self._refusal_error(f"#{self._watcher.copied_at_call} or earlier")

    def check(self) -> None:
        """Raise NonFiniteTeacherError if an update was refused since the last check (reads the device)."""
        refused = int(self.num_skipped.item())
        if self.on_nonfinite == "raise" and refused > self._refusals_seen:
            self._refusals_seen = refused
            raise self._refusal_error("(one of the calls since the last check)")
        self._refusals_seen = refused

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._watcher = None
        self._refusals_seen = int(self.num_skipped.item())

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, teacher_temp={self.teacher_temp}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}, warmup_teacher_temp_epochs={self.warmup_teacher_temp_epochs}"
        )
