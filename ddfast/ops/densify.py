"""K3: G-VBSM Gram-eigen data densification loss (DESIGN §4 K3), every class of the batch in one call.

    loss = Σ_k KL( sg(softmax(λ_k/τ)) ‖ softmax(λ_k) ),   λ_k = eig(X̂_k X̂_kᵀ),
    X̂ = adaptive_avg_pool2d(images, pool×pool).flatten(1)

One custom op, ``ddfast::densify_forward(images, labels, tau, pool, with_grad) -> (loss, dimages)``,
dispatched by :func:`ddfast.backend.select_backend` to

* ``cpu`` (``ddfast._C.densify_forward``, csrc/densify.cpp): work items over all classes (OpenMP for
  large batches), Gram accumulation in float64, float64 eigensolves: classes of >= 9 images through
  direct LAPACK ``dsyevd`` calls spread over the threads (6x faster than Jacobi at n = 50 on a CPU
  core), smaller ones through the one-sided parallel-order Jacobi solver (csrc/jacobi.h, shared with
  the CUDA kernel); dX̂ = 2·dG·X̂ as single-threaded BLAS GEMMs over blocks of class rows, each followed
  by its pooling backward while in cache; outputs from the page-resident buffer cache;
  ``DDFAST_DENSIFY_ISA=base`` selects the portable path (no AVX2 kernels, ATen GEMM and eigh);
* ``triton`` (kernels/densify.py): pooling, Gram matrices and dX̂ = 2·dG·X̂ in Triton kernels, the small
  eigensolve with ``torch.linalg.eigh`` in float64 (or the CUDA Jacobi kernel of csrc/densify_cuda.cu
  when a CUDA build of the extension provides it);
* ``reference`` (ddfast/reference/densify.py): one padded batched ``torch.linalg.eigh`` and the closed
  form (custom-op implementations run below autograd; ``ref.densify_loss`` is the autograd version).

The loss is a scalar, so every backend computes d loss / d images in the same call when the images
require grad (dλ = softmax(λ) − softmax(λ/τ), dG = V·diag(dλ)·Vᵀ, dX̂ = 2·dG·X̂, pooling backward) and
the registered backward only multiplies it by the incoming gradient: no eigenvectors, Gram matrices or
pooled copies are kept between forward and backward (the same trick as Liger-Kernel's fused losses).
It is registered with ``torch.library`` (fake kernel + autograd), so it traces under ``torch.compile``.

Errors: NaN/Inf images raise ValueError (never a hang: the Jacobi iteration is bounded and checks its
input first). A class whose Jacobi iteration reaches its sweep limit gives a RuntimeWarning (the result
of the last sweep is used; :func:`jacobi_eigh` returns the per-matrix status); LAPACK failures raise.
"""
from __future__ import annotations

import warnings

import torch

from ddfast import backend
from ddfast.reference import densify as ref

Tensor = torch.Tensor

MAX_SWEEPS = 40


def _compute_dtype(images: Tensor) -> torch.dtype:
    return torch.float64 if images.dtype == torch.float64 else torch.float32


def _backend_for(images: Tensor) -> str:
    name = backend.select_backend(images.device)
    # The Triton kernels compute in fp32 (+ fp64 accumulation); float64 oracles take the reference.
    return "reference" if name == "triton" and images.dtype == torch.float64 else name


def _reference_forward(images: Tensor, labels: Tensor, tau: float, pool: int, with_grad: bool) -> tuple[Tensor, Tensor]:
    # custom-op implementations run below autograd: the reference backend uses the batched closed form
    dtype = _compute_dtype(images)
    x = images.detach().to(dtype)
    if not with_grad:
        return ref.densify_loss(x, labels, tau, pool).to(dtype), images.new_empty(0)
    loss, grad = ref.densify_loss_and_grad(x, labels, tau, pool)
    return loss.to(dtype), grad.to(images.dtype)


def _warn_not_converged(status: Tensor) -> None:
    bad = int((status == -1).sum())
    if bad:
        warnings.warn(
            f"densify_loss: the Jacobi eigensolver did not converge within {MAX_SWEEPS} sweeps for {bad} class(es); "
            "their last iterate was used", RuntimeWarning, stacklevel=3,
        )


