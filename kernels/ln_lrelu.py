"""DiM critic block, Triton backend: LayerNorm over each sample's D = C·H·W elements with a per-position
affine, then LeakyReLU — forward, backward and the closed-form double backward (specs/dim-dcgm.md §A4
target (1); the math and the float64 oracle are in ddfast/reference/ln_lrelu.py).

    μ = ⟨x⟩, σ² = ⟨(x − μ)²⟩, r = 1/√(σ² + ε), x̂ = (x − μ)·r, z = γ x̂ + β, m = z > 0 ? 1 : slope, y = m·z
    backward (g):  h = g·m·γ,  dx = r·(h − ⟨h⟩ − x̂⟨h x̂⟩),  dγ = Σ_n g·m·x̂,  dβ = Σ_n g·m
    double backward (cotangents u of dx, v_γ of dγ, v_β of dβ), w = g·m·v_γ, ū = ⟨u⟩, c = ⟨u x̂⟩,
    a = ⟨h⟩, b = ⟨h x̂⟩, e = ⟨h u⟩ − a·ū, ũ = r·(u − ū − x̂·c):
        dg = m·(γ·ũ + v_γ·x̂ + v_β)
        dx = r·(w − ⟨w⟩) − r²c·(h − a) − r²b·(u − ū) + x̂·(r²(3bc − e) − r⟨w x̂⟩)
        dγ = Σ_n g·m·ũ                                       (dβ = 0: the mask is piecewise constant)

Inputs are [N, D] row views (fp32 / fp16 / bf16) with unit element stride and any row stride, passed
as explicit strides (ddfast/ops/ln_lrelu.py makes such views of contiguous, channels_last and other
dense layouts without copies); γ, β, v_γ, v_β are fp32 vectors in the same element order. All
arithmetic is fp32 (loads are converted at once); outputs are contiguous [N, D] in x's dtype.

Every sample is cut into P = ⌈D / BLOCK_D⌉ chunks (BLOCK_D = min(next_pow2(D), MAX_BLOCK_D)):

* forward: ``_fwd_stats_kernel``, grid (N, P): per chunk its mean and M2 = Σ(x − mean)² (two passes
  over the chunk held in registers); ``_fwd_kernel``, grid (N, P): each program merges its sample's P
  partials (Chan: mean = Σ c_p m_p / D, M2 = Σ M2_p + c_p (m_p − mean)²) and writes y for its chunk;
  the chunk-0 program also writes mean and rstd [N] (fp32).
* backward: ``_bwd_sums_kernel``, grid (N, P): chunk partials of Σh, Σh·x̂ -> [2, N, P];
  ``_bwd_cols_kernel``, grid (P, ⌈N / ROWS⌉): a program owns one chunk of ROWS samples, sums each
  sample's partials, writes dx, and accumulates dγ, dβ over its samples in registers; the per-program
  [⌈N / ROWS⌉, D] partials are summed by torch (fixed order: deterministic, no atomics). The column
  kernels hold 4 elements per thread (the others 8): their loops keep more values per element live.
* double backward: ``_dbl_sums_kernel`` (7 partial sums -> [7, N, P]) and ``_dbl_cols_kernel`` (dg,
  dx, and dγ partials), the same grids.

Row offsets are 64-bit (n·row_stride), offsets inside a sample int32 (D < 2³¹).
NaN/Inf propagate as in the torch composition (a non-finite element makes its sample NaN).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Widest chunk of a sample one program holds (fp32 elements): 8 per thread in the forward and the
# per-chunk sum kernels, 4 per thread in the column kernels, whose loop keeps more values per element
# live (γ, β, v_γ, v_β, the dγ accumulator, x, g, u): with 8 per thread _dbl_cols_kernel hit 128
# registers and spilled on sm_90.
MAX_BLOCK_D = 2048
ELEMS_PER_THREAD = 8
COLS_ELEMS_PER_THREAD = 4
# Partial sums of one sample are read BLOCK_P at a time.
MAX_BLOCK_P = 256
# The column kernels aim at about this many programs (ROWS samples each, at most MAX_ROWS).
TARGET_PROGRAMS = 1024
MAX_ROWS = 32

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GRID_Y_MAX = 65535


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chunk_count(p, D, BLOCK_D: tl.constexpr):
    """Elements in chunk p (fp32): BLOCK_D except for the last chunk."""
    return tl.minimum(D - p * BLOCK_D, BLOCK_D).to(tl.float32)


@triton.jit
def _row_sum(part_ptr, P, BLOCK_P: tl.constexpr):
    """Σ of P consecutive fp32 partials."""
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + offs
        acc += tl.load(part_ptr + pp, mask=pp < P, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _fwd_stats_kernel(
    x_ptr, pmean_ptr, pm2_ptr,
    D, P, s_x,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    p = tl.program_id(1)
    cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + n.to(tl.int64) * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    cnt = _chunk_count(p, D, BLOCK_D)
    mean = tl.sum(x, axis=0) / cnt
    d = tl.where(mask, x - mean, 0.0)
    tl.store(pmean_ptr + n * P + p, mean)
    tl.store(pm2_ptr + n * P + p, tl.sum(d * d, axis=0))


@triton.jit
def _fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, pmean_ptr, pm2_ptr, mean_ptr, rstd_ptr,
    D, P, s_x, slope, eps,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    n = tl.program_id(0)
    p = tl.program_id(1)
    # Chan merge of the sample's P chunk statistics (every program of the sample does the same, in order).
    offs = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + offs
        mk = pp < P
        m = tl.load(pmean_ptr + n * P + pp, mask=mk, other=0.0)
        acc += tl.where(mk, _chunk_count(pp, D, BLOCK_D) * m, 0.0)
    mean = tl.sum(acc, axis=0) / D
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pp = p0 + offs
        mk = pp < P
        m = tl.load(pmean_ptr + n * P + pp, mask=mk, other=0.0)
        m2 = tl.load(pm2_ptr + n * P + pp, mask=mk, other=0.0)
        dm = m - mean
        acc += tl.where(mk, m2 + _chunk_count(pp, D, BLOCK_D) * dm * dm, 0.0)
    var = tl.sum(acc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    if p == 0:
        tl.store(mean_ptr + n, mean)
        tl.store(rstd_ptr + n, rstd)

    cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + n.to(tl.int64) * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    z = w * ((x - mean) * rstd) + b
    y = tl.where(z > 0, z, z * slope)
    tl.store(y_ptr + n.to(tl.int64) * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_sums_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
    N, D, P, s_g, s_x, slope,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    p = tl.program_id(1)
    cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    mean = tl.load(mean_ptr + n)
    rstd = tl.load(rstd_ptr + n)
    x = tl.load(x_ptr + n.to(tl.int64) * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n.to(tl.int64) * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    xh = (x - mean) * rstd
    z = w * xh + b
    h = g * tl.where(z > 0, 1.0, slope) * w  # 0 outside the row: g and w load as 0
    NP = N * P
    tl.store(part_ptr + n * P + p, tl.sum(h, axis=0))
    tl.store(part_ptr + NP + n * P + p, tl.sum(h * xh, axis=0))


@triton.jit
def _bwd_cols_kernel(
    g_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, dx_ptr, pdw_ptr, pdb_ptr,
    N, D, P, ROWS, s_g, s_x, slope,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0)
    blk = tl.program_id(1)
    cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    inv_d = 1.0 / D
    NP = N * P
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
    n0 = blk * ROWS
    n1 = tl.minimum(n0 + ROWS, N)
    # 64-bit row pointers, advanced by one row per sample
    row0 = n0.to(tl.int64)
    x_row = x_ptr + row0 * s_x
    g_row = g_ptr + row0 * s_g
    dx_row = dx_ptr + row0 * D
    for n in range(n0, n1):
        a = _row_sum(part_ptr + n * P, P, BLOCK_P) * inv_d
        bb = _row_sum(part_ptr + NP + n * P, P, BLOCK_P) * inv_d
        mean = tl.load(mean_ptr + n)
        rstd = tl.load(rstd_ptr + n)
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        xh = (x - mean) * rstd
        z = w * xh + b
        gm = g * tl.where(z > 0, 1.0, slope)
        dx = rstd * (gm * w - a - xh * bb)
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_w += gm * xh
        acc_b += gm
        x_row += s_x
        g_row += s_g
        dx_row += D
    tl.store(pdw_ptr + blk.to(tl.int64) * D + cols, acc_w, mask=mask)
    tl.store(pdb_ptr + blk.to(tl.int64) * D + cols, acc_b, mask=mask)


@triton.jit
def _dbl_sums_kernel(
    u_ptr, g_ptr, x_ptr, vw_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
    N, D, P, s_u, s_g, s_x, slope,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0)
    p = tl.program_id(1)
    cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    mean = tl.load(mean_ptr + n)
    rstd = tl.load(rstd_ptr + n)
    row = n.to(tl.int64)
    x = tl.load(x_ptr + row * s_x + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * s_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * s_u + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    vw = tl.load(vw_ptr + cols, mask=mask, other=0.0)
    xh = (x - mean) * rstd
    z = w * xh + b
    gm = g * tl.where(z > 0, 1.0, slope)  # 0 outside the row
    h = gm * w
    wv = gm * vw
    NP = N * P
    base = part_ptr + n * P + p
    tl.store(base, tl.sum(wv, axis=0))
    tl.store(base + NP, tl.sum(wv * xh, axis=0))
    tl.store(base + 2 * NP, tl.sum(h, axis=0))
    tl.store(base + 3 * NP, tl.sum(h * xh, axis=0))
    tl.store(base + 4 * NP, tl.sum(u, axis=0))
    tl.store(base + 5 * NP, tl.sum(u * xh, axis=0))
    tl.store(base + 6 * NP, tl.sum(h * u, axis=0))


@triton.jit
def _dbl_cols_kernel(
    u_ptr, g_ptr, x_ptr, vw_ptr, vb_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr, dg_ptr, dx_ptr, pdw_ptr,
    N, D, P, ROWS, s_u, s_g, s_x, slope,
    BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    p = tl.program_id(0)
    blk = tl.program_id(1)
    cols = p * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    vw = tl.load(vw_ptr + cols, mask=mask, other=0.0)
    vb = tl.load(vb_ptr + cols, mask=mask, other=0.0)
    inv_d = 1.0 / D
    NP = N * P
    acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
    n0 = blk * ROWS
    n1 = tl.minimum(n0 + ROWS, N)
    row0 = n0.to(tl.int64)
    x_row = x_ptr + row0 * s_x
    g_row = g_ptr + row0 * s_g
    u_row = u_ptr + row0 * s_u
    dg_row = dg_ptr + row0 * D
    dx_row = dx_ptr + row0 * D
    for n in range(n0, n1):
        base = part_ptr + n * P
        mw = _row_sum(base, P, BLOCK_P) * inv_d
        mwx = _row_sum(base + NP, P, BLOCK_P) * inv_d
        a = _row_sum(base + 2 * NP, P, BLOCK_P) * inv_d
        bb = _row_sum(base + 3 * NP, P, BLOCK_P) * inv_d
        ubar = _row_sum(base + 4 * NP, P, BLOCK_P) * inv_d
        c = _row_sum(base + 5 * NP, P, BLOCK_P) * inv_d
        e = _row_sum(base + 6 * NP, P, BLOCK_P) * inv_d - a * ubar
        mean = tl.load(mean_ptr + n)
        r = tl.load(rstd_ptr + n)
        r2 = r * r
        k = r2 * (3.0 * bb * c - e) - r * mwx
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_row + cols, mask=mask, other=0.0).to(tl.float32)
        xh = (x - mean) * r
        z = w * xh + b
        m = tl.where(z > 0, 1.0, slope)
        gm = g * m
        h = gm * w
        uc = u - ubar
        ut = r * (uc - xh * c)
        dg = m * (w * ut + vw * xh + vb)
        dx = r * (gm * vw - mw) - (r2 * c) * (h - a) - (r2 * bb) * uc + xh * k
        tl.store(dg_row + cols, dg.to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_row + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_w += gm * ut
        x_row += s_x
        g_row += s_g
        u_row += s_u
        dg_row += D
        dx_row += D
    tl.store(pdw_ptr + blk.to(tl.int64) * D + cols, acc_w, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and the AOT tests)
# ----------------------------------------------------------------------------------------------
def blocks(n: int, d: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_D, P, BLOCK_P, ROWS, num_warps, num_warps of the column kernels) for N samples of D elements.

    BLOCK_D = min(next_pow2(D), MAX_BLOCK_D) with BLOCK_D / (32·ELEMS_PER_THREAD) warps (1..8), and
    BLOCK_D / (32·COLS_ELEMS_PER_THREAD) warps (1..16) in the column kernels; P = ⌈D / BLOCK_D⌉ chunks
    per sample; BLOCK_P = min(next_pow2(P), MAX_BLOCK_P); ROWS = samples per program of the column
    kernels, so that about TARGET_PROGRAMS programs run (1..MAX_ROWS)."""
    block_d = min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK_D)
    p = triton.cdiv(max(d, 1), block_d)
    block_p = min(triton.next_power_of_2(p), MAX_BLOCK_P)
    rows = max(1, min(MAX_ROWS, (n * p) // TARGET_PROGRAMS))
    warps = max(1, min(8, block_d // (32 * ELEMS_PER_THREAD)))
    warps_cols = max(1, min(16, block_d // (32 * COLS_ELEMS_PER_THREAD)))
    return block_d, p, block_p, rows, warps, warps_cols


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _check_rows(name: str, t: torch.Tensor, n: int, d: int, dtype: torch.dtype) -> None:
    if t.shape != (n, d) or t.dtype != dtype or (d > 1 and t.stride(1) != 1):
        raise ValueError(f"ln_lrelu (triton): {name} must be a [N, D] = [{n}, {d}] {dtype} row view with unit "
                         f"element stride, got {t.dtype} {tuple(t.shape)} strides {tuple(t.stride())}")


def _vec(name: str, t: torch.Tensor, d: int, device) -> torch.Tensor:
    if t.shape != (d,) or not t.is_floating_point():
        raise ValueError(f"ln_lrelu (triton): {name} must be a floating vector of length D = {d}, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32).contiguous()


def _check_grid(p: int, nb: int) -> None:
    """Grid axis 1 (chunks per sample in the forward and sum kernels, sample blocks in the column kernels)
    is limited to 65535 programs."""
    if p > _GRID_Y_MAX or nb > _GRID_Y_MAX:
        raise ValueError(f"ln_lrelu (triton): {p} chunks per sample / {nb} sample blocks exceed the grid limit "
                         f"{_GRID_Y_MAX} (D <= {_GRID_Y_MAX * MAX_BLOCK_D}, N <= {_GRID_Y_MAX * MAX_ROWS})")


def _check_x(x: torch.Tensor) -> tuple[int, int]:
    if x.dtype not in _DTYPES:
        raise TypeError(f"ln_lrelu (triton) supports float32/float16/bfloat16, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"ln_lrelu (triton) expects a [N, D >= 1] row view, got {tuple(x.shape)}")
    n, d = x.shape
    _check_rows("x", x, n, d, x.dtype)
    return n, d


def ln_lrelu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [N, D] contiguous in x's dtype, mean [N], rstd [N] fp32) of the row view x [N, D]."""
    n, d = _check_x(x)
    dev = x.device
    w, b = _vec("weight", weight, d, dev), _vec("bias", bias, d, dev)
    y = torch.empty((n, d), dtype=x.dtype, device=dev)
    mean = torch.empty(n, dtype=torch.float32, device=dev)
    rstd = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return y, mean, rstd
    block_d, p, block_p, _, warps, _ = blocks(n, d)
    _check_grid(p, 1)
    pmean = torch.empty((n, p), dtype=torch.float32, device=dev)
    pm2 = torch.empty((n, p), dtype=torch.float32, device=dev)
    _fwd_stats_kernel[(n, p)](x, pmean, pm2, d, p, x.stride(0), BLOCK_D=block_d, num_warps=warps)
    _fwd_kernel[(n, p)](x, w, b, y, pmean, pm2, mean, rstd, d, p, x.stride(0), float(slope), float(eps),
                        BLOCK_D=block_d, BLOCK_P=block_p, num_warps=warps)
    return y, mean, rstd


def ln_lrelu_backward(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      mean: torch.Tensor, rstd: torch.Tensor, slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx [N, D] contiguous in x's dtype, dweight [D], dbias [D] fp32)."""
    n, d = _check_x(x)
    _check_rows("grad", g, n, d, x.dtype)
    dev = x.device
    w, b = _vec("weight", weight, d, dev), _vec("bias", bias, d, dev)
    mean, rstd = mean.to(device=dev, dtype=torch.float32).contiguous(), rstd.to(device=dev, dtype=torch.float32).contiguous()
    dx = torch.empty((n, d), dtype=x.dtype, device=dev)
    if n == 0:
        return dx, torch.zeros(d, dtype=torch.float32, device=dev), torch.zeros(d, dtype=torch.float32, device=dev)
    block_d, p, block_p, rows, warps, warps_cols = blocks(n, d)
    nb = triton.cdiv(n, rows)
    _check_grid(p, nb)
    part = torch.empty((2, n, p), dtype=torch.float32, device=dev)
    pdw = torch.empty((nb, d), dtype=torch.float32, device=dev)
    pdb = torch.empty((nb, d), dtype=torch.float32, device=dev)
    _bwd_sums_kernel[(n, p)](g, x, w, b, mean, rstd, part, n, d, p, g.stride(0), x.stride(0), float(slope),
                             BLOCK_D=block_d, num_warps=warps)
    _bwd_cols_kernel[(p, nb)](g, x, w, b, mean, rstd, part, dx, pdw, pdb, n, d, p, rows, g.stride(0), x.stride(0),
                              float(slope), BLOCK_D=block_d, BLOCK_P=block_p, num_warps=warps_cols)
    return dx, pdw.sum(0), pdb.sum(0)


def ln_lrelu_double_backward(u: torch.Tensor, vw: torch.Tensor, vb: torch.Tensor, g: torch.Tensor, x: torch.Tensor,
                             weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                             slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dgrad, dx [N, D] contiguous in x's dtype, dweight [D] fp32) for the cotangents u of dx, vw of
    dweight and vb of dbias."""
    n, d = _check_x(x)
    _check_rows("grad", g, n, d, x.dtype)
    _check_rows("grad_dx", u, n, d, x.dtype)
    dev = x.device
    w, b = _vec("weight", weight, d, dev), _vec("bias", bias, d, dev)
    vw, vb = _vec("grad_dweight", vw, d, dev), _vec("grad_dbias", vb, d, dev)
    mean, rstd = mean.to(device=dev, dtype=torch.float32).contiguous(), rstd.to(device=dev, dtype=torch.float32).contiguous()
    dg = torch.empty((n, d), dtype=x.dtype, device=dev)
    dx = torch.empty((n, d), dtype=x.dtype, device=dev)
    if n == 0:
        return dg, dx, torch.zeros(d, dtype=torch.float32, device=dev)
    block_d, p, block_p, rows, warps, warps_cols = blocks(n, d)
    nb = triton.cdiv(n, rows)
    _check_grid(p, nb)
    part = torch.empty((7, n, p), dtype=torch.float32, device=dev)
    pdw = torch.empty((nb, d), dtype=torch.float32, device=dev)
    _dbl_sums_kernel[(n, p)](u, g, x, vw, w, b, mean, rstd, part, n, d, p, u.stride(0), g.stride(0), x.stride(0),
                             float(slope), BLOCK_D=block_d, num_warps=warps)
    _dbl_cols_kernel[(p, nb)](u, g, x, vw, vb, w, b, mean, rstd, part, dg, dx, pdw, n, d, p, rows,
                              u.stride(0), g.stride(0), x.stride(0), float(slope),
                              BLOCK_D=block_d, BLOCK_P=block_p, num_warps=warps_cols)
    return dg, dx, pdw.sum(0)
