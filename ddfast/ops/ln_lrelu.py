"""DiM critic block: LayerNorm over (C, H, W) with a per-position affine, then LeakyReLU, with fused
forward, backward and double backward (specs/dim-dcgm.md §A4 target (1)).

Three custom ops (math and oracle in ddfast/reference/ln_lrelu.py):

* ``ddfast::ln_lrelu_forward(x, weight, bias, slope, eps) -> (y, mean, rstd)``;
* ``ddfast::ln_lrelu_backward(grad, x, weight, bias, mean, rstd, slope) -> (dx, dweight, dbias)``:
  the forward's registered backward, itself differentiable, so ``torch.autograd.grad(...,
  create_graph=True)`` (WGAN-GP) records it;
* ``ddfast::ln_lrelu_double_backward(grad_dx, grad_dweight, grad_dbias, grad, x, weight, bias, mean, rstd,
  slope) -> (dgrad, dx, dweight)``: the backward's registered backward, in closed form (the slope mask
  is piecewise constant, so dbias gets no second-order term). It has no backward of its own: third
  derivatives raise.

Each is dispatched by :func:`ddfast.backend.select_backend` to ``cpu`` (``ddfast._C``,
csrc/ln_lrelu.cpp), ``triton`` (kernels/ln_lrelu.py; float64 takes the reference) or ``reference``.
Only x (no activation-sized intermediate) and the per-sample mean/rstd are saved for the backward;
the backward saves grad and x for the double backward.

Layouts: the kernels work on [N, D] row views with unit element stride. A sample's elements are taken
in x's memory order (contiguous, channels_last or any dense permutation of the normalized dims) and
γ/β are permuted to match, so those layouts are read in place (batch slices too: any sample stride);
anything else is copied once. Outputs have x's layout (:func:`_out_like`, also what the fake kernels
report), activation cotangents are brought to x's element order when they differ.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ddfast import backend
from ddfast.reference import ln_lrelu as ref

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- layouts


def _perm(x: Tensor) -> list[int]:
    """x's normalized dims (1..ndim-1) from outermost to innermost in memory (ties: logical order)."""
    return sorted(range(1, x.ndim), key=lambda d: -x.stride(d))


def _out_like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An empty tensor of x's shape, samples outermost and dense, elements in x's memory order."""
    perm = _perm(x)
    inv = [0] * x.ndim
    for i, d in enumerate([0, *perm]):
        inv[d] = i
    shape = [x.shape[0], *(x.shape[d] for d in perm)]
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device).permute(inv)


def _rows(t: Tensor, perm: Sequence[int]) -> Tensor:
    """[N, D] view of t with its elements in the order perm (copied once when not dense that way)."""
    tp = t.permute(0, *perm)
    expected = 1
    for d in range(tp.ndim - 1, 0, -1):
        if tp.shape[d] != 1 and tp.stride(d) != expected:
            tp = tp.contiguous()
            break
        expected *= tp.shape[d]
    return tp.reshape(tp.shape[0], math.prod(tp.shape[1:]))


def _unrows(flat: Tensor, like: Tensor, perm: Sequence[int]) -> Tensor:
    """The contiguous [N, D] kernel output as a tensor of like's shape and _out_like's strides."""
    inv = [0] * like.ndim
    for i, d in enumerate([0, *perm]):
        inv[d] = i
    return flat.view(like.shape[0], *(like.shape[d] for d in perm)).permute(inv)


def _vec(p: Tensor, perm: Sequence[int]) -> Tensor:
    """A per-position parameter [*normalized] as a vector in the element order perm."""
    return p.permute(*(d - 1 for d in perm)).reshape(-1)


def _unvec(v: Tensor, like: Tensor, perm: Sequence[int]) -> Tensor:
    """A vector in the order perm back to like's shape (contiguous) and dtype."""
    shape = [like.shape[d - 1] for d in perm]
    inv = [0] * like.ndim
    for i, d in enumerate(perm):
        inv[d - 1] = i
    return v.view(shape).permute(inv).to(like.dtype).contiguous()


def _match(t: Tensor, x: Tensor) -> Tensor:
    """t with _out_like(x)'s strides (the reference path's results)."""
    out = _out_like(x, t.dtype)
    if out.stride() == t.stride():
        return t
    return out.copy_(t)


# ----------------------------------------------------------------------------- backends


def _kernels():
    from ddfast.kernels import ln_lrelu as triton_ln_lrelu

    return triton_ln_lrelu


def _backend_for(x: Tensor) -> str:
    name = backend.select_backend(x.device)
    # The Triton kernels compute in fp32; float64 oracles take the reference path.
    return "reference" if name == "triton" and x.dtype == torch.float64 else name