def _forward_impl(images: Tensor, labels: Tensor, tau: float, pool: int, with_grad: bool) -> tuple[Tensor, Tensor]:
    name = _backend_for(images)
    if name == "cpu":
        loss, grad, status = backend.cpu_extension().densify_forward(
            images, labels.to("cpu"), float(tau), int(pool), bool(with_grad), MAX_SWEEPS)
        _warn_not_converged(status)
        return loss, grad
    if name == "triton":
        from ddfast.kernels import densify as triton_densify

        layout = ref.class_layout(labels.to(images.device))
        return triton_densify.densify_forward(images, layout.counts, layout.order, tau, pool, with_grad)
    return _reference_forward(images, labels, tau, pool, with_grad)


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("ddfast::densify_forward", mutates_args=())
def densify_forward(images: Tensor, labels: Tensor, tau: float, pool: int, with_grad: bool) -> tuple[Tensor, Tensor]:
    """(loss: 0-dim float32/float64, dimages: d loss / d images, or an empty tensor without with_grad)."""
    ref.check_inputs(images, labels, tau, pool)
    loss, grad = _forward_impl(images, labels, tau, pool, with_grad)
    if with_grad and (grad.shape != images.shape or grad.dtype != images.dtype):
        grad = grad.to(images.dtype).reshape(images.shape)
    return loss, grad


@densify_forward.register_fake
def _(images, labels, tau, pool, with_grad):
    loss = images.new_empty((), dtype=_compute_dtype(images))
    grad = torch.empty_like(images, memory_format=torch.contiguous_format) if with_grad else images.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output) -> None:
    images, labels, tau, pool, with_grad = inputs
    ctx.with_grad = with_grad
    ctx.set_materialize_grads(False)  # no zero-filled image-sized gradient for the unused output
    ctx.save_for_backward(output[1])


def _backward(ctx, g_loss: Tensor | None, g_grad: Tensor | None):
    (grad,) = ctx.saved_tensors
    if not ctx.with_grad:
        raise RuntimeError("densify_forward was called with with_grad=False; it cannot be differentiated")
    if g_loss is None:
        return None, None, None, None, None
    if g_loss.device.type == "cpu" and not g_loss.requires_grad and float(g_loss) == 1.0:
        return grad, None, None, None, None  # loss.backward(): the precomputed gradient as it is
    return grad * g_loss.to(grad.dtype), None, None, None, None


torch.library.register_autograd("ddfast::densify_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- functional API


def densify_loss(images: Tensor, labels: Tensor, tau: float = 4.0, pool: int = 32) -> Tensor:
    """G-VBSM data-densification loss of a batch: Σ over the classes present in ``labels`` of
    KL(sg(softmax(λ/τ)) ‖ softmax(λ)), λ = eigenvalues of the class Gram matrix of the pooled images.

    images: [B, C, H, W] float (any layout); labels: [B] integer class ids in any order, any class
    sizes (classes with one image contribute 0). Differentiable w.r.t. images. Returns a 0-dim float32
    tensor (float64 for float64 images). NaN/Inf images raise ValueError."""
    with_grad = bool(images.requires_grad and torch.is_grad_enabled())
    loss, _ = densify_forward(images, labels, float(tau), int(pool), with_grad)
    return loss


def jacobi_eigh(a: Tensor, max_sweeps: int = MAX_SWEEPS, lanes: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """The CPU build of the batched Jacobi eigensolver (csrc/jacobi.h) in a's precision: a [..., n, n]
    symmetric -> (eigenvalues ascending [..., n], eigenvectors as columns [..., n, n], status [...]:
    sweeps used, -1 not converged, -2 non-finite input). ``lanes`` > 1 runs the GPU kernel's work split."""
    ext = backend.cpu_extension()
    if ext is None:
        raise RuntimeError("jacobi_eigh needs the compiled ddfast._C extension")
    return ext.jacobi_eigh(a, max_sweeps, 0.0, lanes)
