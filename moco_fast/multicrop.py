"""Multi-crop (SwAV, DINO): a few high-resolution crops and several low-resolution ones per image.

:class:`MultiCropTransform` has the arguments of lightly's ``MultiCropTranform`` (sic): for each crop
category i, ``crop_counts[i]`` crops of ``crop_sizes[i]`` pixels drawn by ``RandomResizedCrop`` with scale
``(crop_min_scales[i], crop_max_scales[i])``, each followed by ``transforms``. ``transform(image)`` returns
the list of crops, categories in order (the high-resolution ones first, as SwaVLoss and DINOLoss expect).
A default DataLoader collates a list of such lists into one batch per crop: ``for crops, _ in loader``
gives ``crops[v]`` (B, C, size_v, size_v).

The in-memory trainer (``moco_fast.train``) makes the same crops batch-wise on the device instead (see
``moco_fast/train/data.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["MultiCropTransform"]


class MultiCropTransform:
    """``crop_counts[i]`` random resized crops of ``crop_sizes[i]`` pixels, each then ``transforms``.

    Args:
        crop_sizes: side of each crop category, e.g. (224, 96).
        crop_counts: crops per category, e.g. (2, 6).
        crop_min_scales, crop_max_scales: RandomResizedCrop area range per category, e.g. (0.4, 0.05), (1.0, 0.4).
        transforms: applied to every crop after the resized crop (colour jitter, blur, ToTensor, Normalize, ...);
            None for none.
    """

    def __init__(
        self,
        crop_sizes: Sequence[int],
        crop_counts: Sequence[int],
        crop_min_scales: Sequence[float],
        crop_max_scales: Sequence[float],
        transforms: Callable | None = None,
    ):
        from torchvision import transforms as T

        lengths = {
            "crop_counts": len(crop_counts),
            "crop_min_scales": len(crop_min_scales),
            "crop_max_scales": len(crop_max_scales),
        }
        for name, n in lengths.items():
            if n != len(crop_sizes):
                raise ValueError(f"crop_sizes and {name} must have the same length, got {len(crop_sizes)} and {n}")
        if not crop_sizes:
            raise ValueError("crop_sizes is empty: give at least one crop category")
        for i, (size, count, lo, hi) in enumerate(zip(crop_sizes, crop_counts, crop_min_scales, crop_max_scales)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"crop_sizes[{i}] must be a positive int, got {size!r}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"crop_counts[{i}] must be an int >= 0, got {count!r}")
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"crop scales of category {i} must satisfy 0 < min <= max <= 1, got ({lo}, {hi})")
        if sum(crop_counts) < 1:
            raise ValueError("crop_counts add up to 0 crops")
        self.crop_sizes, self.crop_counts = tuple(crop_sizes), tuple(crop_counts)
        self.crop_min_scales, self.crop_max_scales = tuple(crop_min_scales), tuple(crop_max_scales)
        self.transforms = []
        for size, count, lo, hi in zip(crop_sizes, crop_counts, crop_min_scales, crop_max_scales):
            crop = T.RandomResizedCrop(size, scale=(lo, hi))
            one = T.Compose([crop, transforms]) if transforms is not None else crop
            self.transforms += [one] * count

    def __call__(self, image) -> list:
        return [t(image) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)

    def __repr__(self) -> str:
        return (
            f"MultiCropTransform(crop_sizes={self.crop_sizes}, crop_counts={self.crop_counts}, "
            f"crop_min_scales={self.crop_min_scales}, crop_max_scales={self.crop_max_scales})"
        )
