"""Reference (pure PyTorch) K1: channel + patch statistics and the EMA-SDS matching loss.

Written for clarity; float64 inputs give a float64 oracle. Statistics are population moments;
a patch statistic is one scalar pooled over (batch, channels, the p×p pixels of the patch), patches
numbered row-major. The channel statistics are always those of x itself. When x's height or width is
not a multiple of p, the patch statistics are taken on a bilinear resize of x to the next multiple
(``F.interpolate(..., mode="bilinear")``, align_corners False), exactly as the official G-VBSM
``ConvFeatureHook`` does (channel mean/var on ``input_0``, patch mean/var on the resized copy).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def resize_to_patch_multiple(x: torch.Tensor, patch: int | None) -> torch.Tensor:
    if not patch:
        return x
    h, w = x.shape[-2:]
    target = (patch_multiple(h, patch), patch_multiple(w, patch))
    if target == (h, w):
        return x
    # Interpolate in the statistics' precision: a half-precision resize would round every pixel.
    return F.interpolate(x.to(compute_dtype(x)), size=target, mode="bilinear")


def bilinear_matrix(in_size: int, out_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[out_size, in_size] matrix R with R @ v = the 1-D bilinear resize of v as
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` computes it (src = (dst + ½)·in/out − ½,
    clamped at 0; the upper tap clamps at the last pixel). A 2-D resize is R_h · x · R_wᵀ, and
    its adjoint (the resize backward) R_hᵀ · g · R_w."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    frac = src - lo.double()
    mat = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    mat.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    mat.index_put_((rows, hi), frac, accumulate=True)
    return mat.to(dtype)


def patch_multiple(size: int, patch: int) -> int:
    return math.ceil(size / patch) * patch


def patch_view(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] (H, W multiples of patch) -> [K, B·C·p²], one row per patch, row-major."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // patch, patch, w // patch, patch).permute(2, 4, 0, 1, 3, 5).reshape((h // patch) * (w // patch), -1)


def moments(x: torch.Tensor, patch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(channel_mean [C], channel_var [C], patch_mean [K], patch_var [K]); the patch pair is None
    without a patch size. Two-pass (centred) variances in fp32, or fp64 for fp64 inputs."""
    if x.ndim != 4:
        raise ValueError(f"moments expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
    xf = x.to(compute_dtype(x))
    channel_mean = xf.mean(dim=(0, 2, 3))
    channel_var = (xf - channel_mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    if not patch:
        return channel_mean, channel_var, None, None
    rows = patch_view(resize_to_patch_multiple(xf, patch), patch)
    patch_mean = rows.mean(dim=1)
    patch_var = (rows - patch_mean[:, None]).square().mean(dim=1)
    return channel_mean, channel_var, patch_mean, patch_var


def ema_update(ema: torch.Tensor | None, stat: torch.Tensor, alpha: float) -> torch.Tensor:
    """e ← α·e + (1−α)·s, started from the first s (the official code starts from 0)."""
    stat = stat.detach()
    return stat.clone() if ema is None else alpha * ema + (1 - alpha) * stat


def sds_norm(target: torch.Tensor, ema: torch.Tensor, stat: torch.Tensor) -> torch.Tensor:
    """ℓ = ‖g − (e + s − sg(s))‖₂: value ‖g − e‖₂, gradient ∂ℓ/∂s = (e − g)/‖e − g‖₂."""
    return torch.linalg.vector_norm(target.to(stat.dtype) - (ema.to(stat.dtype) + stat - stat.detach()))
