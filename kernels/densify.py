"""K3 Triton backend: G-VBSM Gram-eigen data densification (DESIGN §4 K3) for CUDA tensors.

Work split (and why):

* ``_pool_kernel`` — adaptive average pooling of images [B, C, H, W] (any strides, fp32/fp16/bf16,
  converted to fp32 at load) to X̂ [B, C·P·P] fp32, torch's bins [⌊iH/P⌋, ⌈(i+1)H/P⌉). Skipped when
  H = W = P and the images are contiguous fp32: X̂ is then a view of the images.
* ``_gram_kernel`` — all class Gram matrices in one launch, grid (class, row tile, column tile): the
  rows of class k are gathered through the class-sorted index ``order`` (no copy of X̂), products with
  ``tl.dot`` in IEEE fp32 (no TF32) over chunks of BLOCK_D features, each chunk added into a float64
  accumulator. G is [K, n_max, n_max] float64, zero outside each class's n_k × n_k block.
* eigensolve — the G matrices are tiny (n ≤ 128), so they are solved by the CUDA Jacobi kernel of
  csrc/densify_cuda.cu when a CUDA build of the extension exposes it (``densify_eigh_cuda``), and
  otherwise by ``torch.linalg.eigh`` in float64 on the padded batch. Padding is exact: the padding
  block of class k is set to −(1 + tr G_k)·I, so its eigenvalues are the n_max − n_k smallest (G_k is
  PSD) and are masked out of both softmaxes. Eigenvalues ≈ ‖x‖² are large (thousands for 3×32×32
  images), so the softmaxes need them to ~1e-7 relative: float64 for G and λ keeps the loss and the
  gradient at float64-reference accuracy (fp32 would put ~1e-4 errors into softmax(λ/τ)).
* loss, dλ = softmax(λ) − softmax(λ/τ) and 2·dG = 2·V·diag(dλ)·Vᵀ: a few float64 torch ops on
  [K, n_max, n_max].
* ``_dx_kernel`` — dX̂_k = 2·dG_k·X̂_k for all classes in one launch, grid (class, row tile, feature
  tile), ``tl.dot`` in IEEE fp32 over chunks of BLOCK_J ≥ 16 class members (tl.dot needs K ≥ 16 on
  the GPU); rows are written straight into d images when there is no pooling.
* ``_pool_bwd_kernel`` — the pooling backward as a gather (each pixel sums the bins that contain it,
  at most ⌈P/H⌉ + 1 per axis): no atomics, deterministic, written in the images' dtype and strides.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); tests also AOT-compile them for
sm_80 and sm_90 and check the ptxas report for spills.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


NUM_WARPS = 4
POOL_BLOCK = 256
BLOCK_D_GRAM = 32
BLOCK_D_DX = 64
BLOCK_J_DX = 16
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pool_kernel(
    img_ptr, out_ptr,
    C, H, W,
    s_b, s_c, s_h, s_w,
    P: tl.constexpr,
    KH: tl.constexpr,  # max bin height (⌈H/P⌉ + 1, or H/P when P divides H)
    KW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_o = tl.program_id(1)
    b = pid_bc // C
    c = pid_bc - b * C
    offs = pid_o * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P * P
    oh = offs // P
    ow = offs - oh * P
    h0 = (oh * H) // P
    h1 = ((oh + 1) * H + P - 1) // P
    w0 = (ow * W) // P
    w1 = ((ow + 1) * W + P - 1) // P
    base = img_ptr + b.to(tl.int64) * s_b + c.to(tl.int64) * s_c
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for dh in tl.static_range(KH):
        for dw in tl.static_range(KW):
            h = h0 + dh
            w = w0 + dw
            m = mask & (h < h1) & (w < w1)
            acc += tl.load(base + h * s_h + w * s_w, mask=m, other=0.0).to(tl.float32)
    cnt = ((h1 - h0) * (w1 - w0)).to(tl.float32)
    out = out_ptr + pid_bc.to(tl.int64) * (P * P) + offs  # X̂[b, c·P·P + o]
    tl.store(out, acc / cnt, mask=mask)


@triton.jit
def _gram_kernel(
    x_ptr, order_ptr, offsets_ptr, counts_ptr, g_ptr,
    D, stride_x, NMAX,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    k = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    n = tl.load(counts_ptr + k).to(tl.int32)
    start = tl.load(offsets_ptr + k)
    if (tj <= ti) & (ti * BLOCK_N < n):
        ri = ti * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tj * BLOCK_N + tl.arange(0, BLOCK_N)
        mi = ri < n
        mj = rj < n
        row_i = tl.load(order_ptr + start + ri, mask=mi, other=0)
        row_j = tl.load(order_ptr + start + rj, mask=mj, other=0)
        pi = x_ptr + row_i.to(tl.int64)[:, None] * stride_x
        pj = x_ptr + row_j.to(tl.int64)[:, None] * stride_x
        acc = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float64)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            md = dd < D
            a = tl.load(pi + dd[None, :], mask=mi[:, None] & md[None, :], other=0.0)
            bt = tl.load(pj + dd[None, :], mask=mj[:, None] & md[None, :], other=0.0)
            part = tl.dot(a, tl.trans(bt), input_precision="ieee")
            acc += part.to(tl.float64)
        g = g_ptr + k.to(tl.int64) * NMAX * NMAX
        m2 = mi[:, None] & mj[None, :]
        tl.store(g + ri[:, None] * NMAX + rj[None, :], acc, mask=m2)
        tl.store(g + rj[None, :] * NMAX + ri[:, None], acc, mask=m2)  # the mirrored tile


@triton.jit
def _dx_kernel(
    x_ptr, coef_ptr, order_ptr, offsets_ptr, counts_ptr, out_ptr,
    D, stride_x, stride_out, NMAX,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    k = tl.program_id(0)
    tm = tl.program_id(1)
    td = tl.program_id(2)
    n = tl.load(counts_ptr + k).to(tl.int32)
    start = tl.load(offsets_ptr + k)
    if tm * BLOCK_M < n:
        ri = tm * BLOCK_M + tl.arange(0, BLOCK_M)
        mi = ri < n
        dd = td * BLOCK_D + tl.arange(0, BLOCK_D)
        md = dd < D
        coef = coef_ptr + k.to(tl.int64) * NMAX * NMAX + ri[:, None] * NMAX
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for j0 in range(0, n, BLOCK_J):
            rj = j0 + tl.arange(0, BLOCK_J)
            mj = rj < n
            cf = tl.load(coef + rj[None, :], mask=mi[:, None] & mj[None, :], other=0.0)
            row_j = tl.load(order_ptr + start + rj, mask=mj, other=0)
            xb = tl.load(x_ptr + row_j.to(tl.int64)[:, None] * stride_x + dd[None, :],
                         mask=mj[:, None] & md[None, :], other=0.0)
            acc += tl.dot(cf, xb, input_precision="ieee")
        row_i = tl.load(order_ptr + start + ri, mask=mi, other=0)
        out = out_ptr + row_i.to(tl.int64)[:, None] * stride_out + dd[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mi[:, None] & md[None, :])


@triton.jit
def _pool_bwd_kernel(
    g_ptr, dimg_ptr,
    C, H, W,
    s_b, s_c, s_h, s_w,
    P: tl.constexpr,
    NH: tl.constexpr,  # max bins containing one pixel row (⌈P/H⌉ + 1, or 1 when H is a multiple of P)
    NW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid_bc = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bc // C
    c = pid_bc - b * C
    offs = pid_p * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    h = offs // W
    w = offs - h * W
    oh0 = (h * P) // H  # first bin whose end passes h
    ow0 = (w * P) // W
    grow = g_ptr + pid_bc.to(tl.int64) * (P * P)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(NH):
        for j in tl.static_range(NW):
            oh = oh0 + i
            ow = ow0 + j
            h0 = (oh * H) // P
            h1 = ((oh + 1) * H + P - 1) // P
            w0 = (ow * W) // P
            w1 = ((ow + 1) * W + P - 1) // P
            m = mask & (oh < P) & (ow < P) & (h0 <= h) & (h < h1) & (w0 <= w) & (w < w1)
            cnt = tl.maximum((h1 - h0) * (w1 - w0), 1).to(tl.float32)
            acc += tl.load(grow + oh * P + ow, mask=m, other=0.0) / cnt
    out = dimg_ptr + b.to(tl.int64) * s_b + c.to(tl.int64) * s_c + h * s_h + w * s_w
    tl.store(out, acc.to(dimg_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launcher and the AOT tests)
# ----------------------------------------------------------------------------------------------
def pool_taps(size: int, pool: int) -> int:
    """Max input pixels per pooling bin along one axis."""
    return size // pool if size % pool == 0 else size // pool + 2


def pool_bwd_taps(size: int, pool: int) -> int:
    """Max pooling bins containing one input pixel along one axis."""
    return 1 if size % pool == 0 else -(-pool // size) + 1


def gram_block(n_max: int) -> int:
    """Row/column tile of the Gram kernel: 16 (tl.dot's minimum) for every class size. 32 took 142/154
    registers with 4 warps on sm_80/sm_90 (19 % occupancy, ``python -m ddfast.gpu_report``), 64 would
    spill; and the grid (classes × tiles²) is below one wave of a 132-SM GPU for the usual class counts,
    so the 3-4× more programs of 16-row tiles add parallelism too."""
    return 16


def dx_block(n_max: int) -> int:
    return 16 if n_max <= 16 else 32


def _cuda_eigh():
    """The CUDA Jacobi eigensolver (csrc/densify_cuda.cu, ddfast_densify_eigh_f64) when a CUDA build of
    ddfast binds it as ``ddfast._C.densify_eigh_cuda(gram [K, n, n] f64, counts [K] i32) -> (w, vt,
    status)``; the CPU-only build here does not, and the launcher then uses torch.linalg.eigh."""
    try:
        import ddfast._C as ext  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(ext, "densify_eigh_cuda", None)


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------
def densify_forward(images: torch.Tensor, counts: torch.Tensor, order: torch.Tensor, tau: float, pool: int, with_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim float32, d loss / d images in the images' dtype — or an empty tensor). The caller (ddfast.ops.densify)
    checks the inputs and passes the class layout: ``counts`` [K] images per present class (ascending label),
    ``order`` [B] the image indices grouped by class (stable)."""
    if images.dtype not in _DTYPES:
        raise TypeError(f"densify (triton) supports float32/float16/bfloat16 images, got {images.dtype}")
    dev = images.device
    B, C, H, W = images.shape
    P = int(pool)
    D = C * P * P
    f32 = dict(dtype=torch.float32, device=dev)
    if B == 0 or H == 0 or W == 0:
        return torch.zeros((), **f32), (torch.zeros_like(images) if with_grad else images.new_empty(0))

    counts, order = counts.to(dev), order.to(dev).contiguous()
    K = counts.numel()
    n_max = int(counts.max())
    offsets = (torch.cumsum(counts, 0) - counts).contiguous()

    # 1. X̂ [B, D] fp32 (a view of the images when no pooling is needed)
    identity = H == P and W == P
    if identity and images.dtype == torch.float32 and images.is_contiguous():
        x = images.view(B, D)
    else:
        x = torch.empty((B, D), **f32)
        s_b, s_c, s_h, s_w = images.stride()
        _pool_kernel[(B * C, triton.cdiv(P * P, POOL_BLOCK))](
            images, x, C, H, W, s_b, s_c, s_h, s_w,
            P=P, KH=pool_taps(H, P), KW=pool_taps(W, P), BLOCK=POOL_BLOCK, num_warps=NUM_WARPS,
        )

    # 2. class Gram matrices, float64 [K, n_max, n_max]
    gram = torch.zeros((K, n_max, n_max), dtype=torch.float64, device=dev)
    bn = gram_block(n_max)
    tiles = triton.cdiv(n_max, bn)
    _gram_kernel[(K, tiles, tiles)](
        x, order, offsets, counts, gram, D, x.stride(0), n_max,
        BLOCK_N=bn, BLOCK_D=BLOCK_D_GRAM, num_warps=NUM_WARPS,
    )
    diag = gram.diagonal(dim1=1, dim2=2)
    if not bool(torch.isfinite(diag).all()):
        raise ValueError("densify_loss: images contain NaN or Inf (a class Gram matrix is not finite)")

    # 3. eigensolve (float64)
    idx = torch.arange(n_max, device=dev)
    cuda_eigh = _cuda_eigh() if dev.type == "cuda" else None
    if cuda_eigh is not None:
        # CUDA Jacobi (csrc/densify_cuda.cu): class k is the leading n_k x n_k block, solved exactly;
        # w[k, :n_k] ascending, rows of vt[k] are the eigenvectors, the rest is unused.
        lam, vt, status = cuda_eigh(gram, counts.to(torch.int32))
        if bool((status == -2).any()):
            raise ValueError("densify_loss: images contain NaN or Inf (a class Gram matrix is not finite)")
        valid = idx[None, :] < counts[:, None]
        lam = lam.masked_fill(~valid, 0.0)
        vecs = vt.transpose(1, 2).masked_fill(~(valid[:, :, None] & valid[:, None, :]), 0.0)
    else:
        # torch.linalg.eigh on the padded batch: the padding block becomes −(1 + tr G_k)·I, so its
        # eigenvalues are the n_max − n_k smallest (G_k is PSD) and are masked out below.
        pad = idx[None, :] >= counts[:, None]
        gram.diagonal(dim1=1, dim2=2).sub_(pad * (1.0 + diag.sum(-1))[:, None])
        lam, vecs = torch.linalg.eigh(gram)
        valid = idx[None, :] >= (n_max - counts)[:, None]

    # 4. loss, dλ and 2·dG (float64)
    lam_m = lam.masked_fill(~valid, float("-inf"))
    log_q = lam - torch.logsumexp(lam_m, dim=-1, keepdim=True)
    log_p = lam / tau - torch.logsumexp(lam_m / tau, dim=-1, keepdim=True)
    p = log_p.exp()
    loss = torch.where(valid, p * (log_p - log_q), torch.zeros_like(p)).sum().to(torch.float32)
    if not with_grad:
        return loss, images.new_empty(0)
    dlam = torch.where(valid, log_q.exp() - p, torch.zeros_like(p))
    coef = (2.0 * (vecs * dlam[:, None, :]) @ vecs.transpose(1, 2)).to(torch.float32).contiguous()

    # 5. dX̂ = 2·dG·X̂, then the pooling backward
    direct = identity and images.is_contiguous()
    dimages = torch.empty_like(images, memory_format=torch.contiguous_format) if direct else torch.empty_like(images)
    dx = dimages.view(B, D) if direct else torch.empty((B, D), **f32)
    bm = dx_block(n_max)
    _dx_kernel[(K, triton.cdiv(n_max, bm), triton.cdiv(D, BLOCK_D_DX))](
        x, coef, order, offsets, counts, dx, D, x.stride(0), dx.stride(0), n_max,
        BLOCK_M=bm, BLOCK_J=BLOCK_J_DX, BLOCK_D=BLOCK_D_DX, num_warps=NUM_WARPS,
    )
    if not direct:
        s_b, s_c, s_h, s_w = dimages.stride()
        _pool_bwd_kernel[(B * C, triton.cdiv(H * W, POOL_BLOCK))](
            dx, dimages, C, H, W, s_b, s_c, s_h, s_w,
            P=P, NH=pool_bwd_taps(H, P), NW=pool_bwd_taps(W, P), BLOCK=POOL_BLOCK, num_warps=NUM_WARPS,
        )
    return loss, dimages
