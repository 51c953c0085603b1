"""K1: fused channel + patch statistics and their closed-form backward (DESIGN §4 K1).

Two custom ops carry the work, each dispatched to the reference / cpu (``ddfast._C``) / triton
backend by :func:`ddfast.backend.select_backend`:

* ``ddfast::stat_match_forward(x, patch)`` -> (channel mean, channel M2, patch mean, patch M2) in
  float64 for every input dtype: one read of x. The channel pair is always x's own; when H or W is
  not a multiple of the patch, the patch pair is that of x' = R_h·x·R_wᵀ, the official bilinear resize
  to the next multiple, which the kernels form from x on the fly (no x' tensor). M2 = Σ(x − mean)² so partial results of batch
  segments merge exactly (Chan); float64 outputs make a whole batch agree with its merged segments
  to ~1e-16, which keeps ``--segment`` runs on the whole-batch trajectory.
* ``ddfast::stat_match_backward(x, ...)`` -> dx = gμc/Nc + gσc·2(x−μc)/Nc + Rᵀ(gμp/Np + gσp·2(x'−μp)/Np):
  one read of x, one write of dx; counts are explicit so segments use the global counts
  (Nc = B·H·W of x, Np = B·C·p²).

Both are registered with ``torch.library`` (fake kernels + autograd), so :func:`moments` traces
under ``torch.compile``. Nothing activation-sized is saved besides x itself.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ddfast import backend
from ddfast.reference import stat_match as ref

Tensor = torch.Tensor


class Moments(NamedTuple):
    channel_mean: Tensor
    channel_var: Tensor
    patch_mean: Tensor | None
    patch_var: Tensor | None


# ----------------------------------------------------------------------------- backends


def _reference_forward(x: Tensor, patch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xf = x.to(ref.compute_dtype(x))
    cm = xf.mean(dim=(0, 2, 3))
    cm2 = (xf - cm.view(1, -1, 1, 1)).square().sum(dim=(0, 2, 3))
    if not patch:
        empty = xf.new_empty(0)
        return cm, cm2, empty, empty.clone()
    rows = ref.patch_view(ref.resize_to_patch_multiple(xf, patch), patch)
    pm = rows.mean(dim=1)
    return cm, cm2, pm, (rows - pm[:, None]).square().sum(dim=1)


def _pixel_map(v: Tensor, x: Tensor, patch: int) -> Tensor:
    """Per-patch vector [K] -> [1, 1, H, W] map (every pixel gets its patch's value)."""
    h, w = x.shape[-2:]
    grid = v.view(h // patch, w // patch)
    return grid.repeat_interleave(patch, 0).repeat_interleave(patch, 1).view(1, 1, h, w)


def _reference_backward(
    x: Tensor, cmean: Tensor, g_cmean: Tensor, g_cvar: Tensor, pmean: Tensor, g_pmean: Tensor, g_pvar: Tensor,
    patch: int, count_c: float, count_p: float,
) -> Tensor:
    xf = x.to(ref.compute_dtype(x))
    col = lambda v: v.to(xf.dtype).view(1, -1, 1, 1)  # noqa: E731
    dx = col(g_cmean) / count_c + col(g_cvar) * 2 * (xf - col(cmean)) / count_c
    if patch:
        xr = ref.resize_to_patch_multiple(xf, patch)
        pix = lambda v: _pixel_map(v.to(xf.dtype), xr, patch)  # noqa: E731
        dxr = pix(g_pmean) / count_p + pix(g_pvar) * 2 * (xr - pix(pmean)) / count_p
        if xr is not xf:  # the resize's adjoint Rᵀ (F.interpolate's backward): dx += R_hᵀ · dx' · R_w
            dxr = torch.ops.aten.upsample_bilinear2d_backward(dxr.contiguous(), list(xr.shape[-2:]), list(xf.shape), False, None, None)
        dx = dx + dxr
    return dx.to(x.dtype)


def _kernels():
    from ddfast.kernels import stat_match as triton_stat_match

    return triton_stat_match


def _backend_for(x: Tensor) -> str:
    name = backend.select_backend(x.device)
    # The Triton kernels compute in fp32; float64 (oracle) inputs take the reference path.
    return "reference" if name == "triton" and x.dtype == torch.float64 else name


def _forward_impl(x: Tensor, patch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    name = _backend_for(x)
    if name == "cpu":  # merges in double and returns float64 itself
        return tuple(backend.cpu_extension().stat_match_forward(x, patch))
    if name == "triton":
        out = _kernels().stat_match_forward(x, patch)
    else:
        out = _reference_forward(x, patch)
    return tuple(t.double() for t in out)


def _backward_impl(x: Tensor, *args) -> Tensor:
    name = _backend_for(x)
    if name == "cpu":
        dx = backend.cpu_extension().stat_match_backward(x, *args)
    elif name == "triton":  # the Triton kernels take fp32 vectors
        dx = _kernels().stat_match_backward(x, *(a.float() if isinstance(a, Tensor) else a for a in args))
    else:
        dx = _reference_backward(x, *args)
    return dx


# ----------------------------------------------------------------------------- custom ops


def _check(x: Tensor, patch: int) -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"stat_match expects a floating [B, C, H, W] tensor, got {x.dtype} {tuple(x.shape)}")
    if patch < 0:
        raise ValueError(f"patch size must be >= 0, got {patch}")


@torch.library.custom_op("ddfast::stat_match_forward", mutates_args=())
def stat_match_forward(x: Tensor, patch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check(x, patch)
    return _forward_impl(x, patch)


@stat_match_forward.register_fake
def _(x: Tensor, patch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dtype = torch.float64
    k = _num_patches(x, patch)
    c = x.shape[1]
    return x.new_empty(c, dtype=dtype), x.new_empty(c, dtype=dtype), x.new_empty(k, dtype=dtype), x.new_empty(k, dtype=dtype)


@torch.library.custom_op("ddfast::stat_match_backward", mutates_args=())
def stat_match_backward(
    x: Tensor, cmean: Tensor, g_cmean: Tensor, g_cvar: Tensor, pmean: Tensor, g_pmean: Tensor, g_pvar: Tensor,
    patch: int, count_c: float, count_p: float,
) -> Tensor:
    _check(x, patch)
    return _backward_impl(x, cmean, g_cmean, g_cvar, pmean, g_pmean, g_pvar, patch, count_c, count_p)


@stat_match_backward.register_fake
def _(x, cmean, g_cmean, g_cvar, pmean, g_pmean, g_pvar, patch, count_c, count_p) -> Tensor:
    return torch.empty_like(x)


def _num_patches(x: Tensor, patch: int) -> int:
    return (-(-x.shape[2] // patch)) * (-(-x.shape[3] // patch)) if patch else 0


def _counts(x: Tensor, patch: int) -> tuple[float, float]:
    b, c, h, w = x.shape
    return float(b * h * w), float(b * c * patch * patch)


def _setup_context(ctx, inputs, output) -> None:
    x, patch = inputs
    ctx.patch = patch
    ctx.save_for_backward(x, output[0], output[2])


def _input_grad(ctx, grads: tuple[Tensor | None, ...], backward) -> Tensor:
    """dx from the four statistic gradients by ``backward`` (the custom op, or its implementation in eager mode)."""
    x, cm, pm = ctx.saved_tensors
    count_c, count_p = _counts(x, ctx.patch)
    g_cm, g_cm2, g_pm, g_pm2 = (torch.zeros_like(like) if g is None else g for like, g in zip((cm, cm, pm, pm), grads))
    # d(M2)/dx = 2(x − mean): the kernel's variance gradient scaled by the count.
    return backward(x, cm, g_cm, g_cm2 * count_c, pm, g_pm, g_pm2 * count_p, ctx.patch, count_c, count_p)


def _forward_backward(ctx, g_cm: Tensor | None, g_cm2: Tensor | None, g_pm: Tensor | None, g_pm2: Tensor | None):
    return _input_grad(ctx, (g_cm, g_cm2, g_pm, g_pm2), stat_match_backward), None


torch.library.register_autograd("ddfast::stat_match_forward", _forward_backward, setup_context=_setup_context)


class _EagerStatMatch(torch.autograd.Function):
    """The custom op's kernels and gradient without torch.library's per-call dispatch, for eager mode: that
    dispatch costs more than the kernels themselves on the small planes of G-VBSM's hooks (about 0.2 ms per
    forward + backward against tens of µs), hundreds of times per recover iteration. Under torch.compile
    :func:`moments` calls the registered custom op instead."""

    @staticmethod
    def forward(ctx, x: Tensor, patch: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        _check(x, patch)
        out = _forward_impl(x, patch)
        _setup_context(ctx, (x, patch), out)
        return out

    @staticmethod
    def backward(ctx, g_cm: Tensor, g_cm2: Tensor, g_pm: Tensor, g_pm2: Tensor) -> tuple[Tensor, None]:
        return _input_grad(ctx, (g_cm, g_cm2, g_pm, g_pm2), _backward_impl), None


# ----------------------------------------------------------------------------- functional API


def moments(x: Tensor, patch: int | None = None, dtype: torch.dtype | None = None) -> Moments:
    """Per-channel and per-patch mean and (population) variance of x [B, C, H, W] in one read.

    ``patch=None`` (BN layers) gives only the channel pair. Inputs of any float dtype, layout or
    strides; statistics in fp32 (fp64 for fp64 inputs) unless ``dtype`` asks otherwise (the kernels
    produce float64; ``dtype=torch.float64`` keeps it, as :class:`ddfast.StatMatcher` does).
    Differentiable: the backward writes dx in one pass. The channel pair is always that of x;
    when H or W is not a multiple of ``patch`` the patch pair is that of x bilinearly resized to
    the next multiple (the official G-VBSM hook), formed inside the kernels (never materialised)."""
    op = stat_match_forward if torch.compiler.is_compiling() else _EagerStatMatch.apply
    cm, cm2, pm, pm2 = op(x, patch or 0)
    count_c, count_p = _counts(x, patch or 0)
    out = dtype or ref.compute_dtype(x)
    if not patch:
        return Moments(cm.to(out), (cm2 / count_c).to(out), None, None)
    return Moments(cm.to(out), (cm2 / count_c).to(out), pm.to(out), (pm2 / count_p).to(out))


@dataclasses.dataclass
class MomentSums:
    """Mergeable partial statistics of one layer over part of a batch (float64, Chan's formula)."""

    count_c: float
    mean_c: Tensor
    m2_c: Tensor
    count_p: float
    mean_p: Tensor | None
    m2_p: Tensor | None

    def merge(self, other: MomentSums) -> MomentSums:
        def chan(na, ma, sa, nb, mb, sb):
            n = na + nb
            delta = mb - ma
            return n, ma + delta * (nb / n), sa + sb + delta.square() * (na * nb / n)

        count_c, mean_c, m2_c = chan(self.count_c, self.mean_c, self.m2_c, other.count_c, other.mean_c, other.m2_c)
        if self.mean_p is None:
            return MomentSums(count_c, mean_c, m2_c, 0.0, None, None)
        count_p, mean_p, m2_p = chan(self.count_p, self.mean_p, self.m2_p, other.count_p, other.mean_p, other.m2_p)
        return MomentSums(count_c, mean_c, m2_c, count_p, mean_p, m2_p)

    def finalize(self, dtype: torch.dtype = torch.float32) -> Moments:
        if self.mean_p is None:
            return Moments(self.mean_c.to(dtype), (self.m2_c / self.count_c).to(dtype), None, None)
        return Moments(
            self.mean_c.to(dtype), (self.m2_c / self.count_c).to(dtype),
            self.mean_p.to(dtype), (self.m2_p / self.count_p).to(dtype),
        )


@torch.no_grad()
def moment_sums(x: Tensor, patch: int | None = None) -> MomentSums:
    """Partial statistics of x for accumulation across segments or a whole dataset (no grad)."""
    op = stat_match_forward if torch.compiler.is_compiling() else _EagerStatMatch.apply
    cm, cm2, pm, pm2 = op(x, patch or 0)
    count_c, count_p = _counts(x, patch or 0)
    if not patch:
        return MomentSums(count_c, cm.double(), cm2.double(), 0.0, None, None)
    return MomentSums(count_c, cm.double(), cm2.double(), count_p, pm.double(), pm2.double())


class _StatGradSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, stats: MomentSums, grads: tuple[Tensor, Tensor, Tensor | None, Tensor | None], patch: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.stats, ctx.grads, ctx.patch = stats, grads, patch
        # float64 so a loss weight reaches the backward unrounded, as in a whole-batch float64 loss
        return x.new_zeros((), dtype=torch.float64)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        (x,) = ctx.saved_tensors
        s, (g_cm, g_cv, g_pm, g_pv) = ctx.stats, ctx.grads
        # float64 vectors, as a whole-batch backward receives them: the same dx bit for bit.
        dtype = torch.float64
        empty = x.new_empty(0, dtype=dtype)
        cast = lambda t: empty if t is None else t.to(device=x.device, dtype=dtype) * g_out  # noqa: E731
        dx = stat_match_backward(
            x, s.mean_c.to(x.device, dtype), cast(g_cm), cast(g_cv),
            empty if s.mean_p is None else s.mean_p.to(x.device, dtype), cast(g_pm), cast(g_pv),
            ctx.patch, s.count_c, s.count_p,
        )
        return dx, None, None, None


def stat_grad_surrogate(
    x: Tensor, stats: MomentSums, grads: tuple[Tensor, Tensor, Tensor | None, Tensor | None], patch: int | None = None
) -> Tensor:
    """A zero-valued scalar whose gradient w.r.t. this segment's x is the exact closed-form
    gradient of a loss on the *global* statistics ``stats`` (from :func:`moment_sums` merged over
    all segments) given ∂ℓ/∂(μc, σ²c, μp, σ²p) = ``grads``. Add it to the segment's loss (§5)."""
    return _StatGradSurrogate.apply(x, stats, grads, patch or 0)
