"""DSA (as in the DSA reference code) and the teachers' crop + flip."""
import pytest
import torch

from ddfast import augment


@pytest.mark.parametrize("strategy", ["color", "crop", "cutout", "flip", "scale", "rotate", augment.DSA_STRATEGY])
def test_each_transform_keeps_shape_and_is_differentiable(strategy):
    x = torch.randn(5, 3, 12, 12, requires_grad=True)
    y = augment.dsa(x, strategy, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_same_generator_state_reproduces_the_draw():
    x = torch.randn(8, 1, 16, 16)
    a = augment.dsa(x, generator=torch.Generator().manual_seed(7))
    b = augment.dsa(x, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_crop_translates_with_zero_fill_and_cutout_zeroes_a_box():
    x = torch.ones(64, 1, 8, 8)
    cropped = augment.dsa(x, "crop", generator=torch.Generator().manual_seed(1))
    assert set(cropped.unique().tolist()) <= {0.0, 1.0}
    assert (cropped == 0).any()  # at least one image shifted
    cut = augment.dsa(x, "cutout", generator=torch.Generator().manual_seed(1))
    zeros = (cut == 0).flatten(1).sum(1)
    assert zeros.max() <= 4 * 4 and zeros.min() >= 1  # 0.5 * 8 = 4 pixel box, clipped at borders


def test_flip_is_per_sample():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(200, 1, 1, 1)
    y = augment.dsa(x, "flip", generator=torch.Generator().manual_seed(0))
    flipped = (y == x.flip(3)).flatten(1).all(1)
    assert 60 < int(flipped.sum()) < 140  # p = 0.5


def test_unknown_transform():
    with pytest.raises(ValueError, match="unknown DSA transform"):
        augment.dsa(torch.zeros(1, 1, 4, 4), "color_blur")


def test_crop_flip_shapes_and_content():
    x = torch.randn(10, 3, 16, 16)
    y = augment.crop_flip(x, pad=4, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    assert augment.crop_flip(x, pad=0, flip=False).equal(x)
