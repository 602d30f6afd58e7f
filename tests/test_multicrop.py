"""MultiCropTransform: lightly's MultiCropTranform, crop for crop under the same seed; bad arguments."""

from __future__ import annotations

import pytest
import torch
from conftest import LazyPeer

from moco_fast import MultiCropTransform

T = pytest.importorskip("torchvision.transforms")
lightly_mc = LazyPeer("lightly.transforms.multi_crop_transform")  # only the tests that use it skip without lightly


def _image(seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(40, 36, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_matches_lightly_crop_for_crop():
    args = ((24, 12), (2, 3), (0.4, 0.05), (1.0, 0.4))
    ours = MultiCropTransform(*args, T.Compose([T.ColorJitter(0.4, 0.4), T.ToTensor()]))
    theirs = lightly_mc.MultiCropTranform(*args, T.Compose([T.ColorJitter(0.4, 0.4), T.ToTensor()]))
    for seed in range(3):
        torch.manual_seed(seed)
        a = ours(_image(seed))
        torch.manual_seed(seed)
        b = theirs(_image(seed))
        assert len(a) == len(b) == len(ours) == 5
        assert [tuple(x.shape) for x in a] == [(3, 24, 24)] * 2 + [(3, 12, 12)] * 3
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_collates_into_one_batch_per_crop():
    t = MultiCropTransform((16, 8), (2, 2), (0.5, 0.1), (1.0, 0.5), T.ToTensor())
    batch = torch.utils.data.default_collate([t(_image(i)) for i in range(4)])
    assert [tuple(x.shape) for x in batch] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop_sizes and crop_counts must have the same length"):
        MultiCropTransform((16, 8), (2,), (0.5, 0.1), (1.0, 0.5))
    with pytest.raises(ValueError, match="0 < min <= max <= 1"):
        MultiCropTransform((16,), (2,), (0.6,), (0.5,))
    with pytest.raises(ValueError, match=r"crop_sizes\[0\] must be a positive int"):
        MultiCropTransform((0,), (2,), (0.5,), (1.0,))
    with pytest.raises(ValueError, match="add up to 0 crops"):
        MultiCropTransform((16,), (0,), (0.5,), (1.0,))
