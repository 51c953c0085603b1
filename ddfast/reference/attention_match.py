"""K2 reference: batched multi-layer attention matching with per-class means (DESIGN §4 K2,
specs/d2m-datadam-k2.md §3), in plain PyTorch (float64 when the features are float64).

For each layer l and sample n (spatial mode; channel mode swaps the roles of channels and positions):

    a_n[s] = Σ_c |F_n[c, s]|^p,   r_n = max(‖a_n‖₂, eps),   â_n = a_n / r_n      (F.normalize)
    L = Σ_l w_l Σ_k ‖mean_{real, k} â − mean_{syn, k} â‖² + w_e Σ_k ‖mean_{real, k} e − mean_{syn, k} e‖²

over the classes k present on both sides (ragged classes, labels in any order). :func:`attention_match`
is the autograd form; :func:`attention_match_and_grad` the closed form the fused backends implement
(gradients for the synthetic side only; the real side is a constant):

    g_k = 2 w_l (μ^S_k − μ^R_k),  u_n = g_k / n^S_k,  v_n = (u_n − â_n⟨â_n, u_n⟩)/r_n  (u_n/eps when ‖a_n‖ < eps)
    ∂L/∂F_n[c, s] = p·|F_n[c, s]|^(p−1)·sgn(F_n[c, s])·v_n[s],   ∂L/∂e_n = 2 w_e (ē^S_k − ē^R_k)/n^S_k
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor
MODES = ("spatial", "channel")
EPS = 1e-12


def compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def loss_dtype(syn_feats: Sequence[Tensor], syn_emb: Tensor | None) -> torch.dtype:
    """float64 when the synthetic side (its first layer, or its embedding without layers) is float64."""
    probe = syn_feats[0] if len(syn_feats) else syn_emb
    return compute_dtype(probe) if probe is not None else torch.float32


def _reduce_dim(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return 1 if mode == "spatial" else 2


def attention(f: Tensor, p: float, mode: str) -> tuple[Tensor, Tensor]:
    """(â [N, S] or [N, C], r [N]) of features f [N, C, H, W]."""
    x = f.to(compute_dtype(f)).flatten(2)  # [N, C, S]
    a = x.abs().pow(p).sum(dim=_reduce_dim(mode))
    r = a.norm(dim=1).clamp_min(EPS)
    return a / r.unsqueeze(1), r


def class_means(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(per-class means [K, D] (0 for absent classes), counts [K]) of rows x [N, D]."""
    counts = torch.bincount(labels.long(), minlength=num_classes).to(x.dtype)
    sums = x.new_zeros(num_classes, x.shape[1]).index_add_(0, labels.long(), x)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def _num_classes(real_labels: Tensor, syn_labels: Tensor) -> int:
    top = [int(t.max()) for t in (real_labels, syn_labels) if t.numel()]
    return max(top, default=-1) + 1


def _check(real_feats: Sequence[Tensor], syn_feats: Sequence[Tensor], real_labels: Tensor, syn_labels: Tensor,
           layer_weights: Sequence[float] | None, p: float) -> None:
    if len(real_feats) != len(syn_feats):
        raise ValueError(f"real and synthetic feature lists differ in length: {len(real_feats)} vs {len(syn_feats)}")
    for l, (fr, fs) in enumerate(zip(real_feats, syn_feats)):
        if fr.ndim != 4 or fs.ndim != 4 or fr.shape[1:] != fs.shape[1:]:
            raise ValueError(f"layer {l}: features must be [N, C, H, W] with equal C, H, W on both sides, got {tuple(fr.shape)} and {tuple(fs.shape)}")
        if fr.shape[0] != real_labels.shape[0] or fs.shape[0] != syn_labels.shape[0]:
            raise ValueError(f"layer {l}: {fr.shape[0]}/{fs.shape[0]} rows but {real_labels.shape[0]}/{syn_labels.shape[0]} labels")
    if layer_weights is not None and len(layer_weights) != len(syn_feats):
        raise ValueError(f"layer_weights has {len(layer_weights)} entries for {len(syn_feats)} layers")
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")


def attention_match(
    real_feats: Sequence[Tensor], syn_feats: Sequence[Tensor], real_labels: Tensor, syn_labels: Tensor,
    p: float = 1.0, mode: str = "spatial", layer_weights: Sequence[float] | None = None,
    real_emb: Tensor | None = None, syn_emb: Tensor | None = None, emb_weight: float = 1.0,
) -> Tensor:
    """The loss by autograd-able torch ops (differentiable w.r.t. the synthetic side)."""
    _check(real_feats, syn_feats, real_labels, syn_labels, layer_weights, p)
    num_classes = _num_classes(real_labels, syn_labels)
    weights = layer_weights if layer_weights is not None else [1.0] * len(syn_feats)
    dtype = loss_dtype(syn_feats, syn_emb)
    loss = torch.zeros((), dtype=dtype)
    both = None
    for fr, fs, w in zip(real_feats, syn_feats, weights):
        mr, nr = class_means(attention(fr.detach(), p, mode)[0], real_labels, num_classes)
        ms, ns = class_means(attention(fs, p, mode)[0], syn_labels, num_classes)
        both = (nr > 0) & (ns > 0)
        loss = loss + w * (mr - ms)[both].square().sum()
    if real_emb is not None and syn_emb is not None:
        er, nr = class_means(real_emb.detach().to(dtype), real_labels, num_classes)
        es, ns = class_means(syn_emb.to(dtype), syn_labels, num_classes)
        both = (nr > 0) & (ns > 0)
        loss = loss + emb_weight * (er - es)[both].square().sum()
    return loss