def _impl(name: str):
    return backend.cpu_extension() if name == "cpu" else _kernels()


def _forward_impl(x: Tensor, weight: Tensor, bias: Tensor, slope: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    name = _backend_for(x)
    if name == "reference":
        y, mean, rstd = ref.forward(x, weight, bias, slope, eps)
        return _match(y, x), mean, rstd
    perm = _perm(x)
    y, mean, rstd = _impl(name).ln_lrelu_forward(_rows(x, perm), _vec(weight, perm), _vec(bias, perm), slope, eps)
    return _unrows(y, x, perm), mean, rstd


def _backward_impl(g: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                   slope: float) -> tuple[Tensor, Tensor, Tensor]:
    name = _backend_for(x)
    g = g.to(x.dtype)
    if name == "reference":
        dx, dw, db = ref.backward(g, x, weight, bias, mean, rstd, slope)
        return _match(dx, x), dw.contiguous(), db.contiguous()
    perm = _perm(x)
    dx, dw, db = _impl(name).ln_lrelu_backward(_rows(g, perm), _rows(x, perm), _vec(weight, perm), _vec(bias, perm),
                                              mean, rstd, slope)
    return _unrows(dx, x, perm), _unvec(dw, weight, perm), _unvec(db, bias, perm)


def _double_backward_impl(u: Tensor, vw: Tensor, vb: Tensor, g: Tensor, x: Tensor, weight: Tensor, bias: Tensor,
                          mean: Tensor, rstd: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    name = _backend_for(x)
    g, u = g.to(x.dtype), u.to(x.dtype)
    if name == "reference":
        dg, dx, dw = ref.double_backward(u, vw, vb, g, x, weight, bias, mean, rstd, slope)
        return _match(dg, x), _match(dx, x), dw.contiguous()
    perm = _perm(x)
    dg, dx, dw = _impl(name).ln_lrelu_double_backward(
        _rows(u, perm), _vec(vw, perm), _vec(vb, perm), _rows(g, perm), _rows(x, perm), _vec(weight, perm),
        _vec(bias, perm), mean, rstd, slope)
    return _unrows(dg, x, perm), _unrows(dx, x, perm), _unvec(dw, weight, perm)


# ----------------------------------------------------------------------------- custom ops


def _stat_dtype(x: Tensor) -> torch.dtype:
    return ref.compute_dtype(x)


@torch.library.custom_op("ddfast::ln_lrelu_forward", mutates_args=())
def ln_lrelu_forward(x: Tensor, weight: Tensor, bias: Tensor, slope: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y with x's shape, dtype and layout; mean [N], rstd [N] in float32 (float64 for float64 x)) for
    x [N, *normalized_shape]."""
    ref.check_inputs(x, weight, bias, eps)
    if x.ndim != weight.ndim + 1:
        raise ValueError(f"ln_lrelu_forward expects x [N, *normalized_shape], got {tuple(x.shape)} for {tuple(weight.shape)}")
    return _forward_impl(x, weight, bias, slope, eps)


@ln_lrelu_forward.register_fake
def _(x, weight, bias, slope, eps):
    n = x.shape[0]
    return _out_like(x), x.new_empty(n, dtype=_stat_dtype(x)), x.new_empty(n, dtype=_stat_dtype(x))


@torch.library.custom_op("ddfast::ln_lrelu_backward", mutates_args=())
def ln_lrelu_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                      slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dx like x, dweight like weight, dbias like bias) for the cotangent grad of y."""
    return _backward_impl(grad, x, weight, bias, mean, rstd, slope)


@ln_lrelu_backward.register_fake
def _(grad, x, weight, bias, mean, rstd, slope):
    return _out_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format), \
        torch.empty_like(bias, memory_format=torch.contiguous_format)


@torch.library.custom_op("ddfast::ln_lrelu_double_backward", mutates_args=())
def ln_lrelu_double_backward(grad_dx: Tensor, grad_dweight: Tensor, grad_dbias: Tensor, grad: Tensor, x: Tensor,
                             weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                             slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dgrad like x, dx like x, dweight like weight): the backward's vector-Jacobian product."""
    return _double_backward_impl(grad_dx, grad_dweight, grad_dbias, grad, x, weight, bias, mean, rstd, slope)


@ln_lrelu_double_backward.register_fake
def _(grad_dx, grad_dweight, grad_dbias, grad, x, weight, bias, mean, rstd, slope):
    return _out_like(x), _out_like(x), torch.empty_like(weight, memory_format=torch.contiguous_format)


def _forward_setup(ctx, inputs, output) -> None:
    x, weight, bias, slope, _ = inputs
    _, mean, rstd = output
    ctx.slope = slope
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _forward_backward(ctx, g_y: Tensor | None, _g_mean, _g_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    if g_y is None:
        return None, None, None, None, None
    dx, dw, db = ln_lrelu_backward(g_y, x, weight, bias, mean, rstd, ctx.slope)
    need = ctx.needs_input_grad
    return (dx if need[0] else None), (dw if need[1] else None), (db if need[2] else None), None, None


torch.library.register_autograd("ddfast::ln_lrelu_forward", _forward_backward, setup_context=_forward_setup)


def _backward_setup(ctx, inputs, output) -> None:
    grad, x, weight, bias, mean, rstd, slope = inputs
    ctx.slope = slope
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad, x, weight, bias, mean, rstd)


def _backward_backward(ctx, u: Tensor | None, vw: Tensor | None, vb: Tensor | None):
    grad, x, weight, bias, mean, rstd = ctx.saved_tensors
    nones = (None,) * 7
    if u is None and vw is None and vb is None:
        return nones
    u = torch.zeros_like(x) if u is None else u
    vw = torch.zeros_like(weight) if vw is None else vw
    vb = torch.zeros_like(bias) if vb is None else vb
    dg, dx, dw = ln_lrelu_double_backward(u, vw, vb, grad, x, weight, bias, mean, rstd, ctx.slope)
    need = ctx.needs_input_grad
    # ∂/∂bias is 0 (the slope mask is piecewise constant); a zero tensor, as torch's composition gives
    db = torch.zeros_like(bias, memory_format=torch.contiguous_format) if need[3] else None
    return (dg if need[0] else None), (dx if need[1] else None), (dw if need[2] else None), db, None, None, None


torch.library.register_autograd("ddfast::ln_lrelu_backward", _backward_backward, setup_context=_backward_setup)


def _no_third_derivative(ctx, *grads):
    raise RuntimeError("ln_lrelu: third derivatives are not implemented (ddfast::ln_lrelu_double_backward "
                       "has no backward)")


def _double_backward_setup(ctx, inputs, output) -> None:
    pass


torch.library.register_autograd("ddfast::ln_lrelu_double_backward", _no_third_derivative,
                                setup_context=_double_backward_setup)


# ----------------------------------------------------------------------------- functional API and module


def ln_lrelu(x: Tensor, weight: Tensor, bias: Tensor, slope: float = 0.01, eps: float = 1e-5) -> Tensor:
    """LeakyReLU(LayerNorm(x) over the trailing ``weight.ndim`` dims with per-position γ = weight, β = bias),
    i.e. ``F.leaky_relu(F.layer_norm(x, weight.shape, weight, bias, eps), slope)`` in one pass.

    x [*, *normalized_shape] of any float dtype (fp16/bf16 accumulate in fp32, float64 stays float64)
    and layout (contiguous and channels_last are read in place; the output keeps x's layout). Statistics
    are biased (population) variance over each sample's normalized elements. Differentiable w.r.t. x,
    weight and bias, twice (WGAN-GP's create_graph backward runs the fused closed-form double backward).
    NaN/Inf in a sample propagate to that sample's output; eps = 0 with a constant sample gives NaN, as
    torch does."""
    ref.check_inputs(x, weight, bias, eps)
    lead = x.shape[:x.ndim - weight.ndim]  # nn.LayerNorm's leading dims (none, or several) become one
    if len(lead) != 1:
        y, _, _ = ln_lrelu_forward(x.reshape(math.prod(lead), *weight.shape), weight, bias, float(slope), float(eps))
        return y.reshape(x.shape)
    y, _, _ = ln_lrelu_forward(x, weight, bias, float(slope), float(eps))
    return y


class LayerNormLeakyReLU(nn.Module):
    """``nn.Sequential(nn.LayerNorm(normalized_shape, eps), nn.LeakyReLU(slope))`` as one fused module
    (DiM's critic block). Parameters ``weight`` (ones) and ``bias`` (zeros) of shape normalized_shape,
    the state_dict keys of nn.LayerNorm, so a LayerNorm's state loads as is."""

    def __init__(self, normalized_shape: int | Sequence[int], slope: float = 0.01, eps: float = 1e-5,
                 device=None, dtype=None) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape = tuple(int(s) for s in shape)
        self.slope = float(slope)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return ln_lrelu(x, self.weight, self.bias, self.slope, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, slope={self.slope}, eps={self.eps}"
