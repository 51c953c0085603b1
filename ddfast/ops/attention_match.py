"""K2: batched multi-layer attention matching with per-class means (DESIGN §4 K2, specs/d2m-datadam-k2.md §3).

One custom op, ``ddfast::attention_match_forward(real_feats, syn_feats, real_labels, syn_labels, p, mode,
layer_weights, real_emb, syn_emb, emb_weight, with_grad) -> (loss, d_syn_feats, d_syn_emb)``: the loss and,
when the synthetic side requires grad, its closed-form gradient in the same call (the real side is a
constant: no graph, no gradient). The registered backward only scales the precomputed gradients, so
nothing besides them is kept between forward and backward; the op traces under ``torch.compile``.

Backends, picked by :func:`ddfast.backend.select_backend`:

* ``cpu`` (``ddfast._C.attention_match_forward``, csrc/attention_match.cpp);
* ``triton`` (kernels/attention_match.py);
* ``reference`` (ddfast/reference/attention_match.py): the vectorised closed form over all layers and classes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ddfast import backend
from ddfast.ops._autograd import scale_by_cotangent
from ddfast.reference import attention_match as ref

Tensor = torch.Tensor


def _backend_for(t: Tensor) -> str:
    name = backend.select_backend(t.device)
    # The Triton kernels compute in fp32; float64 oracles take the reference path.
    return "reference" if name == "triton" and t.dtype == torch.float64 else name


def _forward_impl(real_feats, syn_feats, real_labels, syn_labels, p, mode, layer_weights, real_emb, syn_emb, emb_weight, with_grad):
    probe = syn_feats[0] if syn_feats else (syn_emb if syn_emb is not None else real_labels)
    name = _backend_for(probe)
    num_classes = ref._num_classes(real_labels, syn_labels)
    if name == "cpu":
        loss, grads, d_emb = backend.cpu_extension().attention_match_forward(
            real_feats, syn_feats, real_labels.to("cpu"), syn_labels.to("cpu"), num_classes, p, mode == "spatial",
            layer_weights, real_emb, syn_emb, emb_weight, with_grad)
        return loss, list(grads), d_emb
    if name == "triton":
        from ddfast.kernels import attention_match as triton_attention_match

        return triton_attention_match.attention_match_forward(
            real_feats, syn_feats, real_labels, syn_labels, num_classes, p, mode == "spatial",
            layer_weights, real_emb, syn_emb, emb_weight, with_grad)
    loss, grads, d_emb = ref.attention_match_and_grad(real_feats, syn_feats, real_labels, syn_labels, p, mode, layer_weights,
                                                      real_emb, syn_emb, emb_weight)
    if not with_grad:
        return loss, [f.new_empty(0) for f in syn_feats], loss.new_empty(0)
    return loss, grads, d_emb if d_emb is not None else loss.new_empty(0)


@torch.library.custom_op("ddfast::attention_match_forward", mutates_args=())
def attention_match_forward(
    real_feats: list[Tensor], syn_feats: list[Tensor], real_labels: Tensor, syn_labels: Tensor, p: float, mode: str,
    layer_weights: list[float], real_emb: Tensor | None, syn_emb: Tensor | None, emb_weight: float, with_grad: bool,
) -> tuple[Tensor, list[Tensor], Tensor]:
    return _forward_impl(real_feats, syn_feats, real_labels, syn_labels, p, mode, layer_weights, real_emb, syn_emb, emb_weight, with_grad)


@attention_match_forward.register_fake
def _(real_feats, syn_feats, real_labels, syn_labels, p, mode, layer_weights, real_emb, syn_emb, emb_weight, with_grad):
    probe = syn_feats[0] if syn_feats else (syn_emb if syn_emb is not None else real_labels)
    loss = probe.new_empty((), dtype=ref.loss_dtype(syn_feats, syn_emb))
    grads = [torch.empty_like(f, memory_format=torch.contiguous_format) if with_grad else f.new_empty(0) for f in syn_feats]
    d_emb = torch.empty_like(syn_emb) if (with_grad and syn_emb is not None and real_emb is not None) else loss.new_empty(0)
    return loss, grads, d_emb


def _setup_context(ctx, inputs, output) -> None:
    ctx.with_grad = inputs[-1]
    ctx.num_layers = len(inputs[1])
    ctx.no_weights = len(inputs[6]) == 0
    ctx.has_emb = inputs[7] is not None and inputs[8] is not None
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1], output[2])


def _backward(ctx, g_loss, g_grads, g_emb):
    if not ctx.with_grad:
        raise RuntimeError("attention_match_forward was called with with_grad=False; it cannot be differentiated")
    *grads, d_emb = ctx.saved_tensors
    nones = [None] * ctx.num_layers  # the backward mirrors the tensor-list inputs
    d_syn = nones if g_loss is None else [scale_by_cotangent(g, g_loss) for g in grads]
    d_e = scale_by_cotangent(d_emb, g_loss) if (g_loss is not None and ctx.has_emb) else None
    # an empty layer_weights list is a (leafless) list in the input structure, a non-empty one a leaf
    d_weights = [] if ctx.no_weights else None
    return nones, d_syn, None, None, None, None, d_weights, None, d_e, None, None


torch.library.register_autograd("ddfast::attention_match_forward", _backward, setup_context=_setup_context)


def attention_match(
    real_feats: Sequence[Tensor], syn_feats: Sequence[Tensor], real_labels: Tensor, syn_labels: Tensor,
    p: float = 1.0, mode: str = "spatial", layer_weights: Sequence[float] | None = None,
    real_emb: Tensor | None = None, syn_emb: Tensor | None = None, emb_weight: float = 1.0,
) -> Tensor:
    """Σ_l w_l Σ_k ‖mean_{real,k} â_l − mean_{syn,k} â_l‖² + emb_weight·Σ_k ‖mean e_real,k − mean e_syn,k‖².

    Lists of per-layer features [N, C, H, W] (any number of layers and sizes), integer labels of each side
    (any order, ragged classes; a class absent on either side contributes nothing); â = attention map
    (Σ_c |F|^p per position in ``spatial`` mode, Σ over positions per channel in ``channel`` mode) with
    unit L2 norm per sample (F.normalize, eps 1e-12). Differentiable w.r.t. the synthetic features and
    embedding only. Returns a 0-dim float32 tensor (float64 for float64 features)."""
    syn = list(syn_feats)
    weights = [float(w) for w in (layer_weights if layer_weights is not None else [1.0] * len(syn))]
    ref._check(list(real_feats), syn, real_labels, syn_labels, weights, p)
    ref._reduce_dim(mode)
    with_grad = torch.is_grad_enabled() and (any(f.requires_grad for f in syn) or (syn_emb is not None and syn_emb.requires_grad))
    real = [f.detach() for f in real_feats]
    loss, _, _ = attention_match_forward(real, syn, real_labels, syn_labels, float(p), mode, weights,
                                         None if real_emb is None else real_emb.detach(), syn_emb, float(emb_weight), bool(with_grad))
    return loss


# ----------------------------------------------------------------------------- two-pass form (--segment)


def _two_pass_impl(name: str, feats, labels, extra, p, mode):
    """``name`` (attention_class_sums | attention_vjp) on the features' backend; ``extra``: num_classes or the class
    gradients (the same argument order in all three backends)."""
    chosen = _backend_for(feats[0])
    if chosen == "cpu":
        return list(getattr(backend.cpu_extension(), name)(feats, labels.to("cpu"), extra, p, mode == "spatial"))
    if chosen == "triton":
        from ddfast.kernels import attention_match as triton_attention_match

        return getattr(triton_attention_match, name)(feats, labels, extra, p, mode == "spatial")
    return getattr(ref, name)(feats, labels, extra, p, mode)


@torch.library.custom_op("ddfast::attention_class_sums", mutates_args=())
def _attention_class_sums(feats: list[Tensor], labels: Tensor, num_classes: int, p: float, mode: str) -> list[Tensor]:
    return _two_pass_impl("attention_class_sums", feats, labels, num_classes, p, mode)


@_attention_class_sums.register_fake
def _(feats, labels, num_classes, p, mode):
    return [f.new_empty((num_classes, f.shape[2] * f.shape[3] if mode == "spatial" else f.shape[1]), dtype=torch.float64)
            for f in feats]


@torch.library.custom_op("ddfast::attention_vjp", mutates_args=())
def _attention_vjp(feats: list[Tensor], labels: Tensor, class_grads: list[Tensor], p: float, mode: str) -> list[Tensor]:
    return _two_pass_impl("attention_vjp", feats, labels, class_grads, p, mode)


@_attention_vjp.register_fake
def _(feats, labels, class_grads, p, mode):
    return [torch.empty_like(f, memory_format=torch.contiguous_format) for f in feats]


def _check_two_pass(feats: Sequence[Tensor], labels: Tensor, p: float, mode: str) -> None:
    ref._reduce_dim(mode)
    if not p > 0:
        raise ValueError(f"p must be > 0, got {p}")
    for l, f in enumerate(feats):
        if f.ndim != 4 or f.shape[0] != labels.shape[0]:
            raise ValueError(f"layer {l}: features must be [N, C, H, W] with N = {labels.shape[0]} labels, got {tuple(f.shape)}")


@torch.no_grad()
def attention_class_sums(feats: Sequence[Tensor], labels: Tensor, num_classes: int, p: float = 1.0,
                         mode: str = "spatial") -> list[Tensor]:
    """Pass 1 of the two-pass form behind ``--segment``: per layer the per-class sums [K, M] (float64) of the
    unit-norm attention maps â of features [N, C, H, W]. Add them over segments; sums / counts are the
    class means :func:`attention_match` compares."""
    feats = list(feats)
    _check_two_pass(feats, labels, p, mode)
    if not feats:
        return []
    return _attention_class_sums([f.detach() for f in feats], labels, int(num_classes), float(p), mode)


class _AttentionGradSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, labels: Tensor, class_grads: list[Tensor], p: float, mode: str, *feats: Tensor) -> Tensor:
        ctx.save_for_backward(labels, *feats)
        ctx.class_grads, ctx.p, ctx.mode = class_grads, p, mode
        return feats[0].new_zeros((), dtype=torch.float64)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        labels, *feats = ctx.saved_tensors
        grads = _attention_vjp(feats, labels, [u.double() * g_out for u in ctx.class_grads], ctx.p, ctx.mode)
        return (None, None, None, None, *grads)


def attention_grad_surrogate(feats: Sequence[Tensor], labels: Tensor, class_grads: Sequence[Tensor], p: float = 1.0,
                             mode: str = "spatial") -> Tensor:
    """Pass 2: a zero-valued float64 scalar whose gradient w.r.t. each layer's features is ∂/∂F of
    Σ_n ⟨â_n, u[y_n]⟩ for per-class u = ``class_grads`` [K, M]. With u_k = ∂L/∂m^S_k / n^S_k fixed from
    the global sums of pass 1, that is this segment's exact share of ∂L/∂F for any loss L of the class
    means (K2's backward with u given). Add it to the segment's other surrogates and back-propagate."""
    feats = list(feats)
    _check_two_pass(feats, labels, p, mode)
    if len(class_grads) != len(feats):
        raise ValueError(f"{len(class_grads)} class gradients for {len(feats)} layers")
    if not feats:
        return labels.new_zeros((), dtype=torch.float64)
    return _AttentionGradSurrogate.apply(labels, [u.detach() for u in class_grads], float(p), mode, *feats)
