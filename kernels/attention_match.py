"""K2 Triton backend: batched multi-layer attention matching with per-class means and its closed-form
gradient on the synthetic side (DESIGN §4 K2, specs/d2m-datadam-k2.md §3).

Per layer l, features F [N, C, H, W] (fp32 / fp16 / bf16, any strides: NCHW, channels_last, sliced
and expanded views are read in place through explicit strides), S = H·W. The *map* axis has M = S
positions (``spatial``) or M = C channels (``channel``); the other axis is *reduced*:

    a_n[m] = Σ_reduced |F_n|^p,   r_n = max(‖a_n‖₂, 1e-12),   â_n = a_n / r_n
    μ^X_k  = mean of â_n over the samples of class k on side X (0 when the class is absent)
    L      = Σ_l w_l Σ_k both_k ‖μ^S_k − μ^R_k‖² + w_e Σ_k both_k ‖ē^S_k − ē^R_k‖²,  both_k = n^R_k > 0 ∧ n^S_k > 0

and, with k = k(n) the label of synthetic sample n,

    u_n = 2 w_l both_k (μ^S_k − μ^R_k) / n^S_k
    v_n = (u_n − â_n⟨â_n, u_n⟩) / r_n     (u_n / 1e-12 when r_n ≤ 1e-12: F.normalize's clamp branch)
    dF_n = p·|F_n|^(p−1)·sgn(F_n)·v_n     broadcast over the reduced axis, 0 where F_n = 0
    de_n = 2 w_e both_k (ē^S_k − ē^R_k) / n^S_k

Passes per layer (all arithmetic fp32; loads are converted at once):

* ``_attention_map_kernel`` (kernel A), grid (N·⌈M / BLOCK_M⌉,): a program owns one sample and
  BLOCK_M map entries and walks the reduced axis in tiles of BLOCK_R (channel mode: BLOCK_H × BLOCK_W
  positions, so no integer division per element), accumulating |F|^p in a [BLOCK_R, BLOCK_M]
  register tile that is reduced once at the end; it writes a [N, M] fp32. Run on both sides: F^R and
  F^S are each read once here.
* r, â, u, v and the loss: tiny torch ops on [N, M] / [K, M] tensors (< 1% of the bytes).
* ``_class_mean_kernel``: per-class means of the rows of a small [N, M] fp32 tensor (â of either
  side, or the embeddings). Samples are sorted by label once on the host (stable ``argsort``) and the
  class segments found by ``searchsorted``; program (k, m-block) sums its segment's rows in a fixed
  order: deterministic, no atomics, no host synchronisation.
* ``_attention_grad_kernel`` (kernel B, with the gradient only), same grid and tiles as kernel A:
  reads F^S a second time and v_n once per program and writes dF (contiguous, F^S's dtype).

p takes a fast path (``P_MODE`` constexpr) for p = 1 (|x|, sgn x), 2 (x², 2x) and 4 (x⁴, 4x³);
any other p > 0 uses exp2/log2 of |x| (|0|^p = 0 and its derivative 0, for every p).

Offsets: each sample's base is 64-bit, offsets inside one sample are int32 (a sample's span of F and
of dF must stay below 2³¹ elements; the launcher raises ValueError otherwise).

Tiles: TILE = 1024 fp32 elements per program step with 4 warps (8 per thread). The tile is oriented
along whichever axis is contiguous in memory (NCHW: the map axis in spatial mode, the reduced axis in
channel mode; channels_last: the channel axis), see :func:`blocks`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

EPS = 1e-12
NUM_WARPS = 4
# Elements of the [BLOCK_R, BLOCK_M] tile one program holds per step (4 warps -> 8 per thread).
TILE = 1024
# Widest run along the contiguous axis that one tile spans (the rest of the tile goes to the other axis).
MAX_RUN = 256
# With channels_last features the contiguous axis is C: runs of up to this many channels per tile.
MAX_RUN_CL = 64

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _attention_map_kernel(
    x_ptr, a_ptr,
    C, H, W, M, n_mblocks,
    s_n, s_c, s_h, s_w,
    p,
    SPATIAL: tl.constexpr,
    P_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """a[n, m] = Σ_reduced |x[n, ...]|^p for BLOCK_M map entries m of one sample n (kernel A).

    Spatial mode: map = positions (h, w), reduced = channels in steps of BLOCK_R. Channel mode: map =
    channels, reduced = positions in BLOCK_H × BLOCK_W tiles (BLOCK_H = BLOCK_R / BLOCK_W), so no
    per-element integer division. (The power is written inline: helper calls are slow to interpret.)"""
    BLOCK_H: tl.constexpr = BLOCK_R // BLOCK_W
    pid = tl.program_id(0)
    n = pid // n_mblocks
    mb = pid - n * n_mblocks
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    idx = tl.arange(0, BLOCK_R)
    if SPATIAL:
        mh = offs_m // W
        map_off = mh * s_h + (offs_m - mh * W) * s_w
        n_steps = (C + BLOCK_R - 1) // BLOCK_R
        n_wt = 1
    else:
        map_off = offs_m * s_c
        ih = idx // BLOCK_W
        iw = idx % BLOCK_W
        n_wt = (W + BLOCK_W - 1) // BLOCK_W
        n_steps = (H + BLOCK_H - 1) // BLOCK_H * n_wt
    ptrs = x_ptr + n.to(tl.int64) * s_n + map_off[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_M], dtype=tl.float32)
    for t in range(0, n_steps):
        if SPATIAL:
            rc = t * BLOCK_R + idx
            mask_r = rc < C
            red_off = rc * s_c
        else:
            th = t // n_wt
            hh = th * BLOCK_H + ih
            ww = (t - th * n_wt) * BLOCK_W + iw
            mask_r = (hh < H) & (ww < W)
            red_off = hh * s_h + ww * s_w
        x = tl.load(ptrs + red_off[:, None], mask=mask_r[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
        if P_MODE == 1:
            y = tl.abs(x)
        elif P_MODE == 2:
            y = x * x
        elif P_MODE == 4:
            y = x * x
            y = y * y
        else:  # exp2(p·log2|x|), 0 at x = 0 (NaN stays NaN)
            ax = tl.abs(x)
            zero = ax == 0.0
            y = tl.where(zero, 0.0, tl.exp2(p * tl.log2(tl.where(zero, 1.0, ax))))
        acc += y
    tl.store(a_ptr + n.to(tl.int64) * M + offs_m, tl.sum(acc, axis=0), mask=mask_m)


@triton.jit
def _attention_grad_kernel(
    x_ptr, v_ptr, dx_ptr,
    C, H, W, M, n_mblocks,
    s_n, s_c, s_h, s_w,
    d_n, d_c, d_h, d_w,
    p,
    SPATIAL: tl.constexpr,
    P_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """dx[n, ...] = p·|x|^(p−1)·sgn(x)·v[n, m] (0 where x = 0) for BLOCK_M map entries m of one
    sample n, broadcast over the reduced axis (kernel B); same tiles as _attention_map_kernel."""
    BLOCK_H: tl.constexpr = BLOCK_R // BLOCK_W
    pid = tl.program_id(0)
    n = pid // n_mblocks
    mb = pid - n * n_mblocks
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    idx = tl.arange(0, BLOCK_R)
    if SPATIAL:
        mh = offs_m // W
        mw = offs_m - mh * W
        x_map = mh * s_h + mw * s_w
        d_map = mh * d_h + mw * d_w
        n_steps = (C + BLOCK_R - 1) // BLOCK_R
        n_wt = 1
    else:
        x_map = offs_m * s_c
        d_map = offs_m * d_c
        ih = idx // BLOCK_W
        iw = idx % BLOCK_W
        n_wt = (W + BLOCK_W - 1) // BLOCK_W
        n_steps = (H + BLOCK_H - 1) // BLOCK_H * n_wt
    x_ptrs = x_ptr + n.to(tl.int64) * s_n + x_map[None, :]
    d_ptrs = dx_ptr + n.to(tl.int64) * d_n + d_map[None, :]
    v = tl.load(v_ptr + n.to(tl.int64) * M + offs_m, mask=mask_m, other=0.0)[None, :]
    for t in range(0, n_steps):
        if SPATIAL:
            rc = t * BLOCK_R + idx
            mask_r = rc < C
            x_red = rc * s_c
            d_red = rc * d_c
        else:
            th = t // n_wt
            hh = th * BLOCK_H + ih
            ww = (t - th * n_wt) * BLOCK_W + iw
            mask_r = (hh < H) & (ww < W)
            x_red = hh * s_h + ww * s_w
            d_red = hh * d_h + ww * d_w
        mask = mask_r[:, None] & mask_m[None, :]
        x = tl.load(x_ptrs + x_red[:, None], mask=mask, other=0.0).to(tl.float32)
        if P_MODE == 1:  # sgn(x), sgn(0) = 0
            g = tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)
        elif P_MODE == 2:
            g = 2.0 * x
        elif P_MODE == 4:
            g = 4.0 * (x * x) * x
        else:
            ax = tl.abs(x)
            zero = x == 0.0
            sgn = tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)
            g = tl.where(zero, 0.0, p * tl.exp2((p - 1.0) * tl.log2(tl.where(zero, 1.0, ax))) * sgn)
        tl.store(d_ptrs + d_red[:, None], (g * v).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _class_mean_kernel(
    x_ptr, perm_ptr, seg_ptr, out_ptr,
    M, n_mblocks,
    BLOCK_I: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """out[k, m] = mean of x[perm[i], m] over i in [seg[k], seg[k+1]) (0 for an empty class) for
    BLOCK_M columns; x [N, M] fp32 contiguous. Fixed summation order: deterministic."""
    pid = tl.program_id(0)
    k = pid // n_mblocks
    mb = pid - k * n_mblocks
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    start = tl.load(seg_ptr + k)
    end = tl.load(seg_ptr + k + 1)
    acc = tl.zeros([BLOCK_I, BLOCK_M], dtype=tl.float32)
    for i0 in range(start, end, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        mask_i = i < end
        rows = tl.load(perm_ptr + i, mask=mask_i, other=0)
        acc += tl.load(x_ptr + rows.to(tl.int64)[:, None] * M + offs_m[None, :],
                       mask=mask_i[:, None] & mask_m[None, :], other=0.0)
    count = tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out_ptr + k.to(tl.int64) * M + offs_m, tl.sum(acc, axis=0) / count, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launcher and the AOT tests)
# ----------------------------------------------------------------------------------------------
def p_mode(p: float) -> int:
    """The P_MODE constexpr: 1, 2 or 4 for those exponents (fast paths), 0 for any other p."""
    p = float(p)
    return int(p) if p in (1.0, 2.0, 4.0) else 0


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def blocks(spatial: bool, channels: int, height: int, width: int, channels_last: bool = False) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_R, BLOCK_W) of kernels A and B for a [N, C, H, W] layer: a [BLOCK_R, BLOCK_M]
    tile of ≤ TILE elements (BLOCK_W = the position-tile width along W in channel mode, 1 in spatial
    mode), its long side along the axis that is contiguous in memory: C when ``channels_last``
    (C-stride 1 with positions strided), else W."""
    positions = height * width
    if spatial:  # map = positions, reduced = channels
        if channels_last:
            block_r = min(_np2(channels), MAX_RUN_CL)
            block_m = min(_np2(positions), max(1, TILE // block_r))
        else:
            block_m = min(_np2(positions), MAX_RUN)
            block_r = min(_np2(channels), max(1, TILE // block_m))
        return block_m, block_r, 1
    # map = channels, reduced = positions (BLOCK_H × BLOCK_W tiles)
    if channels_last:
        block_m = min(_np2(channels), MAX_RUN_CL)
        budget = max(1, TILE // block_m)
    else:
        budget = MAX_RUN
    block_w = min(_np2(width), budget)
    block_h = min(_np2(height), max(1, budget // block_w))
    block_r = block_h * block_w
    if not channels_last:
        block_m = min(_np2(channels), max(1, TILE // block_r))
    return block_m, block_r, block_w


def class_blocks(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_I, BLOCK_M) of _class_mean_kernel for a [rows, cols] input."""
    block_m = min(_np2(cols), MAX_RUN)
    block_i = min(_np2(rows), max(1, TILE // block_m))
    return block_i, block_m


def _is_channels_last(f: torch.Tensor) -> bool:
    _, c, h, w = f.shape
    _, s_c, s_h, s_w = f.stride()
    return c > 1 and s_c == 1 and (h * w > 1) and min(s for s, d in ((s_h, h), (s_w, w)) if d > 1) > 1


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------
def _check_span(f: torch.Tensor, what: str) -> None:
    _, c, h, w = f.shape
    span = sum((d - 1) * s for d, s in zip((c, h, w), f.stride()[1:]))
    if max(span, c * h * w) > _INT32_MAX:
        raise ValueError(f"attention_match (triton) indexes one sample of {what} with int32 offsets: "
                         f"shape {tuple(f.shape)} strides {tuple(f.stride())} spans >= 2^31 elements")


def attention_map(f: torch.Tensor, p: float, spatial: bool) -> torch.Tensor:
    """a [N, M] fp32 (M = H·W when ``spatial``, else C) of features f [N, C, H, W] (kernel A)."""
    n, c, h, w = f.shape
    m = h * w if spatial else c
    a = torch.empty((n, m), dtype=torch.float32, device=f.device)
    if a.numel() == 0:
        return a
    if f.numel() == 0:  # an empty reduced axis
        return a.zero_()
    block_m, block_r, block_w = blocks(spatial, c, h, w, _is_channels_last(f))
    n_mblocks = triton.cdiv(m, block_m)
    _attention_map_kernel[(n * n_mblocks,)](
        f, a, c, h, w, m, n_mblocks, *f.stride(), float(p),
        SPATIAL=bool(spatial), P_MODE=p_mode(p), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=NUM_WARPS,
    )
    return a


def attention_grad(f: torch.Tensor, v: torch.Tensor, p: float, spatial: bool) -> torch.Tensor:
    """dF = p·|f|^(p−1)·sgn(f)·v broadcast over the reduced axis, contiguous in f's dtype (kernel B);
    v is [N, M] fp32."""
    n, c, h, w = f.shape
    df = torch.empty(f.shape, dtype=f.dtype, device=f.device)
    if df.numel() == 0:
        return df
    m = h * w if spatial else c
    v = v.to(torch.float32).contiguous()
    block_m, block_r, block_w = blocks(spatial, c, h, w, _is_channels_last(f))
    n_mblocks = triton.cdiv(m, block_m)
    _attention_grad_kernel[(n * n_mblocks,)](
        f, v, df, c, h, w, m, n_mblocks, *f.stride(), *df.stride(), float(p),
        SPATIAL=bool(spatial), P_MODE=p_mode(p), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=NUM_WARPS,
    )
    return df


def class_segments(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm int32 [N]: sample indices sorted by label (stable), seg int32 [K+1]: class k's samples
    are perm[seg[k]:seg[k+1]]). Labels outside [0, K) belong to no class."""
    lab = labels.long()
    perm = torch.argsort(lab, stable=True)
    bounds = torch.arange(num_classes + 1, device=lab.device, dtype=lab.dtype)
    seg = torch.searchsorted(lab[perm], bounds)
    return perm.to(torch.int32), seg.to(torch.int32)


def class_means(x: torch.Tensor, perm: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Per-class means [K, M] (0 for empty classes) of the rows of x [N, M] (any float dtype; fp32 out)."""
    num_classes = seg.numel() - 1
    rows, cols = x.shape
    out = torch.zeros((num_classes, cols), dtype=torch.float32, device=x.device)
    if rows == 0 or out.numel() == 0:
        return out
    x = x.to(torch.float32).contiguous()
    block_i, block_m = class_blocks(rows, cols)
    n_mblocks = triton.cdiv(cols, block_m)
    _class_mean_kernel[(num_classes * n_mblocks,)](
        x, perm, seg, out, cols, n_mblocks, BLOCK_I=block_i, BLOCK_M=block_m, num_warps=NUM_WARPS,
    )
    return out


def unit_attention(f: torch.Tensor, p: float, spatial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(â [N, M], r [N, 1]) fp32: the attention map over its L2 norm clamped at EPS (F.normalize)."""
    a = attention_map(f, p, spatial)
    r = torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(EPS)
    return a / r, r


def _map_grad(ah: torch.Tensor, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """v = ∂⟨â, u⟩/∂a per sample: (u − â⟨â, u⟩)/r, u/eps on F.normalize's clamp branch."""
    return torch.where(r <= EPS, u / EPS, (u - ah * (ah * u).sum(dim=1, keepdim=True)) / r)


def attention_class_sums(feats: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int, p: float,
                         spatial: bool) -> list[torch.Tensor]:
    """Pass 1 of ``--segment``: per layer the per-class sums [K, M] (float64) of â."""
    out = []
    for f in feats:
        _check_span(f, "features")
        ah, _ = unit_attention(f, float(p), spatial)
        y = labels.to(ah.device).long()
        out.append(torch.zeros((num_classes, ah.shape[1]), dtype=torch.float64, device=ah.device).index_add_(0, y, ah.double()))
    return out


def attention_vjp(feats: Sequence[torch.Tensor], labels: torch.Tensor, class_grads: Sequence[torch.Tensor], p: float,
                  spatial: bool) -> list[torch.Tensor]:
    """Pass 2 of ``--segment``: per layer dF of Σ_n ⟨â_n, u[y_n]⟩ for per-class u [K, M] (kernels A and B)."""
    grads = []
    for f, u in zip(feats, class_grads):
        _check_span(f, "features")
        if f.numel() == 0:
            grads.append(torch.zeros(f.shape, dtype=f.dtype, device=f.device))
            continue
        ah, r = unit_attention(f, float(p), spatial)
        u_n = u.to(device=ah.device, dtype=torch.float32)[labels.to(ah.device).long()]
        grads.append(attention_grad(f, _map_grad(ah, r, u_n), float(p), spatial))
    return grads


def _check_inputs(real_feats, syn_feats, real_labels, syn_labels, layer_weights, real_emb, syn_emb, p):
    if len(real_feats) != len(syn_feats):
        raise ValueError(f"real and synthetic feature lists differ in length: {len(real_feats)} vs {len(syn_feats)}")
    if len(layer_weights) != len(syn_feats):
        raise ValueError(f"layer_weights has {len(layer_weights)} entries for {len(syn_feats)} layers")
    if not float(p) > 0:
        raise ValueError(f"p must be > 0, got {p}")
    for lab, name in ((real_labels, "real_labels"), (syn_labels, "syn_labels")):
        if lab.dtype not in (torch.int32, torch.int64) or lab.ndim != 1:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {lab.dtype} {tuple(lab.shape)}")
    for l, (fr, fs) in enumerate(zip(real_feats, syn_feats)):
        for f in (fr, fs):
            if f.dtype not in _DTYPES:
                raise TypeError(f"attention_match (triton) supports float32/float16/bfloat16 features, got {f.dtype}")
        if fr.ndim != 4 or fs.ndim != 4 or fr.shape[1:] != fs.shape[1:]:
            raise ValueError(f"layer {l}: features must be [N, C, H, W] with equal C, H, W on both sides, "
                             f"got {tuple(fr.shape)} and {tuple(fs.shape)}")
        if fr.shape[0] != real_labels.shape[0] or fs.shape[0] != syn_labels.shape[0]:
            raise ValueError(f"layer {l}: {fr.shape[0]}/{fs.shape[0]} rows but "
                             f"{real_labels.shape[0]}/{syn_labels.shape[0]} labels")
        _check_span(fr, f"layer {l} real features")
        _check_span(fs, f"layer {l} synthetic features")
    if real_emb is not None and syn_emb is not None:  # one embedding alone is ignored (as in the reference)
        for e, lab, name in ((real_emb, real_labels, "real_emb"), (syn_emb, syn_labels, "syn_emb")):
            if e.ndim != 2 or e.shape[0] != lab.shape[0]:
                raise ValueError(f"{name} must be [N, D] with one row per label, got {tuple(e.shape)}")
            if e.dtype not in _DTYPES:
                raise TypeError(f"attention_match (triton) supports float32/float16/bfloat16 embeddings, got {e.dtype}")
        if real_emb.shape[1] != syn_emb.shape[1]:
            raise ValueError(f"real_emb and syn_emb widths differ: {real_emb.shape[1]} vs {syn_emb.shape[1]}")


def attention_match_forward(
    real_feats: Sequence[torch.Tensor], syn_feats: Sequence[torch.Tensor],
    real_labels: torch.Tensor, syn_labels: torch.Tensor, num_classes: int, p: float, spatial: bool,
    layer_weights: Sequence[float], real_emb: torch.Tensor | None, syn_emb: torch.Tensor | None,
    emb_weight: float, with_grad: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """(loss: 0-dim fp32, [dF^S_l] contiguous in each synthetic feature's dtype, de^S [N_S, D] in
    syn_emb's dtype). Without ``with_grad`` the gradients are 1-D empty tensors (features' dtypes) and
    an empty fp32 tensor; de^S is an empty fp32 tensor too when the embeddings are not both given.
    Labels take values in [0, num_classes); the real side is a constant (no gradient)."""
    real_feats, syn_feats = list(real_feats), list(syn_feats)
    weights = [float(w) for w in layer_weights]
    _check_inputs(real_feats, syn_feats, real_labels, syn_labels, weights, real_emb, syn_emb, p)
    p = float(p)
    if syn_feats:
        dev = syn_feats[0].device
    elif syn_emb is not None:
        dev = syn_emb.device
    else:
        dev = syn_labels.device
    f32 = dict(dtype=torch.float32, device=dev)
    num_classes = int(num_classes)
    yr, ys = real_labels.to(dev), syn_labels.to(dev)
    perm_r, seg_r = class_segments(yr, num_classes)
    perm_s, seg_s = class_segments(ys, num_classes)
    count_r = (seg_r[1:] - seg_r[:-1]).to(torch.float32)
    count_s = (seg_s[1:] - seg_s[:-1]).to(torch.float32)
    both = ((count_r > 0) & (count_s > 0)).to(torch.float32).unsqueeze(1)  # [K, 1]
    inv_ns = 1.0 / count_s.clamp_min(1.0).unsqueeze(1)
    # u is gathered per sample by class; labels outside [0, K) (none in valid input) index nothing.
    ys_long = ys.long().clamp(0, max(num_classes - 1, 0))

    loss = torch.zeros((), **f32)
    grads: list[torch.Tensor] = []
    for fr, fs, w in zip(real_feats, syn_feats, weights):
        ah_r, _ = unit_attention(fr, p, spatial)
        ah_s, r_s = unit_attention(fs, p, spatial)
        mu_r = class_means(ah_r, perm_r, seg_r)
        mu_s = class_means(ah_s, perm_s, seg_s)
        diff = (mu_s - mu_r) * both
        loss = loss + w * diff.square().sum()
        if not with_grad:
            grads.append(fs.new_empty(0))
            continue
        if fs.shape[0] == 0 or num_classes == 0:
            grads.append(torch.zeros(fs.shape, dtype=fs.dtype, device=dev))
            continue
        u = ((2.0 * w) * diff * inv_ns)[ys_long]  # [N_S, M]
        grads.append(attention_grad(fs, _map_grad(ah_s, r_s, u), p, spatial))

    d_emb = torch.empty(0, **f32)
    if real_emb is not None and syn_emb is not None:
        er = class_means(real_emb.to(dev), perm_r, seg_r)
        es = class_means(syn_emb.to(dev), perm_s, seg_s)
        diff = (es - er) * both
        loss = loss + float(emb_weight) * diff.square().sum()
        if with_grad:
            if syn_emb.shape[0] == 0 or num_classes == 0:
                d_emb = torch.zeros(syn_emb.shape, dtype=syn_emb.dtype, device=dev)
            else:
                d_emb = ((2.0 * float(emb_weight)) * diff * inv_ns)[ys_long].to(syn_emb.dtype)
    return loss, grads, d_emb


__all__ = ["attention_match_forward", "attention_class_sums", "attention_vjp", "attention_map", "attention_grad", "class_means", "class_segments", "blocks"]
