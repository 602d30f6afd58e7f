"""The "torch" backend's momentum (EMA) update: one fused foreach pass over a tensor list."""

from __future__ import annotations

import torch

# Elements of the temporary `source·(1 − m)` per fused call of the exact mode: bounded so that a
# ResNet-50 update does not allocate (and page-fault) a model-sized buffer every step.
_MOMENTUM_CHUNK = 1 << 20


def _chunks(targets: list[torch.Tensor], sources: list[torch.Tensor]):
    """Consecutive runs of (targets, sources) with about _MOMENTUM_CHUNK elements each."""
    begin, size = 0, 0
    for i, t in enumerate(targets):
        size += t.numel()
        if size >= _MOMENTUM_CHUNK:
            yield targets[begin : i + 1], sources[begin : i + 1]
            begin, size = i + 1, 0
    if begin < len(targets):
        yield targets[begin:], sources[begin:]


@torch.no_grad()
def momentum_update_(
    targets: list[torch.Tensor], sources: list[torch.Tensor], momentum: float, exact: bool = False
) -> None:
    """In place, for each pair: target ← lerp(target, source, 1 − m), one fused pass over the list.

    ``exact=True``: the official ``target·m + source·(1 − m)``, with its two roundings bit for bit
    (an alpha-add would fuse them into one FMA and differ in the last bit), in bounded chunks.
    """
    if not targets:
        return
    if not exact:
        torch._foreach_lerp_(targets, sources, 1.0 - momentum)
        return
    for tgt, src in _chunks(targets, sources):
        scaled = torch._foreach_mul(src, 1.0 - momentum)
        # Out of place: on the CPU the in-place foreach mul of a 16-bit tensor by a Python float rounds
        # differently from ``t * m`` (1 ulp in ~65% of bf16/fp16 elements); the out-of-place one matches.
        kept = torch._foreach_mul(tgt, momentum)
        torch._foreach_add_(kept, scaled)
        torch._foreach_copy_(tgt, kept)
