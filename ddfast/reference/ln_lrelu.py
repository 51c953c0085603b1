"""DiM critic block reference: LayerNorm over (C, H, W) of each sample with a per-position affine, then
LeakyReLU (specs/dim-dcgm.md §A4 target (1); nn.LayerNorm([C, H, W], eps) + nn.LeakyReLU(slope)).

For one sample (D = C·H·W elements, ⟨·⟩ the mean over them, m the LeakyReLU slope mask):

    μ = ⟨x⟩,  σ² = ⟨(x − μ)²⟩ (biased),  r = 1/√(σ² + ε),  x̂ = (x − μ)·r
    z = γ ⊙ x̂ + β,  y = z if z > 0 else slope·z,  m = 1 if z > 0 else slope   (torch: z = 0 takes slope)

Backward (cotangent g of y):

    h = g ⊙ m ⊙ γ,  dx = r·(h − ⟨h⟩ − x̂·⟨h x̂⟩),  dγ = Σ_n g ⊙ m ⊙ x̂,  dβ = Σ_n g ⊙ m

Double backward: the cotangents (u, v_γ, v_β) of (dx, dγ, dβ) and S = Σ u·dx + Σ v_γ·dγ + Σ v_β·dβ.
m is piecewise constant, so its derivative is 0 almost everywhere. With P(w) = w − ⟨w⟩ − x̂⟨w x̂⟩
(symmetric: Σ u·P(h) = Σ h·P(u)), dx = r·P(h) and J = ∂x̂/∂x = r·(I − 11ᵀ/D − x̂x̂ᵀ/D) = r·P:

    S = Σ h ⊙ ũ + Σ g ⊙ m ⊙ (v_γ ⊙ x̂ + v_β),   ũ = r·P(u) = J·u

    ∂S/∂g = m ⊙ (γ ⊙ ũ + v_γ ⊙ x̂ + v_β)          (the JVP of y in the direction (u, v_γ, v_β))
    ∂S/∂γ = Σ_n g ⊙ m ⊙ ũ,   ∂S/∂β = 0

For ∂S/∂x write S = r·A − r·p·q/D + Σ w ⊙ x̂ (+ terms without x) with w = g ⊙ m ⊙ v_γ,
A = Σ h ⊙ (u − ⟨u⟩), p = Σ h ⊙ x̂, q = Σ u ⊙ x̂. For F(x̂, r): ∂F/∂x = r·P(∂F/∂x̂) − (r²/D)·(∂F/∂r)·x̂
(∂r/∂x = −r²·x̂/D), with ∂S/∂x̂ = w − r·(q·h + p·u)/D and ∂S/∂r = A − p·q/D. With the seven per-sample
means a = ⟨h⟩, b = ⟨h x̂⟩, ū = ⟨u⟩, c = ⟨u x̂⟩, e = ⟨h u⟩ − a·ū, ⟨w⟩, ⟨w x̂⟩:

    ∂S/∂x = r·(w − ⟨w⟩) − r²·c·(h − a) − r²·b·(u − ū) + x̂·(r²·(3·b·c − e) − r·⟨w x̂⟩)

:func:`ln_lrelu` is the autograd oracle (torch composition, float64 for float64 inputs); :func:`forward`,
:func:`backward` and :func:`double_backward` are the closed forms every backend implements.
All math is in float32 for float32/float16/bfloat16 inputs and float64 for float64 inputs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_inputs(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> None:
    if not (x.is_floating_point() and weight.is_floating_point() and bias.is_floating_point()):
        raise ValueError(f"ln_lrelu expects floating tensors, got x {x.dtype}, weight {weight.dtype}, bias {bias.dtype}")
    if weight.shape != bias.shape or weight.ndim == 0:
        raise ValueError(f"weight and bias must have the (same, non-empty) normalized shape, got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    if x.ndim < weight.ndim or tuple(x.shape[x.ndim - weight.ndim:]) != tuple(weight.shape):
        raise ValueError(f"x {tuple(x.shape)} must be [*, *normalized_shape] with normalized_shape "
                         f"{tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError("ln_lrelu: the normalized shape has no elements")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(1, x.ndim))


def _col(v: Tensor, x: Tensor) -> Tensor:
    """Per-sample [N] -> broadcastable [N, 1, ..., 1]."""
    return v.view(-1, *([1] * (x.ndim - 1)))


def ln_lrelu(x: Tensor, weight: Tensor, bias: Tensor, slope: float = 0.01, eps: float = 1e-5) -> Tensor:
    """The block by autograd-able torch ops (x [*, *normalized_shape], normalized over weight's dims);
    the oracle of the tests."""
    cd = compute_dtype(x)
    xf = x.to(cd)
    dims = tuple(range(x.ndim - weight.ndim, x.ndim))
    mean = xf.mean(dims, keepdim=True)
    var = (xf - mean).square().mean(dims, keepdim=True)
    z = (xf - mean) * torch.rsqrt(var + eps) * weight.to(cd) + bias.to(cd)
    return F.leaky_relu(z, slope).to(x.dtype)


def _xhat_mask(x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor, slope: float):
    cd = compute_dtype(x)
    xhat = (x.to(cd) - _col(mean.to(cd), x)) * _col(rstd.to(cd), x)
    w, b = weight.to(cd), bias.to(cd)
    z = xhat * w + b
    m = torch.where(z > 0, torch.ones((), dtype=cd), torch.full((), slope, dtype=cd))
    return xhat, z, m, w


def forward(x: Tensor, weight: Tensor, bias: Tensor, slope: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y in x's dtype, mean [N], rstd [N]) with mean/rstd in the compute dtype."""
    cd = compute_dtype(x)
    xf = x.to(cd)
    mean = xf.mean(_dims(x))
    var = (xf - _col(mean, x)).square().mean(_dims(x))
    rstd = torch.rsqrt(var + eps)
    _, z, m, _ = _xhat_mask(x, weight, bias, mean, rstd, slope)
    return (z * m).to(x.dtype), mean, rstd


def backward(g: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
             slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx in x's dtype, dγ, dβ in weight's dtype) for the cotangent g of y."""
    cd = compute_dtype(x)
    xhat, _, m, w = _xhat_mask(x, weight, bias, mean, rstd, slope)
    gm = g.to(cd) * m
    h = gm * w
    dims = _dims(x)
    a = h.mean(dims, keepdim=True)
    b = (h * xhat).mean(dims, keepdim=True)
    dx = _col(rstd.to(cd), x) * (h - a - xhat * b)
    return dx.to(x.dtype), (gm * xhat).sum(0).to(weight.dtype), gm.sum(0).to(bias.dtype)


def double_backward(u: Tensor, vw: Tensor, vb: Tensor, g: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                    mean: Tensor, rstd: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(∂S/∂g in g's dtype, ∂S/∂x in x's dtype, ∂S/∂γ in weight's dtype) for the cotangents u of dx,
    vw of dγ and vb of dβ (see the module docstring; ∂S/∂β = 0)."""
    cd = compute_dtype(x)
    xhat, _, m, w = _xhat_mask(x, weight, bias, mean, rstd, slope)
    dims = _dims(x)
    mean_ = lambda t: t.mean(dims, keepdim=True)  # noqa: E731
    r = _col(rstd.to(cd), x)
    uf, vwf, vbf = u.to(cd), vw.to(cd), vb.to(cd)
    gm = g.to(cd) * m
    h = gm * w
    wv = gm * vwf
    a, b = mean_(h), mean_(h * xhat)
    ubar, c = mean_(uf), mean_(uf * xhat)
    e = mean_(h * uf) - a * ubar
    mw, mwx = mean_(wv), mean_(wv * xhat)
    ut = r * (uf - ubar - xhat * c)
    dg = m * (w * ut + vwf * xhat + vbf)
    r2 = r * r
    dx = r * (wv - mw) - r2 * c * (h - a) - r2 * b * (uf - ubar) + xhat * (r2 * (3 * b * c - e) - r * mwx)
    return dg.to(g.dtype), dx.to(x.dtype), (gm * ut).sum(0).to(weight.dtype)
