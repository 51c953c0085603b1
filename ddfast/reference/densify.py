"""Reference (pure PyTorch) K3: G-VBSM Gram-eigen data densification (DESIGN §4 K3).

    X̂ = adaptive_avg_pool2d(images, pool×pool).flatten(1)                      [B, D]
    for every class k present in the batch:  G_k = X̂_k X̂_kᵀ  (n_k × n_k, symmetric PSD)
    loss = Σ_k KL( sg(softmax(λ_k / τ)) ‖ softmax(λ_k) ) = Σ_k Σ_i p_i (log p_i − log q_i),
           p = softmax(λ_k/τ) (no gradient), q = softmax(λ_k)

(``F.kl_div(log q, p, reduction="sum")`` per class, summed over classes.) Its gradient is
dλ = softmax(λ) − softmax(λ/τ), dG = V·diag(dλ)·Vᵀ, dX̂_k = 2·dG·X̂_k, then the pooling backward;
:func:`closed_form_grad` spells that out and the tests check it against autograd through
:func:`densify_loss`. A class with one image has one eigenvalue and contributes exactly 0.

All classes go through ONE batched ``torch.linalg.eigvalsh``: the rows of every class are scattered
into a zero-padded [K, n_max, D] tensor, so class k's padded Gram matrix is block diagonal,
diag(G_k, 0). Its padding block is replaced by −c·I with c = 1 + tr(G_k) > 0 (no gradient); since G_k
is PSD its own eigenvalues are ≥ 0 > −c, so the n_max − n_k padding eigenvalues are exactly the
smallest ones (eigvalsh sorts ascending) and are masked out of both softmaxes (masked logsumexp):
padding never adds an eigenvalue to a softmax, and its eigenvectors receive no gradient.

Written for clarity; float64 images give a float64 oracle (float32 images compute in float32, as a
user's batched-eigh code would). Non-finite images raise ValueError.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class ClassLayout(NamedTuple):
    """How the batch splits into classes (classes in ascending label order)."""

    classes: Tensor  # [K] distinct labels, ascending
    counts: Tensor  # [K] images per class (int64)
    order: Tensor  # [B] image indices grouped by class (stable: batch order within a class)
    class_of: Tensor  # [B] class index (0..K-1) of order[r]
    slot: Tensor  # [B] position of order[r] inside its class


def class_layout(labels: Tensor) -> ClassLayout:
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [B], got shape {tuple(labels.shape)}")
    classes, inverse, counts = torch.unique(labels, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    class_of = inverse[order]
    offsets = torch.cumsum(counts, 0) - counts
    slot = torch.arange(labels.numel(), device=labels.device) - offsets[class_of]
    return ClassLayout(classes, counts, order, class_of, slot)


def check_inputs(images: Tensor, labels: Tensor, tau: float, pool: int) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"densify_loss expects floating images [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or labels.numel() != images.shape[0]:
        raise ValueError(f"labels must be [B] = [{images.shape[0]}], got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if pool < 1:
        raise ValueError(f"pool must be >= 1, got {pool}")


def pooled_features(images: Tensor, pool: int) -> Tensor:
    """X̂ = adaptive_avg_pool2d(images, pool×pool) reshaped to [B, C·pool·pool]."""
    return F.adaptive_avg_pool2d(images, (pool, pool)).flatten(1)


def padded_grams(x: Tensor, layout: ClassLayout) -> tuple[Tensor, Tensor]:
    """Class Gram matrices [K, n_max, n_max] (zero padding rows/cols) and the validity mask [K, n_max]."""
    k, n_max = layout.counts.numel(), int(layout.counts.max()) if layout.counts.numel() else 0
    xp = x.new_zeros(k, n_max, x.shape[1])
    xp = xp.index_put((layout.class_of, layout.slot), x[layout.order])
    gram = xp @ xp.transpose(1, 2)
    valid = torch.arange(n_max, device=x.device)[None, :] < layout.counts[:, None]
    return gram, valid


def kl_from_eigenvalues(lam: Tensor, valid: Tensor, tau: float) -> Tensor:
    """Σ over rows of KL(sg(softmax(λ/τ)) ‖ softmax(λ)), softmaxes over the valid entries only."""
    lam_m = lam.masked_fill(~valid, float("-inf"))
    log_q = lam - torch.logsumexp(lam_m, dim=-1, keepdim=True)
    log_p = (lam / tau - torch.logsumexp(lam_m / tau, dim=-1, keepdim=True)).detach()
    terms = log_p.exp() * (log_p - log_q)  # finite everywhere: padding entries of λ are finite
    return torch.where(valid, terms, torch.zeros_like(terms)).sum()


def densify_eigenvalues(images: Tensor, labels: Tensor, pool: int = 32) -> tuple[Tensor, Tensor, ClassLayout]:
    """(λ [K, n_max] ascending with the padding entries first, validity mask, layout)."""
    x = pooled_features(images, pool)
    layout = class_layout(labels.to(images.device))
    gram, valid = padded_grams(x, layout)
    if not bool(torch.isfinite(gram.diagonal(dim1=1, dim2=2)).all()):
        raise ValueError("densify_loss: images contain NaN or Inf (a class Gram matrix is not finite)")
    n_max = gram.shape[-1]
    pad_to_front = torch.arange(n_max, device=x.device)[None, :] < (n_max - layout.counts)[:, None]
    shift = (1.0 + gram.diagonal(dim1=1, dim2=2).sum(-1)).detach()  # > every eigenvalue of G_k
    gram = gram - torch.diag_embed((~valid) * shift[:, None])
    lam = torch.linalg.eigvalsh(gram)
    return lam, ~pad_to_front, layout


def densify_loss(images: Tensor, labels: Tensor, tau: float = 4.0, pool: int = 32) -> Tensor:
    """Σ_k KL(sg(softmax(λ_k/τ)) ‖ softmax(λ_k)) over the classes of the batch; one batched eigh."""
    check_inputs(images, labels, tau, pool)
    if images.shape[0] == 0:
        return images.sum() * 0
    lam, valid, _ = densify_eigenvalues(images, labels, pool)
    return kl_from_eigenvalues(lam, valid, tau)


def densify_loss_and_grad(images: Tensor, labels: Tensor, tau: float = 4.0, pool: int = 32) -> tuple[Tensor, Tensor]:
    """(loss, d loss / d images) without autograd, batched over the classes: one padded
    ``torch.linalg.eigh`` (eigenvectors too), dλ = softmax(λ) − softmax(λ/τ) on the valid entries
    (0 on the padding), dG = V diag(dλ) Vᵀ, dX̂ = 2 dG X̂, then the adaptive-pooling backward. Used by
    the op's reference backend (custom-op implementations run below autograd)."""
    check_inputs(images, labels, tau, pool)
    if images.shape[0] == 0:
        return images.new_zeros(()), torch.zeros_like(images)
    x = pooled_features(images, pool)
    layout = class_layout(labels.to(images.device))
    gram, valid = padded_grams(x, layout)
    diag = gram.diagonal(dim1=1, dim2=2)
    if not bool(torch.isfinite(diag).all()):
        raise ValueError("densify_loss: images contain NaN or Inf (a class Gram matrix is not finite)")
    n_max = gram.shape[-1]
    shift = 1.0 + diag.sum(-1)
    gram = gram - torch.diag_embed((~valid) * shift[:, None])
    lam, vecs = torch.linalg.eigh(gram)
    keep = torch.arange(n_max, device=x.device)[None, :] >= (n_max - layout.counts)[:, None]
    lam_m = lam.masked_fill(~keep, float("-inf"))
    log_q = lam - torch.logsumexp(lam_m, dim=-1, keepdim=True)
    log_p = lam / tau - torch.logsumexp(lam_m / tau, dim=-1, keepdim=True)
    p = log_p.exp()
    loss = torch.where(keep, p * (log_p - log_q), torch.zeros_like(p)).sum()
    dlam = torch.where(keep, log_q.exp() - p, torch.zeros_like(p))
    dgram = (vecs * dlam[:, None, :]) @ vecs.transpose(1, 2)
    xp = x.new_zeros(gram.shape[0], n_max, x.shape[1]).index_put((layout.class_of, layout.slot), x[layout.order])
    dxp = 2.0 * dgram @ xp
    dx = torch.empty_like(x)
    dx[layout.order] = dxp[layout.class_of, layout.slot]
    h, w = images.shape[-2:]
    dx4 = dx.view(images.shape[0], images.shape[1], pool, pool)
    if (h, w) == (pool, pool):
        grad = dx4.clone()
    else:
        grad = torch.ops.aten._adaptive_avg_pool2d_backward(dx4, images)
    return loss, grad


def closed_form_grad(images: Tensor, labels: Tensor, tau: float = 4.0, pool: int = 32) -> Tensor:
    """d loss / d images from the closed form (per class, float64 eigh): dλ = softmax(λ) −
    softmax(λ/τ), dG = V diag(dλ) Vᵀ, dX̂ = 2 dG X̂, then the pooling backward."""
    check_inputs(images, labels, tau, pool)
    img = images.detach().requires_grad_(True)
    with torch.enable_grad():
        x = pooled_features(img, pool)
    dx = torch.zeros_like(x)
    xd = x.detach()
    for label in torch.unique(labels):
        idx = (labels == label).nonzero().flatten()
        xk = xd[idx]
        lam, v = torch.linalg.eigh(xk @ xk.T)
        dlam = torch.softmax(lam, 0) - torch.softmax(lam / tau, 0)
        dgram = v @ torch.diag(dlam) @ v.T
        dx[idx] = 2 * dgram @ xk
    (grad,) = torch.autograd.grad(x, img, dx)
    return grad
