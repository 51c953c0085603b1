"""K4: APM's image-update loss head with its closed-form gradient (specs/apm.md §3).

One custom op, ``ddfast::apm_loss_forward(z, labels, inv_batch, alpha, log, eps, with_grad) -> (loss, dz)``,
dispatched by :func:`ddfast.backend.select_backend` to

* ``cpu`` (``ddfast._C.apm_loss_forward``, csrc/apm_loss.cpp): one pass over the samples (OpenMP over
  sample blocks), every row of z read once, loss partials summed in a fixed order (deterministic);
* ``triton`` (kernels/apm_loss.py): one program per block of samples, the K checkpoint rows streamed
  against the teacher row held in registers, per-program loss partials summed on the host side;
* ``reference`` (ddfast/reference/apm_loss.py): the closed form in torch ops.

The loss is a scalar and z is tiny ([K+1, n, C], C = classes), so every backend writes dz in the same
pass as the loss when z requires grad, and the registered backward only scales it by the incoming
gradient (as K3 does). It traces under ``torch.compile`` (fake kernel + registered autograd).
"""
from __future__ import annotations

import torch

from ddfast import backend
from ddfast.ops._autograd import scale_by_cotangent
from ddfast.reference import apm_loss as ref

Tensor = torch.Tensor


def _backend_for(z: Tensor) -> str:
    name = backend.select_backend(z.device)
    # The Triton kernel computes in fp32; float64 oracles take the reference path.
    return "reference" if name == "triton" and z.dtype == torch.float64 else name


def _forward_impl(z: Tensor, labels: Tensor, inv_batch: float, alpha: float, log: bool, eps: float, with_grad: bool) -> tuple[Tensor, Tensor]:
    name = _backend_for(z)
    if name == "cpu":
        return tuple(backend.cpu_extension().apm_loss_forward(z, labels.to("cpu"), inv_batch, alpha, log, eps, with_grad))
    if name == "triton":
        from ddfast.kernels import apm_loss as triton_apm_loss

        return triton_apm_loss.apm_loss_forward(z, labels, inv_batch, alpha, log, eps, with_grad)
    loss, grad = ref.apm_loss_and_grad(z, labels, inv_batch, alpha, log, eps)
    return loss, grad if with_grad else z.new_empty(0)


@torch.library.custom_op("ddfast::apm_loss_forward", mutates_args=())
def apm_loss_forward(z: Tensor, labels: Tensor, inv_batch: float, alpha: float, log: bool, eps: float, with_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss: 0-dim float32 (float64 for float64 z), dz: dloss/dz in z's dtype, contiguous, or empty without with_grad)."""
    ref.check_label_range(labels, z.shape[2])
    return _forward_impl(z, labels, inv_batch, alpha, log, eps, with_grad)


@apm_loss_forward.register_fake
def _(z, labels, inv_batch, alpha, log, eps, with_grad):
    loss = z.new_empty((), dtype=ref.compute_dtype(z))
    return loss, torch.empty_like(z, memory_format=torch.contiguous_format) if with_grad else z.new_empty(0)


def _setup_context(ctx, inputs, output) -> None:
    ctx.with_grad = inputs[-1]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1])


def _backward(ctx, g_loss: Tensor | None, g_grad: Tensor | None):
    (grad,) = ctx.saved_tensors
    if not ctx.with_grad:
        raise RuntimeError("apm_loss_forward was called with with_grad=False; it cannot be differentiated")
    nones = (None,) * 6
    if g_loss is None:
        return (None, *nones)
    return (scale_by_cotangent(grad, g_loss), *nones)


torch.library.register_autograd("ddfast::apm_loss_forward", _backward, setup_context=_setup_context)


def apm_loss(z: Tensor, labels: Tensor, batch_size: float | None = None, alpha: float = 0.1, log: bool = False, eps: float = 1e-8) -> Tensor:
    """APM's image-update loss of n samples: (1/B) Σ_i [Σ_k φ(‖z[k+1, i] − z[0, i]‖₁) + α·CE(z[0, i], y_i)].

    z: [K+1, n, C] logits (z[0] the teacher, z[1:] the K student checkpoints), any float dtype, layout
    or strides; labels: [n] integer classes; ``batch_size`` B: the global batch the 1/B weighting uses
    (default n), so segments of one batch sum to its loss; ``log``: φ(d) = −log(d + eps) (the paper)
    instead of −d/C (the official code). Differentiable w.r.t. z (closed form, one pass). Returns a
    0-dim float32 tensor (float64 for float64 z)."""
    batch = float(batch_size) if batch_size is not None else float(max(z.shape[1], 1)) if z.ndim == 3 else 1.0
    ref.check_inputs(z, labels, batch, alpha, eps)
    with_grad = bool(z.requires_grad and torch.is_grad_enabled())
    loss, _ = apm_loss_forward(z, labels, 1.0 / batch, float(alpha), bool(log), float(eps), with_grad)
    return loss
