"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) and the teachers' crop+flip.

Follows the DSA reference code's ``ParamDiffAug`` defaults and its single-strategy mode ('S'): each
call picks one of the strategy's transforms at random, then draws parameters per sample. Passing
the same ``generator`` state to two calls reproduces the draw (the "siamese" use in matching).
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclasses.dataclass(frozen=True)
class DSAParams:
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


def _rand(x: torch.Tensor, gen: torch.Generator | None, *shape: int) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, device=gen.device if gen is not None else "cpu").to(x.device, x.dtype)


def _randint(x: torch.Tensor, gen: torch.Generator | None, low: int, high: int, *shape: int) -> torch.Tensor:
    device = gen.device if gen is not None else "cpu"
    return torch.randint(low, high, shape, generator=gen, device=device).to(x.device)


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


def _scale(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    n, ratio = x.shape[0], p.ratio_scale
    sx = _rand(x, gen, n) * (ratio - 1.0 / ratio) + 1.0 / ratio
    sy = _rand(x, gen, n) * (ratio - 1.0 / ratio) + 1.0 / ratio
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def _rotate(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    angle = (_rand(x, gen, x.shape[0]) - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


def _flip(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    flip = _rand(x, gen, x.shape[0], 1, 1, 1) < p.prob_flip
    return torch.where(flip, x.flip(3), x)


def _brightness(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    return x + (_rand(x, gen, x.shape[0], 1, 1, 1) - 0.5) * p.brightness


def _saturation(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, gen, x.shape[0], 1, 1, 1) * p.saturation) + mean


def _contrast(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, gen, x.shape[0], 1, 1, 1) + p.contrast) + mean


def _crop(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    """Translate each image by up to ratio_crop_pad of its size, filling with zeros."""
    n, _, h, w = x.shape
    shift_y, shift_x = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
    ty = _randint(x, gen, -shift_y, shift_y + 1, n, 1, 1)
    tx = _randint(x, gen, -shift_x, shift_x + 1, n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1) + ty
    cols = torch.arange(w, device=x.device).view(1, 1, w) + tx
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (rows + 1).clamp(0, h + 1).expand(n, h, w)
    cols = (cols + 1).clamp(0, w + 1).expand(n, h, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, p: DSAParams, gen: torch.Generator | None) -> torch.Tensor:
    n, _, h, w = x.shape
    cut_h, cut_w = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    cy = _randint(x, gen, 0, h + (1 - cut_h % 2), n, 1, 1)
    cx = _randint(x, gen, 0, w + (1 - cut_w % 2), n, 1, 1)
    rows = torch.arange(cut_h, device=x.device).view(1, cut_h, 1) + cy - cut_h // 2
    cols = torch.arange(cut_w, device=x.device).view(1, 1, cut_w) + cx - cut_w // 2
    rows = rows.clamp(0, h - 1).expand(n, cut_h, cut_w)
    cols = cols.clamp(0, w - 1).expand(n, cut_h, cut_w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, cut_h, cut_w)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[batch, rows, cols] = 0
    return x * mask.unsqueeze(1)


_TRANSFORMS = {
    "color": (_brightness, _saturation, _contrast),
    "crop": (_crop,),
    "cutout": (_cutout,),
    "flip": (_flip,),
    "scale": (_scale,),
    "rotate": (_rotate,),
}


def dsa(
    x: torch.Tensor,
    strategy: str = DSA_STRATEGY,
    params: DSAParams = DSAParams(),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply one randomly chosen transform group of ``strategy`` with per-sample parameters.
    Differentiable w.r.t. ``x``."""
    if not strategy or strategy.lower() == "none":
        return x
    names = strategy.split("_")
    unknown = [n for n in names if n not in _TRANSFORMS]
    if unknown:
        raise ValueError(f"unknown DSA transform(s) {unknown}; available: {sorted(_TRANSFORMS)}")
    choice = names[int(_randint(x, generator, 0, len(names), 1))]
    for transform in _TRANSFORMS[choice]:
        x = transform(x, params, generator)
    return x.contiguous()


def crop_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None, flip: bool = True) -> torch.Tensor:
    """The usual teacher augmentation: RandomCrop(size, padding=pad) + horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = _randint(x, generator, 0, 2 * pad + 1, n)
    ox = _randint(x, generator, 0, 2 * pad + 1, n)
    rows = (oy.view(n, 1, 1) + torch.arange(h, device=x.device).view(1, h, 1)).expand(n, h, w)
    cols = (ox.view(n, 1, 1) + torch.arange(w, device=x.device).view(1, 1, w)).expand(n, h, w)
    batch = torch.arange(n, device=x.device).view(n, 1, 1).expand(n, h, w)
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    if flip:
        out = torch.where(_rand(x, generator, n, 1, 1, 1) < 0.5, out.flip(3), out)
    return out.contiguous()


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def siamese_dsa(real: torch.Tensor, syn: torch.Tensor, real_labels: torch.Tensor, syn_labels: torch.Tensor, num_classes: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One DSA draw per class shared by its real and synthetic images (DataDAM main:276-280, whose
    DiffAugment reseeds before every parameter draw, so the i-th real and the i-th synthetic image of a
    class get the same transform whatever the two batch sizes): both sides are padded to the larger
    count for the draw and cut back. Returned in their input order."""
    out_r = torch.empty_like(real)
    parts = []
    for k in range(num_classes):
        ir, is_ = (real_labels == k).nonzero().flatten(), (syn_labels == k).nonzero().flatten()
        rows = max(len(ir), len(is_))
        seed = int(torch.randint(2**62, (1,), generator=gen))
        out_r[ir] = dsa(_padded(real[ir], rows), generator=torch.Generator().manual_seed(seed))[:len(ir)]
        parts.append((is_, dsa(_padded(syn[is_], rows), generator=torch.Generator().manual_seed(seed))[:len(is_)]))
    order = torch.cat([i for i, _ in parts])
    syn_aug = torch.cat([x for _, x in parts])[torch.argsort(order)]
    return out_r, syn_aug