def _feature_grad(fs: Tensor, a_hat: Tensor, r: Tensor, u: Tensor, p: float, mode: str) -> Tensor:
    """∂/∂F of Σ_n ⟨â_n, u_n⟩ for per-sample u [N, D], in fs's dtype."""
    small = (r <= EPS).unsqueeze(1)  # F.normalize's clamp branch: â = a/eps, dâ/da = 1/eps
    v = torch.where(small, u / EPS, (u - a_hat * (a_hat * u).sum(1, keepdim=True)) / r.unsqueeze(1))
    x = fs.to(a_hat.dtype).flatten(2)
    v = v.unsqueeze(1) if mode == "spatial" else v.unsqueeze(2)  # broadcast over the reduced axis
    # d|x|^p/dx = p·|x|^(p−1)·sgn(x), 0 at x = 0 (also for p < 1, where the power is unbounded there)
    dx = torch.sign(x) * v if p == 1 else torch.where(x != 0, p * x.abs().pow(p - 1) * torch.sign(x), 0.0) * v
    return dx.view_as(fs).to(fs.dtype)


def attention_match_and_grad(
    real_feats: Sequence[Tensor], syn_feats: Sequence[Tensor], real_labels: Tensor, syn_labels: Tensor,
    p: float = 1.0, mode: str = "spatial", layer_weights: Sequence[float] | None = None,
    real_emb: Tensor | None = None, syn_emb: Tensor | None = None, emb_weight: float = 1.0,
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """Closed form: (loss, [dF^S_l] in the features' dtypes, de^S or None)."""
    _check(real_feats, syn_feats, real_labels, syn_labels, layer_weights, p)
    num_classes = _num_classes(real_labels, syn_labels)
    weights = layer_weights if layer_weights is not None else [1.0] * len(syn_feats)
    dtype = loss_dtype(syn_feats, syn_emb)
    loss = torch.zeros((), dtype=dtype)
    grads = []
    ys = syn_labels.long()
    for fr, fs, w in zip(real_feats, syn_feats, weights):
        mr, nr = class_means(attention(fr, p, mode)[0], real_labels, num_classes)
        a_hat, r = attention(fs, p, mode)
        ms, ns = class_means(a_hat, syn_labels, num_classes)
        both = ((nr > 0) & (ns > 0)).to(dtype).unsqueeze(1)
        diff = (ms - mr) * both
        loss = loss + w * diff.square().sum()
        u = (2 * w * diff / ns.clamp_min(1).unsqueeze(1))[ys]  # [N, D]
        grads.append(_feature_grad(fs, a_hat, r, u, p, mode))
    d_emb = None
    if real_emb is not None and syn_emb is not None:
        er, nr = class_means(real_emb.to(dtype), real_labels, num_classes)
        es, ns = class_means(syn_emb.to(dtype), syn_labels, num_classes)
        diff = (es - er) * ((nr > 0) & (ns > 0)).to(dtype).unsqueeze(1)
        loss = loss + emb_weight * diff.square().sum()
        d_emb = (2 * emb_weight * diff / ns.clamp_min(1).unsqueeze(1))[ys].to(syn_emb.dtype)
    return loss, grads, d_emb


def attention_class_sums(feats: Sequence[Tensor], labels: Tensor, num_classes: int, p: float = 1.0,
                         mode: str = "spatial") -> list[Tensor]:
    """Pass 1 of the two-pass (``--segment``) form: per layer the per-class sums [K, D] (float64) of â,
    to be added over segments; the whole batch's means are sums / counts."""
    _reduce_dim(mode)
    out = []
    for f in feats:
        a_hat = attention(f, p, mode)[0].double()
        out.append(a_hat.new_zeros(num_classes, a_hat.shape[1]).index_add_(0, labels.long(), a_hat))
    return out


def attention_vjp(feats: Sequence[Tensor], labels: Tensor, class_grads: Sequence[Tensor], p: float = 1.0,
                  mode: str = "spatial") -> list[Tensor]:
    """Pass 2: per layer ∂/∂F of Σ_n ⟨â_n, u[y_n]⟩ (the features' dtype) for per-class u = ``class_grads``
    [K, D]; with u_k = ∂L/∂m^S_k / n^S_k from the global class sums this is a segment's share of ∂L/∂F."""
    _reduce_dim(mode)
    if len(class_grads) != len(feats):
        raise ValueError(f"{len(class_grads)} class gradients for {len(feats)} layers")
    grads = []
    for f, u in zip(feats, class_grads):
        a_hat, r = attention(f, p, mode)
        grads.append(_feature_grad(f, a_hat, r, u.to(a_hat.dtype)[labels.long()], p, mode))
    return grads
