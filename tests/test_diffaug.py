"""DiM's DiffAug (ddfast.diffaug) against float64 oracles written from vimar-gu/DiM augment.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ddfast import diffaug as D


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------- oracles (augment.py, numpy float64)
# Each follows the official statement order, with the random numbers injected instead of drawn.


def _oracle_brightness(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    return x + (r.reshape(-1, 1, 1, 1) - 0.5) * 1.0  # augment.py:152


def _oracle_saturation(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=1, keepdims=True)  # augment.py:159
    return (x - mean) * (r.reshape(-1, 1, 1, 1) * 2.0) + mean  # augment.py:164


def _oracle_contrast(x: np.ndarray, r: np.ndarray) -> np.ndarray:
    mean = x.mean(axis=(1, 2, 3), keepdims=True)  # augment.py:171
    return (x - mean) * (r.reshape(-1, 1, 1, 1) + 0.5) + mean  # augment.py:176


def _oracle_crop(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    # augment.py:220-228: pad one zero row/col, index clamp(i + t + 1, 0, size + 1) into the padded image.
    n, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.empty_like(x)
    for b in range(n):
        th, tw = shift[b if len(shift) > 1 else 0]
        for i in range(h):
            for j in range(w):
                out[b, :, i, j] = padded[b, :, min(max(i + th + 1, 0), h + 1), min(max(j + tw + 1, 0), w + 1)]
    return out


def _oracle_cutout(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    # augment.py:233-258: clamp the square's indices into the image, zero them in a ones mask.
    n, _, h, w = x.shape
    ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
    mask = np.ones((n, h, w))
    for b in range(n):
        oh, ow = centre[b if len(centre) > 1 else 0]
        for i in range(ch):
            for j in range(cw):
                mask[b, min(max(i + oh - ch // 2, 0), h - 1), min(max(j + ow - cw // 2, 0), w - 1)] = 0
    return x * mask[:, None]


def _oracle(x: np.ndarray, p: D.DiffAugParams) -> np.ndarray:
    # DiffAug.__call__ (augment.py:61-81): color fns, then the single strategy pick (crop), then cutout.
    if p.brightness is not None:
        x = _oracle_brightness(x, p.brightness.numpy())
        x = _oracle_saturation(x, p.saturation.numpy())
        x = _oracle_contrast(x, p.contrast.numpy())
    if p.crop is not None:
        x = _oracle_crop(x, p.crop.numpy())
    if p.cutout is not None:
        x = _oracle_cutout(x, p.cutout.numpy())
    return x


# ----------------------------------------------------------------- primitives vs oracles

SHAPES = [(3, 3, 8, 8), (2, 1, 28, 28), (2, 3, 7, 9)]  # odd and non-square sizes exercise the rounding


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize(
    "name, oracle",
    [("brightness", _oracle_brightness), ("saturation", _oracle_saturation), ("contrast", _oracle_contrast)],
)
def test_color_primitive_matches_oracle(name: str, oracle, shape: tuple[int, ...], per_sample: bool) -> None:
    x = torch.randn(shape, dtype=torch.float64, generator=_gen(0))
    r = torch.rand(shape[0] if per_sample else 1, dtype=torch.float64, generator=_gen(1))
    got = getattr(D, f"apply_{name}")(x, r)
    np.testing.assert_allclose(got.numpy(), oracle(x.numpy(), r.numpy()), rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", SHAPES)
def test_crop_primitive_matches_oracle(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64, generator=_gen(0))
    n = shape[0]
    # Shifts beyond the drawn range too: zero fill must hold for any shift, incl. off-image ones.
    for shift in ([[0, 0]], [[2, -3]], [[-9, 1]], [[1, 2]] * n, [[-1, 4]] + [[3, -2]] * (n - 1)):
        s = torch.tensor(shift)
        np.testing.assert_array_equal(D.apply_crop(x, s).numpy(), _oracle_crop(x.numpy(), s.numpy()))


@pytest.mark.parametrize("shape", SHAPES)
def test_cutout_primitive_matches_oracle(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64, generator=_gen(0))
    n, _, h, w = shape
    # Every reachable centre, including the corners where the square is clipped.
    for oh in range(h + (1 - D.cutout_size(h) % 2)):
        for ow in (0, w // 2, w - 1 + (1 - D.cutout_size(w) % 2)):
            c = torch.tensor([[oh, ow]] * n)
            np.testing.assert_array_equal(D.apply_cutout(x, c).numpy(), _oracle_cutout(x.numpy(), c.numpy()))


@pytest.mark.parametrize("strategy", [D.DIM_AUG, D.DIM_AUG_RAND, "color", "crop", "cutout", "crop_color"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 1, 28, 28)])
def test_diffaug_equals_oracle_of_its_draw(strategy: str, per_sample: bool, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, dtype=torch.float64, generator=_gen(0))
    got = D.diffaug(x, strategy, per_sample, generator=_gen(5))
    params = D.draw_params(x, strategy, per_sample, generator=_gen(5))  # same generator state => same draw
    np.testing.assert_allclose(got.numpy(), _oracle(x.numpy(), params), rtol=0, atol=1e-13)


# ----------------------------------------------------------------- draws


@pytest.mark.parametrize("size, shift, cut", [(28, 4, 14), (32, 4, 16), (8, 1, 4), (7, 1, 4)])
def test_documented_sizes(size: int, shift: int, cut: int) -> None:
    # int(size * 0.125 + 0.5) and int(size * 0.5 + 0.5) (augment.py:205, 233): 32 * 0.125 + 0.5 = 4.5 -> 4.
    assert (D.crop_shift_range(size), D.cutout_size(size)) == (shift, cut)


@pytest.mark.parametrize("size", [28, 7])
def test_draw_ranges(size: int) -> None:
    # 3000 per-sample draws cover every integer value; the float ranges are U[0, 1).
    x = torch.empty(3000, 1, size, size)
    p = D.draw_params(x, D.DIM_AUG, per_sample=True, generator=_gen(0))
    for r in (p.brightness, p.saturation, p.contrast):
        assert r.dtype == torch.float64 and 0 <= r.min() < 0.01 and 0.99 < r.max() < 1
    s = D.crop_shift_range(size)
    assert p.crop.unique().tolist() == list(range(-s, s + 1))
    # An even square can be centred one past the last row (augment.py:236), an odd one cannot.
    c = D.cutout_size(size)
    assert p.cutout.unique().tolist() == list(range(size + (1 - c % 2)))


@pytest.mark.parametrize("per_sample, rows", [(False, 1), (True, 5)])
def test_one_draw_per_batch_or_per_sample(per_sample: bool, rows: int) -> None:
    p = D.draw_params(torch.empty(5, 3, 8, 8), D.DIM_AUG, per_sample, generator=_gen(0))
    assert [p.brightness.shape, p.saturation.shape, p.contrast.shape] == [(rows,)] * 3
    assert p.crop.shape == p.cutout.shape == (rows, 2)


def test_strategy_selects_draws() -> None:
    p = D.draw_params(torch.empty(2, 3, 8, 8), D.DIM_AUG_RAND, generator=_gen(0))
    assert p.cutout is None and p.crop is not None and p.brightness is not None
    assert D.draw_params(torch.empty(2, 3, 8, 8), "none") == D.DiffAugParams()


def test_deterministic_under_seeded_generator() -> None:
    x = torch.randn(6, 3, 16, 16, generator=_gen(0))
    for per_sample in (False, True):
        a = D.diffaug(x, per_sample=per_sample, generator=_gen(3))
        assert torch.equal(a, D.diffaug(x, per_sample=per_sample, generator=_gen(3)))
        assert not torch.equal(a, D.diffaug(x, per_sample=per_sample, generator=_gen(4)))


def test_global_rng_when_no_generator() -> None:
    x = torch.randn(4, 3, 8, 8, generator=_gen(0))
    torch.manual_seed(11)
    a = D.diffaug(x, per_sample=True)
    torch.manual_seed(11)
    assert torch.equal(a, D.diffaug(x, per_sample=True))


def test_same_draw_for_float32_and_float64() -> None:
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=_gen(0))
    a = D.diffaug(x, per_sample=True, generator=_gen(2))
    b = D.diffaug(x.float(), per_sample=True, generator=_gen(2))
    assert b.dtype == torch.float32
    torch.testing.assert_close(b.double(), a, rtol=0, atol=1e-5)


# ----------------------------------------------------------------- batch vs per-sample behaviour


@pytest.mark.parametrize("strategy", [D.DIM_AUG, D.DIM_AUG_RAND])
def test_batch_mode_applies_one_transform_to_all(strategy: str) -> None:
    # The siamese property DiM relies on: identical inputs in one aug() call stay identical.
    img = torch.randn(1, 3, 16, 16, generator=_gen(0))
    out = D.diffaug(img.expand(6, -1, -1, -1), strategy, generator=_gen(1))
    assert torch.equal(out, out[:1].expand_as(out))
    assert not torch.equal(out[:1], img)


@pytest.mark.parametrize("strategy", [D.DIM_AUG, D.DIM_AUG_RAND, "crop", "cutout"])
def test_per_sample_mode_differs_across_samples(strategy: str) -> None:
    img = torch.randn(1, 3, 16, 16, generator=_gen(0))
    out = D.diffaug(img.expand(6, -1, -1, -1), strategy, per_sample=True, generator=_gen(1))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 6


def test_saturation_is_identity_for_one_channel() -> None:
    # (x - mean over 1 channel) == 0: the draw is made but changes nothing (augment.py:159-164).
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=_gen(0))
    assert torch.equal(D.apply_saturation(x, torch.tensor([0.0, 0.3, 0.99], dtype=torch.float64)), x)


# ----------------------------------------------------------------- crop / cutout geometry


@pytest.mark.parametrize("th, tw", [(3, -2), (-4, 4), (0, 1)])
def test_crop_is_integer_shift_with_zero_fill(th: int, tw: int) -> None:
    h, w = 10, 12
    x = torch.arange(1.0, h * w + 1).view(1, 1, h, w).repeat(2, 2, 1, 1)
    out = D.apply_crop(x, torch.tensor([[th, tw]]))
    expected = torch.zeros_like(x)
    # out[i, j] = x[i + th, j + tw]: slices of source and destination of the same length.
    expected[..., max(0, -th):h - max(0, th), max(0, -tw):w - max(0, tw)] = x[
        ..., max(0, th):h - max(0, -th), max(0, tw):w - max(0, -tw)
    ]
    assert torch.equal(out, expected)
    assert int((out == 0).sum()) == 4 * (h * w - (h - abs(th)) * (w - abs(tw)))


@pytest.mark.parametrize("size", [28, 32])
def test_cutout_zeroes_square_of_documented_size(size: int) -> None:
    c = D.cutout_size(size)  # 14 / 16
    x = torch.ones(1, 3, size, size)
    out = D.apply_cutout(x, torch.tensor([[size // 2, size // 2 - 1]]))
    zero = out[0, 0] == 0
    assert torch.equal(zero, out[0, 2] == 0)  # same square in every channel
    rows, cols = zero.nonzero().unbind(1)
    assert int(zero.sum()) == c * c
    assert (rows.min(), rows.max()) == (size // 2 - c // 2, size // 2 - c // 2 + c - 1)
    assert (cols.min(), cols.max()) == (size // 2 - 1 - c // 2, size // 2 - 1 - c // 2 + c - 1)
    # At a corner the square is clipped, not moved: centre (0, 0) leaves a (c - c // 2)^2 corner.
    corner = D.apply_cutout(x, torch.tensor([[0, 0]]))[0, 0] == 0
    assert int(corner.sum()) == (c - c // 2) ** 2 and bool(corner[: c - c // 2, : c - c // 2].all())


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("strategy", [D.DIM_AUG, D.DIM_AUG_RAND])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_gradcheck_for_a_fixed_draw(strategy: str, per_sample: bool, channels: int) -> None:
    x = torch.randn(2, channels, 6, 6, dtype=torch.float64, generator=_gen(0), requires_grad=True)
    params = D.draw_params(x, strategy, per_sample, generator=_gen(1))
    assert torch.autograd.gradcheck(lambda t: D.apply_params(t, params), (x,))


def test_gradient_flows_through_diffaug() -> None:
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    D.diffaug(x, generator=_gen(0)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


# ----------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "strategy, message",
    [
        ("flip", r"unknown DiffAug part\(s\) \['flip'\].*known parts: color, crop, cutout"),
        ("color_crop_cutout_flip_scale_rotate", r"\['flip', 'scale', 'rotate'\]"),
        ("colour_crop", r"\['colour'\]"),
        ("color__crop", r"\[''\]"),
        ("crop_crop", r"repeated"),
        (None, r"must be a str"),
    ],
)
def test_rejects_bad_strategies(strategy, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        D.diffaug(torch.zeros(1, 1, 4, 4), strategy)


@pytest.mark.parametrize("strategy", ["none", "None", ""])
def test_none_is_identity(strategy: str) -> None:
    # augment.py:27-28 turns augmentation off for '' and 'none'.
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(D.diffaug(x, strategy, generator=_gen(0)), x)


def test_case_insensitive_strategy() -> None:
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(D.diffaug(x, "Color_CROP", generator=_gen(0)), D.diffaug(x, "color_crop", generator=_gen(0)))


def test_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        D.diffaug(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        D.apply_brightness(torch.zeros(4, 1, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        D.apply_crop(torch.zeros(4, 1, 2, 2), torch.zeros(2, 2, dtype=torch.long))
