"""K1 Triton backend: fused channel + patch statistics of a conv/BN input and their closed-form
backward (DESIGN §4 K1).

x is [B, C, H, W] (fp32 / fp16 / bf16, any strides: NCHW, channels_last and strided views are read
in place through explicit strides). With patch size p > 0 the patch statistics are taken on
x' = R_h·x·R_wᵀ per (b, c) plane, the bilinear resize to H' × W' = (⌈H/p⌉·p) × (⌈W/p⌉·p) exactly as
``F.interpolate(x, (H', W'), mode="bilinear", align_corners=False)`` computes it (x' = x when H, W
are multiples of p). There are K = (H'/p)(W'/p) patches, k = (h'/p)(W'/p) + w'/p, and a patch
statistic is ONE scalar pooled over (all b, all c, the p×p pixels of patch k of x'). The channel
statistics are always those of x itself. x' is never stored: each x' value is formed from its 4
taps of x (exact integer tap indices and weights, ``_resize_taps``) where it is needed.

Forward (:func:`stat_match_forward`):

* stage 1 (``_stat_fwd_patch_kernel`` / ``_stat_fwd_resize_kernel`` when x' ≠ x /
  ``_stat_fwd_channel_kernel`` when p == 0), grid (batch-group × C, blocks of patches / plane
  tiles). A program owns one channel c, a group of G batch items and a tile of BLOCK_K patches ×
  BLOCK_J pixels (BLOCK_J = p² padded to a power of two, chunked when p² > TILE) — or a
  BLOCK_H × BLOCK_W tile of the plane when p == 0. Each tile's mean and centred M2 are computed
  from registers (two passes over registers, one memory read), the G batch items and pixel chunks
  are merged with Chan's formula, and the program writes one channel partial (count, mean, M2) and
  BLOCK_K patch partials. The resize kernel takes its channel partial from the x pixels at the
  tile's x' positions that lie inside H × W (x' covers x, so each x pixel is counted once).
* stage 2 (``_stat_merge_kernel``, one launch for channels and patches): merges the partials
  column-wise with Chan's formula in a fixed order (deterministic, no atomics).

Numerics: all arithmetic is fp32 on shifted data. Every channel's values are taken relative to
s_c = x[0, c, 0, 0] and every patch's relative to s_k = x[0, 0, kh·QH, kw·QW] (QH = ⌊p·H/H'⌋, = p
without a resize: patch k's first pixel or its source), so partial means are small numbers and
large-mean inputs (1000 + 1e-2·randn) keep ~1e-7 relative variance error; the shift is added back
once at the very end. Never raw Σx². x' values are interpolated from shifted taps (the weights sum
to 1). A NaN/Inf shift element is replaced by 0 (in both stages), so it only reaches the statistics
its own pixel belongs to.

NaN/Inf: NaN propagates (a NaN pixel makes its channel's mean and M2 NaN, and those of the patches
holding an x' pixel that takes it with a nonzero weight; the other statistics are unaffected).
Inf inputs give Inf/NaN statistics, as in torch; nothing raises.

Backward (:func:`stat_match_backward`) writes dx once:
    dx = g_cmean[c]/Nc + g_cvar[c]·2(x − cmean[c])/Nc
         + R_hᵀ·[g_pmean[k]/Np + g_pvar[k]·2(x' − pmean[k])/Np]·R_w
in fp32 (x − mean and x' − mean are formed explicitly, which keeps large-mean inputs accurate),
stored in x's dtype into ``torch.empty_like(x)`` (channels_last stays channels_last). Without a
resize (``_stat_bwd_patch_kernel``) R is the identity and x is read once;
``_stat_bwd_resize_kernel`` gives each program a tile of dx and walks the x' rows whose taps reach
it, applying the adjoint of the resize in registers (no atomics: deterministic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of x one program holds in registers per step (4 warps -> 8 fp32 per thread; 2048 put the
# patch kernels at ptxas's 128-register mark, mostly 64-bit addresses of the hoisted tile).
TILE = 1024
# The resize kernels' tile (x' positions per step in the forward, x pixels and tap matches in the
# backward): each element carries 4 taps and their weights.
RESIZE_TILE = 256
NUM_WARPS = 4
# Stage 1 aims for at least this many programs before it groups batch items per program.
TARGET_PROGRAMS = 2048
MAX_GROUP = 16
# Stage 2 tile: BLOCK_R partial rows × BLOCK_N statistics (columns) per step.
MERGE_BLOCK_R = 64
MERGE_BLOCK_N = 16

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: merge (count, mean, M2) of two disjoint sets (scalars or vectors)."""
    n = n_a + n_b
    w = n_b / tl.where(n > 0, n, 1.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    m2 = m2_a + m2_b + delta * delta * (n_a * w)
    return n, mean, m2


@triton.jit
def _finite_or_zero(s):
    """A shift must not carry a NaN/Inf of its element into statistics it does not belong to."""
    return tl.where(tl.abs(s) < float("inf"), s, 0.0)


@triton.jit
def _stat_fwd_patch_kernel(
    x_ptr,
    part_c_ptr,  # [3, NBG*NB, C] fp32: count, mean (relative to s_c), M2
    part_p_ptr,  # [3, NBG*C, K] fp32: count, mean (relative to s_k), M2
    B, C, K, KW, G,
    stride_b, stride_c, stride_h, stride_w,
    part_c_plane, part_p_plane,
    P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_kblocks = tl.num_programs(1)
    c = pid_bc % C
    bg = pid_bc // C

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    kh = offs_k // KW
    kw = offs_k - kh * KW

    # Shifts: s_c = x[0, c, 0, 0] (shared by every program of channel c), s_k = x[0, 0, patch k's
    # first pixel] (shared by every program of patch k).
    s_c = _finite_or_zero(tl.load(x_ptr + c.to(tl.int64) * stride_c).to(tl.float32))
    s_k = _finite_or_zero(
        tl.load(x_ptr + kh * (P * stride_h) + kw * (P * stride_w), mask=mask_k, other=0.0).to(tl.float32))

    n_acc = 0.0
    mean_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j0 in tl.static_range(0, P * P, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < P * P
        ph = offs_j // P
        pw = offs_j % P
        off = (kh[:, None] * P + ph[None, :]) * stride_h + (kw[:, None] * P + pw[None, :]) * stride_w
        mask_kj = mask_k[:, None] & mask_j[None, :]
        cnt = tl.minimum(P * P - j0, BLOCK_J).to(tl.float32)
        for i in range(0, G):
            b = bg * G + i
            valid = b < B
            m = mask_kj & valid
            base = x_ptr + b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c
            xv = tl.load(base + off, mask=m, other=0.0).to(tl.float32)
            xr = tl.where(m, xv - s_c, 0.0)
            mean_t = tl.sum(xr, axis=1) / cnt
            d = tl.where(m, xr - mean_t[:, None], 0.0)
            m2_t = tl.sum(d * d, axis=1)
            n_t = tl.where(valid, cnt, 0.0)
            n_acc, mean_acc, m2_acc = _chan_merge(n_acc, mean_acc, m2_acc, n_t, mean_t, m2_t)

    # Patch partials (count n_acc each), means re-expressed relative to s_k.
    p_off = (bg * C + c).to(tl.int64) * K + offs_k
    tl.store(part_p_ptr + p_off, tl.zeros([BLOCK_K], dtype=tl.float32) + n_acc, mask=mask_k)
    tl.store(part_p_ptr + part_p_plane + p_off, mean_acc + (s_c - s_k), mask=mask_k)
    tl.store(part_p_ptr + 2 * part_p_plane + p_off, m2_acc, mask=mask_k)

    # Channel partial: merge this tile's patches (equal counts n_acc) relative to s_c.
    nk = tl.minimum(K - pid_k * BLOCK_K, BLOCK_K).to(tl.float32)
    mean_c = tl.sum(tl.where(mask_k, mean_acc, 0.0), axis=0) / nk
    dm = tl.where(mask_k, mean_acc - mean_c, 0.0)
    m2_c = tl.sum(tl.where(mask_k, m2_acc, 0.0), axis=0) + n_acc * tl.sum(dm * dm, axis=0)
    c_off = (bg * n_kblocks + pid_k).to(tl.int64) * C + c
    tl.store(part_c_ptr + c_off, nk * n_acc)
    tl.store(part_c_ptr + part_c_plane + c_off, mean_c)
    tl.store(part_c_ptr + 2 * part_c_plane + c_off, m2_c)


@triton.jit
def _resize_taps(dst, in_size, out_size):
    """Bilinear taps of output index dst as F.interpolate(align_corners=False) takes them, in exact
    integer arithmetic: src = ((2·dst + 1)·in − out) / (2·out) clamped at 0 -> (lo, hi, weight of hi).
    hi is −1 where its weight is 0 (identity dims, exact hits), so no weight-0 tap is read and a
    NaN reaches only the x' pixels that really depend on it."""
    num = tl.maximum((2 * dst + 1) * in_size - out_size, 0)
    lo = num // (2 * out_size)
    rem = num - lo * (2 * out_size)
    hi = tl.where(rem > 0, tl.minimum(lo + 1, in_size - 1), -1)
    return lo, hi, rem.to(tl.float32) / (2 * out_size)


@triton.jit
def _stat_fwd_resize_kernel(
    x_ptr,
    part_c_ptr,  # [3, NBG*NB, C] fp32: count, mean (relative to s_c), M2 — of x
    part_p_ptr,  # [3, NBG*C, K] fp32: count, mean (relative to s_k), M2 — of x'
    B, C, H, W, HR, WR, K, KW, QH, QW, G,
    stride_b, stride_c, stride_h, stride_w,
    part_c_plane, part_p_plane,
    P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """_stat_fwd_patch_kernel on x' = the bilinear resize of x to HR × WR: every x' value is formed
    from its 4 taps of x. The channel partial is x's own: the tile's x' positions that lie inside
    H × W (x' covers x, so the programs of a plane see every pixel of x exactly once)."""
    pid_bc = tl.program_id(0)
    pid_k = tl.program_id(1)
    n_kblocks = tl.num_programs(1)
    c = pid_bc % C
    bg = pid_bc // C

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    kh = offs_k // KW
    kw = offs_k - kh * KW

    # s_k = x[0, 0, kh·QH, kw·QW]: QH = ⌊p·H/HR⌋ ≥ 1 puts it near the source of patch k's first pixel.
    s_c = _finite_or_zero(tl.load(x_ptr + c.to(tl.int64) * stride_c).to(tl.float32))
    s_k = _finite_or_zero(
        tl.load(x_ptr + kh * (QH * stride_h) + kw * (QW * stride_w), mask=mask_k, other=0.0).to(tl.float32))

    nc_acc = 0.0
    meanc_acc = 0.0
    m2c_acc = 0.0
    n_acc = 0.0
    mean_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    m2_acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j0 in tl.static_range(0, P * P, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < P * P
        rows = kh[:, None] * P + (offs_j // P)[None, :]
        cols = kw[:, None] * P + (offs_j % P)[None, :]
        mask_kj = mask_k[:, None] & mask_j[None, :]
        mask_x = mask_kj & (rows < H) & (cols < W)
        lo_h, hi_h, f_h = _resize_taps(rows, H, HR)
        lo_w, hi_w, f_w = _resize_taps(cols, W, WR)
        cnt = tl.minimum(P * P - j0, BLOCK_J).to(tl.float32)
        cnt_x = tl.sum(tl.sum(mask_x.to(tl.float32), axis=1), axis=0)
        for i in range(0, G):
            b = bg * G + i
            valid = b < B
            m = mask_kj & valid
            mx = mask_x & valid
            base = x_ptr + b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c

            xv = tl.load(base + rows * stride_h + cols * stride_w, mask=mx, other=0.0).to(tl.float32)
            xr = tl.where(mx, xv - s_c, 0.0)
            mean_t = tl.sum(tl.sum(xr, axis=1), axis=0) / tl.maximum(cnt_x, 1.0)
            d = tl.where(mx, xr - mean_t, 0.0)
            m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
            n_t = tl.where(valid, cnt_x, 0.0)
            nc_acc, meanc_acc, m2c_acc = _chan_merge(nc_acc, meanc_acc, m2c_acc, n_t, mean_t, m2_t)

            # x' − s_c from shifted taps (the weights sum to 1), so large means do not cancel.
            row_lo = base + lo_h * stride_h
            row_hi = base + hi_h * stride_h
            m_hi = m & (hi_h >= 0)
            t_ll = tl.load(row_lo + lo_w * stride_w, mask=m, other=0.0).to(tl.float32) - s_c
            t_lh = tl.load(row_lo + hi_w * stride_w, mask=m & (hi_w >= 0), other=0.0).to(tl.float32) - s_c
            t_hl = tl.load(row_hi + lo_w * stride_w, mask=m_hi, other=0.0).to(tl.float32) - s_c
            t_hh = tl.load(row_hi + hi_w * stride_w, mask=m_hi & (hi_w >= 0), other=0.0).to(tl.float32) - s_c
            xr = (1.0 - f_h) * ((1.0 - f_w) * t_ll + f_w * t_lh) + f_h * ((1.0 - f_w) * t_hl + f_w * t_hh)
            xr = tl.where(m, xr, 0.0)
            mean_t = tl.sum(xr, axis=1) / cnt
            d = tl.where(m, xr - mean_t[:, None], 0.0)
            m2_t = tl.sum(d * d, axis=1)
            n_t = tl.where(valid, cnt, 0.0)
            n_acc, mean_acc, m2_acc = _chan_merge(n_acc, mean_acc, m2_acc, n_t, mean_t, m2_t)

    p_off = (bg * C + c).to(tl.int64) * K + offs_k
    tl.store(part_p_ptr + p_off, tl.zeros([BLOCK_K], dtype=tl.float32) + n_acc, mask=mask_k)
    tl.store(part_p_ptr + part_p_plane + p_off, mean_acc + (s_c - s_k), mask=mask_k)
    tl.store(part_p_ptr + 2 * part_p_plane + p_off, m2_acc, mask=mask_k)

    c_off = (bg * n_kblocks + pid_k).to(tl.int64) * C + c
    tl.store(part_c_ptr + c_off, nc_acc)
    tl.store(part_c_ptr + part_c_plane + c_off, meanc_acc)
    tl.store(part_c_ptr + 2 * part_c_plane + c_off, m2c_acc)


@triton.jit
def _stat_fwd_channel_kernel(
    x_ptr,
    part_c_ptr,  # [3, NBG*NB, C] fp32: count, mean (relative to s_c), M2
    B, C, H, W, G,
    stride_b, stride_c, stride_h, stride_w,
    part_c_plane,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_t = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    c = pid_bc % C
    bg = pid_bc // C
    n_tw = tl.cdiv(W, BLOCK_W)
    th = pid_t // n_tw
    tw = pid_t - th * n_tw

    offs_h = th * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = tw * BLOCK_W + tl.arange(0, BLOCK_W)
    mask_hw = (offs_h < H)[:, None] & (offs_w < W)[None, :]
    off = offs_h[:, None] * stride_h + offs_w[None, :] * stride_w
    cnt = (tl.minimum(H - th * BLOCK_H, BLOCK_H) * tl.minimum(W - tw * BLOCK_W, BLOCK_W)).to(tl.float32)
    s_c = _finite_or_zero(tl.load(x_ptr + c.to(tl.int64) * stride_c).to(tl.float32))

    n_acc = 0.0
    mean_acc = 0.0
    m2_acc = 0.0
    for i in range(0, G):
        b = bg * G + i
        valid = b < B
        m = mask_hw & valid
        base = x_ptr + b.to(tl.int64) * stride_b + c.to(tl.int64) * stride_c
        xv = tl.load(base + off, mask=m, other=0.0).to(tl.float32)
        xr = tl.where(m, xv - s_c, 0.0)
        mean_t = tl.sum(tl.sum(xr, axis=1), axis=0) / cnt
        d = tl.where(m, xr - mean_t, 0.0)
        m2_t = tl.sum(tl.sum(d * d, axis=1), axis=0)
        n_t = tl.where(valid, cnt, 0.0)
        n_acc, mean_acc, m2_acc = _chan_merge(n_acc, mean_acc, m2_acc, n_t, mean_t, m2_t)

    c_off = (bg * n_tiles + pid_t).to(tl.int64) * C + c
    tl.store(part_c_ptr + c_off, n_acc)
    tl.store(part_c_ptr + part_c_plane + c_off, mean_acc)
    tl.store(part_c_ptr + 2 * part_c_plane + c_off, m2_acc)


@triton.jit
def _merge_columns(
    part_ptr, part_plane, R, N, col0,
    x_ptr, shift_div, shift_a, shift_b,
    out_mean_ptr, out_m2_ptr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Merge the R partial rows of columns [col0, col0 + BLOCK_N) of a [3, R, N] partial array;
    column n's shift is x[(n // shift_div) * shift_a + (n % shift_div) * shift_b]."""
    cols = col0 + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    n_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    mean_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    m2_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows < R)[:, None] & mask_n[None, :]
        off = rows[:, None].to(tl.int64) * N + cols[None, :]
        cnt = tl.load(part_ptr + off, mask=m, other=0.0)
        mu = tl.load(part_ptr + part_plane + off, mask=m, other=0.0)
        q = tl.load(part_ptr + 2 * part_plane + off, mask=m, other=0.0)
        n_t = tl.sum(cnt, axis=0)
        mean_t = tl.sum(cnt * mu, axis=0) / tl.where(n_t > 0, n_t, 1.0)
        dev = tl.where(m, mu - mean_t[None, :], 0.0)
        m2_t = tl.sum(q, axis=0) + tl.sum(cnt * dev * dev, axis=0)
        n_acc, mean_acc, m2_acc = _chan_merge(n_acc, mean_acc, m2_acc, n_t, mean_t, m2_t)
    shift_off = (cols // shift_div) * shift_a + (cols % shift_div) * shift_b
    shift = _finite_or_zero(tl.load(x_ptr + shift_off, mask=mask_n, other=0.0).to(tl.float32))
    tl.store(out_mean_ptr + cols, shift + mean_acc, mask=mask_n)
    tl.store(out_m2_ptr + cols, m2_acc, mask=mask_n)


@triton.jit
def _stat_merge_kernel(
    x_ptr,
    part_c_ptr, cmean_ptr, cm2_ptr,
    part_p_ptr, pmean_ptr, pm2_ptr,
    rows_c, C, part_c_plane, stride_c, n_c_progs,
    rows_p, K, part_p_plane, KW, patch_stride_h, patch_stride_w,
    HAS_PATCH: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Stage 2: programs [0, n_c_progs) merge channel columns, the rest patch columns."""
    pid = tl.program_id(0)
    if pid < n_c_progs:
        _merge_columns(part_c_ptr, part_c_plane, rows_c, C, pid * BLOCK_N,
                       x_ptr, 1, stride_c, 0, cmean_ptr, cm2_ptr, BLOCK_R, BLOCK_N)
    else:
        if HAS_PATCH:
            _merge_columns(part_p_ptr, part_p_plane, rows_p, K, (pid - n_c_progs) * BLOCK_N,
                           x_ptr, KW, patch_stride_h, patch_stride_w, pmean_ptr, pm2_ptr,
                           BLOCK_R, BLOCK_N)


@triton.jit
def _stat_bwd_patch_kernel(
    x_ptr, dx_ptr,
    cmean_ptr, g_cmean_ptr, g_cvar_ptr,
    pmean_ptr, g_pmean_ptr, g_pvar_ptr,
    C, K, KW,
    sx_b, sx_c, sx_h, sx_w,
    sd_b, sd_c, sd_h, sd_w,
    inv_count_c, inv_count_p,
    P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = pid_bc // C
    c = pid_bc - b * C

    mu_c = tl.load(cmean_ptr + c)
    a_c = tl.load(g_cmean_ptr + c) * inv_count_c
    b_c = 2.0 * tl.load(g_cvar_ptr + c) * inv_count_c

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    kh = offs_k // KW
    kw = offs_k - kh * KW
    mu_k = tl.load(pmean_ptr + offs_k, mask=mask_k, other=0.0)
    a_k = tl.load(g_pmean_ptr + offs_k, mask=mask_k, other=0.0) * inv_count_p + a_c
    b_k = 2.0 * tl.load(g_pvar_ptr + offs_k, mask=mask_k, other=0.0) * inv_count_p

    x_base = x_ptr + b.to(tl.int64) * sx_b + c.to(tl.int64) * sx_c
    d_base = dx_ptr + b.to(tl.int64) * sd_b + c.to(tl.int64) * sd_c
    for j0 in tl.static_range(0, P * P, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = offs_j < P * P
        rows = kh[:, None] * P + (offs_j // P)[None, :]
        cols = kw[:, None] * P + (offs_j % P)[None, :]
        m = mask_k[:, None] & mask_j[None, :]
        xv = tl.load(x_base + rows * sx_h + cols * sx_w, mask=m, other=0.0).to(tl.float32)
        g = a_k[:, None] + b_c * (xv - mu_c) + b_k[:, None] * (xv - mu_k[:, None])
        tl.store(d_base + rows * sd_h + cols * sd_w, g.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _stat_bwd_channel_kernel(
    x_ptr, dx_ptr,
    cmean_ptr, g_cmean_ptr, g_cvar_ptr,
    C, H, W,
    sx_b, sx_c, sx_h, sx_w,
    sd_b, sd_c, sd_h, sd_w,
    inv_count_c,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bc // C
    c = pid_bc - b * C
    n_tw = tl.cdiv(W, BLOCK_W)
    th = pid_t // n_tw
    tw = pid_t - th * n_tw

    mu_c = tl.load(cmean_ptr + c)
    a_c = tl.load(g_cmean_ptr + c) * inv_count_c
    b_c = 2.0 * tl.load(g_cvar_ptr + c) * inv_count_c

    offs_h = th * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = tw * BLOCK_W + tl.arange(0, BLOCK_W)
    m = (offs_h < H)[:, None] & (offs_w < W)[None, :]
    x_base = x_ptr + b.to(tl.int64) * sx_b + c.to(tl.int64) * sx_c
    d_base = dx_ptr + b.to(tl.int64) * sd_b + c.to(tl.int64) * sd_c
    xv = tl.load(x_base + offs_h[:, None] * sx_h + offs_w[None, :] * sx_w, mask=m, other=0.0).to(tl.float32)
    g = a_c + b_c * (xv - mu_c)
    tl.store(d_base + offs_h[:, None] * sd_h + offs_w[None, :] * sd_w, g.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _resize_span(start, end, size, out):
    """[first, last) x' indices along a dim whose taps can reach source indices [start, end)
    (a superset: the taps are checked per index)."""
    first = (tl.maximum(start, 1) - 1) * out // size
    last = tl.minimum(out, ((end + 1) * out + size - 1) // size)
    return first, last


@triton.jit
def _stat_bwd_resize_kernel(
    x_ptr, dx_ptr,
    cmean_ptr, g_cmean_ptr, g_cvar_ptr,
    pmean_ptr, g_pmean_ptr, g_pvar_ptr,
    C, H, W, HR, WR, KW,
    sx_b, sx_c, sx_h, sx_w,
    sd_b, sd_c, sd_h, sd_w,
    inv_count_c, inv_count_p,
    P: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    """dx of a BLOCK_H × BLOCK_W tile of plane (b, c) when x' = R_h·x·R_wᵀ: the channel part plus
    R_hᵀ·G·R_w restricted to the tile, G = the patch part of the gradient on x'. The program walks
    the x' rows whose taps reach its rows; on each it forms the BLOCK_J x' columns that reach its
    columns from their taps, G on them, and adds G's column adjoint (a [BLOCK_J, BLOCK_W] tap
    match) to its tap rows. Every dx element is written once by one program: deterministic."""
    pid_bc = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bc // C
    c = pid_bc - b * C
    n_tw = tl.cdiv(W, BLOCK_W)
    th = pid_t // n_tw
    tw = pid_t - th * n_tw
    h0 = th * BLOCK_H
    w0 = tw * BLOCK_W
    offs_h = h0 + tl.arange(0, BLOCK_H)
    offs_w = w0 + tl.arange(0, BLOCK_W)

    x_base = x_ptr + b.to(tl.int64) * sx_b + c.to(tl.int64) * sx_c
    j_first, j_last = _resize_span(w0, tl.minimum(w0 + BLOCK_W, W), W, WR)
    offs_j = j_first + tl.arange(0, BLOCK_J)
    mask_j = offs_j < j_last
    lo_w, hi_w, f_w = _resize_taps(offs_j, W, WR)
    mask_jhi = mask_j & (hi_w >= 0)
    kcol = offs_j // P

    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    i_first, i_last = _resize_span(h0, tl.minimum(h0 + BLOCK_H, H), H, HR)
    for r in range(i_first, i_last):
        lo_h, hi_h, f_h = _resize_taps(r, H, HR)
        k = (r // P) * KW + kcol
        mu_k = tl.load(pmean_ptr + k, mask=mask_j, other=0.0)
        a_k = tl.load(g_pmean_ptr + k, mask=mask_j, other=0.0) * inv_count_p
        b_k = 2.0 * tl.load(g_pvar_ptr + k, mask=mask_j, other=0.0) * inv_count_p
        # x' − mu_k from taps minus mu_k (the weights sum to 1): no cancellation at large means.
        row_lo = x_base + lo_h * sx_h
        row_hi = x_base + hi_h * sx_h
        t_ll = tl.load(row_lo + lo_w * sx_w, mask=mask_j, other=0.0).to(tl.float32) - mu_k
        t_lh = tl.load(row_lo + hi_w * sx_w, mask=mask_jhi, other=0.0).to(tl.float32) - mu_k
        t_hl = tl.load(row_hi + lo_w * sx_w, mask=mask_j & (hi_h >= 0), other=0.0).to(tl.float32) - mu_k
        t_hh = tl.load(row_hi + hi_w * sx_w, mask=mask_jhi & (hi_h >= 0), other=0.0).to(tl.float32) - mu_k
        dev = (1.0 - f_h) * ((1.0 - f_w) * t_ll + f_w * t_lh) + f_h * ((1.0 - f_w) * t_hl + f_w * t_hh)
        g = tl.where(mask_j, a_k + b_k * dev, 0.0)
        # Selecting (not multiplying by 0) keeps a NaN on the dx pixels whose taps it came from.
        g_lo = ((1.0 - f_w) * g)[:, None]
        g_hi = (f_w * g)[:, None]
        t = tl.sum(tl.where(lo_w[:, None] == offs_w[None, :], g_lo, 0.0)
                   + tl.where(hi_w[:, None] == offs_w[None, :], g_hi, 0.0), axis=0)
        acc += (tl.where(offs_h[:, None] == lo_h, (1.0 - f_h) * t[None, :], 0.0)
                + tl.where(offs_h[:, None] == hi_h, f_h * t[None, :], 0.0))

    mu_c = tl.load(cmean_ptr + c)
    a_c = tl.load(g_cmean_ptr + c) * inv_count_c
    b_c = 2.0 * tl.load(g_cvar_ptr + c) * inv_count_c
    m = (offs_h < H)[:, None] & (offs_w < W)[None, :]
    d_base = dx_ptr + b.to(tl.int64) * sd_b + c.to(tl.int64) * sd_c
    xv = tl.load(x_base + offs_h[:, None] * sx_h + offs_w[None, :] * sx_w, mask=m, other=0.0).to(tl.float32)
    g = a_c + b_c * (xv - mu_c) + acc
    tl.store(d_base + offs_h[:, None] * sd_h + offs_w[None, :] * sd_w, g.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launchers and the AOT tests)
# ----------------------------------------------------------------------------------------------
def patch_blocks(patch: int, num_patches: int, tile: int | None = None) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_J) for patch size p > 0: BLOCK_J = p² padded to a power of two (capped at
    the tile, larger patches are chunked), BLOCK_K patches so that the tile holds ≤ tile (default
    TILE) elements."""
    tile = tile or TILE
    block_j = min(triton.next_power_of_2(patch * patch), tile)
    block_k = min(triton.next_power_of_2(max(num_patches, 1)), max(1, tile // block_j))
    return block_k, block_j


def plane_blocks(height: int, width: int) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_W) plane tile for patch == 0 (≤ TILE elements)."""
    block_w = min(triton.next_power_of_2(width), TILE)
    block_h = min(triton.next_power_of_2(height), max(1, TILE // block_w))
    return block_h, block_w


def batch_group(batch: int, channels: int, n_blocks: int) -> int:
    """Batch items per stage-1 program: 1 until the grid has TARGET_PROGRAMS programs, then more,
    which shrinks the partial arrays stage 2 has to merge."""
    return max(1, min(batch, MAX_GROUP, (batch * channels * n_blocks) // TARGET_PROGRAMS))


def resized_size(size: int, patch: int) -> int:
    """The patch multiple a dim of x' has: size itself when it already is one."""
    return -(-size // patch) * patch


def _span(start: int, end: int, size: int, out: int) -> int:
    """How many x' indices _resize_span gives for source indices [start, end)."""
    return min(out, ((end + 1) * out + size - 1) // size) - (max(start, 1) - 1) * out // size


def resize_blocks(height: int, width: int, patch: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_W, BLOCK_J) of _stat_bwd_resize_kernel: a BLOCK_H × BLOCK_W (≤ RESIZE_TILE)
    tile of x, BLOCK_J ≥ the x' columns any column block reaches; BLOCK_W halves until the
    [BLOCK_J, BLOCK_W] tap-match tile holds ≤ RESIZE_TILE."""
    out_w = resized_size(width, patch)
    block_w = min(triton.next_power_of_2(width), RESIZE_TILE)
    while True:
        span = max(_span(w0, min(w0 + block_w, width), width, out_w) for w0 in range(0, width, block_w))
        block_j = triton.next_power_of_2(span)
        if block_j * block_w <= RESIZE_TILE or block_w == 1:
            break
        block_w //= 2
    block_h = min(triton.next_power_of_2(height), max(1, RESIZE_TILE // block_w))
    return block_h, block_w, block_j


def _check_x(x: torch.Tensor, patch: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"stat_match expects x of shape [B, C, H, W], got {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"stat_match supports float32/float16/bfloat16, got {x.dtype}")
    if patch < 0:
        raise ValueError(f"patch must be >= 0, got {patch}")


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def stat_match_forward(
    x: torch.Tensor, patch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channel and patch statistics of x: (cmean[C], cm2[C], pmean[K], pm2[K]), all float32.

    cm2/pm2 are sums of squared deviations M2 (divide by the count for the population variance),
    so results of batch segments merge with Chan's formula. Counts: channel B·H·W, patch B·C·p².
    The patch pair is that of x' (K = (H'/p)(W'/p) entries; see the module docstring) and
    patch == 0 gives empty [0] patch tensors.
    """
    patch = int(patch)
    _check_x(x, patch)
    B, C, H, W = x.shape
    HR, WR = (resized_size(H, patch), resized_size(W, patch)) if patch > 0 else (H, W)
    resize = (HR, WR) != (H, W)
    K = (HR // patch) * (WR // patch) if patch > 0 else 0
    f32 = dict(dtype=torch.float32, device=x.device)
    if x.numel() == 0:  # B, H or W is 0 (C == 0 or K == 0 give empty outputs anyway)
        return (torch.full((C,), float("nan"), **f32), torch.zeros(C, **f32),
                torch.full((K,), float("nan"), **f32), torch.zeros(K, **f32))

    sb, sc, sh, sw = x.stride()
    if patch > 0:
        block_k, block_j = patch_blocks(patch, K, RESIZE_TILE if resize else TILE)
        n_blocks = triton.cdiv(K, block_k)
    else:
        block_h, block_w = plane_blocks(H, W)
        n_blocks = triton.cdiv(H, block_h) * triton.cdiv(W, block_w)
    G = batch_group(B, C, n_blocks)
    n_groups = triton.cdiv(B, G)

    rows_c = n_groups * n_blocks
    part_c = torch.empty((3, rows_c, C), **f32)
    rows_p = n_groups * C
    part_p = torch.empty((3, rows_p, K), **f32) if patch > 0 else part_c
    grid = (n_groups * C, n_blocks)
    # Patch shifts x[0, 0, kh·QH, kw·QW] (QH = p without a resize).
    QH, QW = (patch * H // HR, patch * W // WR) if patch > 0 else (0, 0)
    if resize:
        _stat_fwd_resize_kernel[grid](
            x, part_c, part_p, B, C, H, W, HR, WR, K, WR // patch, QH, QW, G, sb, sc, sh, sw,
            rows_c * C, rows_p * K,
            P=patch, BLOCK_K=block_k, BLOCK_J=block_j, num_warps=NUM_WARPS,
        )
    elif patch > 0:
        _stat_fwd_patch_kernel[grid](
            x, part_c, part_p, B, C, K, W // patch, G, sb, sc, sh, sw,
            rows_c * C, rows_p * K,
            P=patch, BLOCK_K=block_k, BLOCK_J=block_j, num_warps=NUM_WARPS,
        )
    else:
        _stat_fwd_channel_kernel[grid](
            x, part_c, B, C, H, W, G, sb, sc, sh, sw, rows_c * C,
            BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS,
        )

    cmean = torch.empty(C, **f32)
    cm2 = torch.empty(C, **f32)
    pmean = torch.empty(K, **f32)
    pm2 = torch.empty(K, **f32)
    n_c_progs = triton.cdiv(C, MERGE_BLOCK_N)
    n_p_progs = triton.cdiv(K, MERGE_BLOCK_N) if patch > 0 else 0
    if n_c_progs + n_p_progs > 0:
        _stat_merge_kernel[(n_c_progs + n_p_progs,)](
            x, part_c, cmean, cm2,
            part_p, pmean if patch > 0 else cmean, pm2 if patch > 0 else cm2,
            rows_c, C, rows_c * C, sc, n_c_progs,
            rows_p, K, rows_p * K, max(WR // patch, 1) if patch > 0 else 1,
            QH * sh, QW * sw,
            HAS_PATCH=patch > 0, BLOCK_R=MERGE_BLOCK_R, BLOCK_N=MERGE_BLOCK_N, num_warps=NUM_WARPS,
        )
    return cmean, cm2, pmean, pm2


def _vec(t: torch.Tensor | None, n: int, device: torch.device, name: str) -> torch.Tensor:
    """A float32 contiguous [n] vector (None means zeros: an unused output's gradient)."""
    if t is None:
        return torch.zeros(n, dtype=torch.float32, device=device)
    if t.numel() != n:
        raise ValueError(f"{name} must have {n} elements, got {tuple(t.shape)}")
    return t.reshape(n).to(device=device, dtype=torch.float32).contiguous()


def stat_match_backward(
    x: torch.Tensor,
    cmean: torch.Tensor,
    g_cmean: torch.Tensor | None,
    g_cvar: torch.Tensor | None,
    pmean: torch.Tensor | None,
    g_pmean: torch.Tensor | None,
    g_pvar: torch.Tensor | None,
    patch: int,
    count_c: float,
    count_p: float,
) -> torch.Tensor:
    """dx = g_cmean[c]/count_c + g_cvar[c]·2(x − cmean[c])/count_c
          + R_hᵀ·[g_pmean[k]/count_p + g_pvar[k]·2(x' − pmean[k])/count_p]·R_w   (if patch > 0)

    x', R_h, R_w and k as in the module docstring: the patch vectors have K = (H'/p)(W'/p) entries.
    count_c/count_p are explicit (global counts under batch segmentation). dx has x's dtype and
    layout (``torch.empty_like``); computed in fp32. A None gradient counts as zero."""
    patch = int(patch)
    _check_x(x, patch)
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    if x.numel() == 0:
        return dx
    dev = x.device
    cmean_v = _vec(cmean, C, dev, "cmean")
    g_cmean_v = _vec(g_cmean, C, dev, "g_cmean")
    g_cvar_v = _vec(g_cvar, C, dev, "g_cvar")
    inv_c = 1.0 / float(count_c)
    sx, sd = x.stride(), dx.stride()
    if patch > 0:
        HR, WR = resized_size(H, patch), resized_size(W, patch)
        K = (HR // patch) * (WR // patch)
        pmean_v = _vec(pmean, K, dev, "pmean")
        g_pmean_v = _vec(g_pmean, K, dev, "g_pmean")
        g_pvar_v = _vec(g_pvar, K, dev, "g_pvar")
    if patch > 0 and (HR, WR) != (H, W):
        block_h, block_w, block_j = resize_blocks(H, W, patch)
        grid = (B * C, triton.cdiv(H, block_h) * triton.cdiv(W, block_w))
        _stat_bwd_resize_kernel[grid](
            x, dx, cmean_v, g_cmean_v, g_cvar_v, pmean_v, g_pmean_v, g_pvar_v,
            C, H, W, HR, WR, WR // patch, *sx, *sd, inv_c, 1.0 / float(count_p),
            P=patch, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_J=block_j, num_warps=NUM_WARPS,
        )
    elif patch > 0:
        block_k, block_j = patch_blocks(patch, K)
        grid = (B * C, triton.cdiv(K, block_k))
        _stat_bwd_patch_kernel[grid](
            x, dx, cmean_v, g_cmean_v, g_cvar_v, pmean_v, g_pmean_v, g_pvar_v,
            C, K, W // patch, *sx, *sd, inv_c, 1.0 / float(count_p),
            P=patch, BLOCK_K=block_k, BLOCK_J=block_j, num_warps=NUM_WARPS,
        )
    else:
        block_h, block_w = plane_blocks(H, W)
        grid = (B * C, triton.cdiv(H, block_h) * triton.cdiv(W, block_w))
        _stat_bwd_channel_kernel[grid](
            x, dx, cmean_v, g_cmean_v, g_cvar_v, C, H, W, *sx, *sd, inv_c,
            BLOCK_H=block_h, BLOCK_W=block_w, num_warps=NUM_WARPS,
        )
    return dx


__all__ = ["stat_match_forward", "stat_match_backward"]
