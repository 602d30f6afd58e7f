"""Augmentations: two random views per image.

Two implementations, picked by the data source:

* :class:`BatchAugment` — for images held in memory as a uint8 tensor (the MNIST default). The whole
  batch is augmented at once on the training device with one ``affine_grid``/``grid_sample`` (random
  resized crop + rotation + shear + translation in a single resampling), an optional per-image
  Gaussian blur (separable grouped convolution) and brightness/contrast jitter. All random numbers
  come from a ``torch.Generator`` the caller seeds, so a view is a pure function of
  (seed, epoch, step, rank): a resumed run sees exactly the views an uninterrupted run would, and no
  data-loader workers are needed (per-image PIL transforms would cost more than the model here).
* :func:`torchvision_views` — the MoCo v1/v2 torchvision pipelines for PIL images (ImageFolder,
  CIFAR-10), applied per image in data-loader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AugmentConfig:
    """Parameters of one view (both views use the same distribution)."""

    size: int = 28  # output side
    crop_scale: tuple[float, float] = (0.6, 1.0)  # area fraction of RandomResizedCrop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    rotation: float = 10.0  # degrees, uniform in ±rotation
    shear: float = 0.0  # degrees, uniform in ±shear
    blur_prob: float = 0.0  # MoCo v2 Gaussian blur probability
    blur_sigma: tuple[float, float] = (0.1, 1.0)  # in pixels of the output
    brightness: float = 0.0  # multiply by U(1-b, 1+b)
    contrast: float = 0.0  # blend with the image mean by U(1-c, 1+c)
    erase_prob: float = 0.0  # random erasing (cutout) probability
    erase_scale: tuple[float, float] = (0.02, 0.15)
    mean: tuple[float, ...] = (0.1307,)
    std: tuple[float, ...] = (0.3081,)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen) * (hi - lo) + lo


class BatchAugment:
    """Augment a uint8/float batch (B, C, H, W) into one normalized float view, per-image randomness."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def affine(self, n: int, gen: torch.Generator) -> Tensor:
        """(n, 2, 3) sampling matrices for ``affine_grid`` (output → input normalized coordinates)."""
        c = self.config
        area = _uniform(n, *c.crop_scale, gen)
        log_ratio = _uniform(n, math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1]), gen)
        ratio = torch.exp(log_ratio)
        w = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        # crop centre uniform so that the (unrotated) crop stays inside the image
        cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
        angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(c.rotation)
        shear = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(c.shear)
        cos, sin, tan = torch.cos(angle), torch.sin(angle), torch.tan(shear)
        # input = R(angle) · Shear · diag(w, h) · output + centre
        a11, a12 = w * cos, h * (cos * tan - sin)
        a21, a22 = w * sin, h * (sin * tan + cos)
        return torch.stack([torch.stack([a11, a12, cx], 1), torch.stack([a21, a22, cy], 1)], 1)

    def blur(self, x: Tensor, gen: torch.Generator) -> Tensor:
        c = self.config
        n, ch = x.shape[:2]
        apply = torch.rand(n, generator=gen) < c.blur_prob
        sigma = _uniform(n, *c.blur_sigma, gen)
        if not bool(apply.any()):
            return x
        radius = max(1, math.ceil(3 * c.blur_sigma[1]))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)
        identity = (t == 0).float().expand(n, -1)
        kernel = torch.where(apply[:, None], kernel, identity).to(x.device, x.dtype)  # (n, 2r+1)
        kernel = kernel.repeat_interleave(ch, 0)  # one kernel per (image, channel)
        y = x.reshape(1, n * ch, *x.shape[2:])
        y = F.pad(y, (radius, radius, radius, radius), mode="constant", value=0.0)
        y = F.conv2d(y, kernel[:, None, None, :], groups=n * ch)
        y = F.conv2d(y, kernel[:, None, :, None], groups=n * ch)
        return y.reshape_as(x)

    def __call__(self, images: Tensor, gen: torch.Generator) -> Tensor:
        c = self.config
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        n, ch = x.shape[:2]
        theta = self.affine(n, gen).to(x.device)
        grid = F.affine_grid(theta, [n, ch, c.size, c.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if c.blur_prob > 0:
            x = self.blur(x, gen)
        if c.brightness > 0 or c.contrast > 0:
            b = _uniform(n, 1 - c.brightness, 1 + c.brightness, gen).to(x.device)
            k = _uniform(n, 1 - c.contrast, 1 + c.contrast, gen).to(x.device)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * k[:, None, None, None] + mean) * b[:, None, None, None]
            x = x.clamp(0, 1)
        if c.erase_prob > 0:
            x = self.erase(x, gen)
        mean = torch.tensor(c.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(c.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def erase(self, x: Tensor, gen: torch.Generator) -> Tensor:
        c = self.config
        n, _, hgt, wid = x.shape
        apply = torch.rand(n, generator=gen) < c.erase_prob
        area = _uniform(n, *c.erase_scale, gen)
        side_h = (torch.sqrt(area) * hgt).round().clamp(1, hgt)
        side_w = (torch.sqrt(area) * wid).round().clamp(1, wid)
        top = (torch.rand(n, generator=gen) * (hgt - side_h + 1)).floor()
        left = (torch.rand(n, generator=gen) * (wid - side_w + 1)).floor()
        rows = torch.arange(hgt)[None, :]
        cols = torch.arange(wid)[None, :]
        in_r = (rows >= top[:, None]) & (rows < (top + side_h)[:, None])
        in_c = (cols >= left[:, None]) & (cols < (left + side_w)[:, None])
        mask = (in_r[:, :, None] & in_c[:, None, :]) & apply[:, None, None]
        return x.masked_fill(mask[:, None].to(x.device), 0.0)


def eval_transform(images: Tensor, config: AugmentConfig) -> Tensor:
    """The kNN view of in-memory images: scaled to [0, 1] and normalized, no augmentation."""
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[-1] != config.size:
        x = F.interpolate(x, size=(config.size, config.size), mode="bilinear", align_corners=False)
    mean = torch.tensor(config.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(config.std, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


# ------------------------------------------------------------------------------------------------
# torchvision pipelines for PIL images (ImageFolder / CIFAR-10)
# ------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def torchvision_views(
    version: str, size: int, crop_min: float, blur_prob: float, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_max=1.0
):
    """The official MoCo augmentation: "v1" (MoCo v1 / InstDisc) or "v2" (SimCLR-style + blur).

    ``crop_max`` < 1 caps the resized crop's area (multi-crop's local crops)."""
    from torchvision import transforms as T

    normalize = T.Normalize(mean, std)
    if version == "v1":
        ops = [
            T.RandomResizedCrop(size, scale=(crop_min, crop_max)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
        ]
    else:
        ops = [
            T.RandomResizedCrop(size, scale=(crop_min, crop_max)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
        if blur_prob > 0:
            kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, ~10% of the side as in SimCLR
            ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
        ops.append(T.RandomHorizontalFlip())
    return T.Compose([*ops, T.ToTensor(), normalize])


def torchvision_eval(size: int, resize: int | None, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    from torchvision import transforms as T

    ops = [T.Resize(resize), T.CenterCrop(size)] if resize else [T.Resize(size), T.CenterCrop(size)]
    return T.Compose([*ops, T.ToTensor(), T.Normalize(mean, std)])
