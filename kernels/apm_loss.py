"""K4 Triton backend: APM's image-update loss head and its closed-form gradient (specs/apm.md §3).

z is [K+1, n, C] logits (fp32 / fp16 / bf16, any strides: read in place through explicit strides),
z[0] = teacher T, z[1:] = the K student checkpoints S_k; labels [n] int32/int64 (any stride). With
r_kic = S_kic − T_ic, d_ki = Σ_c |r_kic| and CE_i = logsumexp_c T_ic − T_{i,y_i}:

    loss  = inv_batch · Σ_i [Σ_k φ(d_ki) + α·CE_i]
    dS_kic = inv_batch · g_ki·sgn(r_kic)                                   (sgn(0) = 0)
    dT_ic  = inv_batch · [−Σ_k g_ki·sgn(r_kic) + α·(softmax(T_i)_c − 1[c = y_i])]

with φ(d) = −d/C, g = −1/C (``log=False``) or φ(d) = −log(d + ε), g = −1/(d + ε) (``log=True``).
All arithmetic is fp32 (loads are converted at once); dz is written in z's dtype, contiguous.

Work split:

* ``_apm_loss_kernel`` (C ≤ MAX_BLOCK_C = 4096), grid (⌈n / BLOCK_N⌉,): a program owns BLOCK_N
  samples × BLOCK_C = next_power_of_2(C) columns — BLOCK_N = 512 / BLOCK_C samples with 4 warps
  when BLOCK_C ≤ 512, else one sample with BLOCK_C / 256 warps (4, 8, 16): 4–8 fp32 per thread per
  tile (see ROW_TILE below for why not 4096-element tiles with 4 warps). It loads the teacher tile
  once into registers and takes its row max, Σexp and CE from it, then loops over k = 1..K (runtime
  K): each checkpoint tile is read once, d_k is reduced from registers, dS_k is written at once and
  g_k·sgn(r_k) is added to the teacher's accumulator tile; finally dT is written (softmax recomputed
  from the teacher tile, so the exponentials are not held across the loop). Every element of z is
  read once, every element of dz written once.
* ``_apm_loss_chunked_kernel`` (C > MAX_BLOCK_C, e.g. ImageNet-21k heads), grid (n,): one program
  per sample, columns streamed in chunks of CHUNK_C. Pass 1 is an online logsumexp over the teacher
  row; pass 2 reduces d_k for every k (and, with ``log=True`` and the gradient, stores g_k to a
  [K, n] fp32 scratch buffer, then a CTA barrier); pass 3 (gradient only) walks the column chunks,
  holding one teacher chunk and its accumulator in registers while it streams the K checkpoint
  chunks (dS written at once) and then writes the dT chunk. Checkpoint rows are read twice, the
  teacher row K + 3 times (from L2). There is no upper limit on C.

Each program writes its share inv_batch·Σ_rows[…] of the loss to a partial buffer (one slot per
program), which is summed on the host by torch (fixed size, fixed order: deterministic, no atomics).

Offsets are int32 and loop-carried (advanced by one slab per k): the host checks that z's span and
dz's size stay below 2³¹ elements (8 GiB of fp32 logits) and raises ValueError otherwise. 64-bit
per-element offsets would cost two more registers per tile element.

NaN/Inf: propagate through the loss as in the reference; sgn(NaN) is 0 here (torch.sign gives NaN),
so a NaN logit does not turn its whole gradient row NaN. Nothing raises on non-finite values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4
# fp32 elements of one tile per thread. Multi-row tiles (BLOCK_C ≤ 512) get ROW_TILE = 512 elements
# with 4 warps (4 per thread): their per-row values (max, Σexp, d, g, labels, ...) are replicated in
# every thread that holds a piece of the row, so 1024-element multi-row tiles took 150–196 registers.
# Single-row tiles of BLOCK_C ≥ 1024 take BLOCK_C / (32·WIDE_PER_THREAD) warps (4, 8, 16): 8 per thread.
ROW_TILE = 512
WIDE_PER_THREAD = 8
# Largest row held whole in registers (BLOCK_N = 1, 16 warps); wider rows take the chunked kernel.
MAX_BLOCK_C = 4096
# Column chunk of the chunked kernel (one sample per program, NUM_WARPS warps: 8 per thread).
CHUNK_C = 1024

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _sign(r):
    """sgn(r) with sgn(0) = 0 (torch.sign / the l1 backward)."""
    return tl.where(r > 0, 1.0, 0.0) - tl.where(r < 0, 1.0, 0.0)


@triton.jit
def _apm_loss_kernel(
    z_ptr, labels_ptr, dz_ptr, partial_ptr,
    K, N, C,
    s_k, s_n, s_c, s_lab,
    inv_batch, alpha, eps,
    LOG: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    mask_n = rows < N
    mask = mask_n[:, None] & (cols < C)[None, :]

    # Teacher tile (registers for the whole program) and its cross-entropy.
    s_off = rows[:, None] * s_n + cols[None, :] * s_c
    t = tl.load(z_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(labels_ptr + rows * s_lab, mask=mask_n, other=0).to(tl.int32)
    row_max = tl.where(mask_n, tl.max(tl.where(mask, t, float("-inf")), axis=1), 0.0)
    sum_exp = tl.sum(tl.where(mask, tl.exp(t - row_max[:, None]), 0.0), axis=1)
    sum_exp = tl.where(mask_n, sum_exp, 1.0)
    t_y = tl.sum(tl.where((cols[None, :] == y[:, None]) & mask, t, 0.0), axis=1)
    ce = row_max + tl.log(sum_exp) - t_y

    # The K checkpoints, each tile read once. The int32 offsets are loop-carried (advanced by one
    # slab per k) rather than rebuilt from a loop-invariant tile: LLVM would hoist that tile's
    # 64-bit form out of the loop, two more registers per element.
    c_f = C * 1.0  # (C may be specialised to the constexpr 1)
    phi_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)  # Σ_k g_k·sgn(r_k)
    slab = N * C
    d_off = rows[:, None] * C + cols[None, :]  # dz is contiguous
    for _k in range(0, K):
        s_off += s_k
        sv = tl.load(z_ptr + s_off, mask=mask, other=0.0).to(tl.float32)
        r = sv - t
        d = tl.sum(tl.abs(r), axis=1)
        if LOG:
            phi_acc += -tl.log(d + eps)
            gs = (-1.0 / (d + eps))[:, None] * _sign(r)
        else:
            phi_acc += -d / c_f
            gs = _sign(r) * (-1.0 / c_f)
        if WITH_GRAD:
            d_off += slab
            tl.store(dz_ptr + d_off, (gs * inv_batch).to(dz_ptr.dtype.element_ty), mask=mask)
            acc += gs

    if WITH_GRAD:
        # softmax recomputed from the teacher tile rather than kept across the loop
        p = tl.exp(t - row_max[:, None]) / sum_exp[:, None]
        onehot = tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        dt = (alpha * (p - onehot) - acc) * inv_batch
        tl.store(dz_ptr + rows[:, None] * C + cols[None, :], dt.to(dz_ptr.dtype.element_ty), mask=mask)

    part = tl.sum(tl.where(mask_n, phi_acc + alpha * ce, 0.0), axis=0)
    tl.store(partial_ptr + pid, part * inv_batch)


@triton.jit
def _apm_loss_chunked_kernel(
    z_ptr, labels_ptr, dz_ptr, g_ptr, partial_ptr,
    K, N, C,
    s_k, s_n, s_c, s_lab,
    inv_batch, alpha, eps,
    LOG: tl.constexpr,
    WITH_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One sample per program, columns in chunks of BLOCK_C (C > MAX_BLOCK_C)."""
    row = tl.program_id(0)
    cols0 = tl.arange(0, BLOCK_C)
    t_row = z_ptr + row * s_n
    y = tl.load(labels_ptr + row * s_lab).to(tl.int32)

    # Pass 1: online logsumexp of the teacher row (running max m, Σ exp(t − m)); m starts at T[row, 0].
    m = tl.load(t_row).to(tl.float32)
    s = 0.0
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        mask = cols < C
        t = tl.load(t_row + cols * s_c, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(tl.where(mask, t, float("-inf")), axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(mask, tl.exp(t - m_new), 0.0), axis=0)
        m = m_new
    t_y = tl.load(t_row + y * s_c).to(tl.float32)
    ce = m + tl.log(s) - t_y

    # Pass 2: d_k = ‖S_k − T‖₁ of this row for every k (g_k to the scratch buffer for pass 3).
    c_f = C * 1.0  # (C may be specialised to the constexpr 1)
    phi = 0.0
    s_row = t_row
    g_row = g_ptr + row
    for _k in range(0, K):
        s_row += s_k
        dv = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = cols < C
            t = tl.load(t_row + cols * s_c, mask=mask, other=0.0).to(tl.float32)
            sv = tl.load(s_row + cols * s_c, mask=mask, other=0.0).to(tl.float32)
            dv += tl.abs(sv - t)
        d = tl.sum(dv, axis=0)
        if LOG:
            phi += -tl.log(d + eps)
            if WITH_GRAD:
                tl.store(g_row, -1.0 / (d + eps))
                g_row += N
        else:
            phi += -d / c_f

    # Pass 3: per column chunk, the teacher chunk and its accumulator stay in registers while the
    # K checkpoint chunks stream past (dS written at once); then the dT chunk.
    if WITH_GRAD:
        if LOG:
            tl.debug_barrier()  # the g_k stores above are read back by every thread below
        slab = N * C
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            mask = cols < C
            s_off = cols * s_c
            t = tl.load(t_row + s_off, mask=mask, other=0.0).to(tl.float32)
            acc = tl.zeros([BLOCK_C], dtype=tl.float32)
            d_off = row * C + cols
            g_row = g_ptr + row
            for _k in range(0, K):
                s_off += s_k
                d_off += slab
                sv = tl.load(t_row + s_off, mask=mask, other=0.0).to(tl.float32)
                if LOG:
                    gs = tl.load(g_row) * _sign(sv - t)
                    g_row += N
                else:
                    gs = _sign(sv - t) * (-1.0 / c_f)
                tl.store(dz_ptr + d_off, (gs * inv_batch).to(dz_ptr.dtype.element_ty), mask=mask)
                acc += gs
            p = tl.exp(t - m) / s
            dt = (alpha * (p - tl.where(cols == y, 1.0, 0.0)) - acc) * inv_batch
            tl.store(dz_ptr + row * C + cols, dt.to(dz_ptr.dtype.element_ty), mask=mask)

    tl.store(partial_ptr + row, (phi + alpha * ce) * inv_batch)


# ----------------------------------------------------------------------------------------------
# Launch configuration (shared by the launcher and the AOT tests)
# ----------------------------------------------------------------------------------------------
def blocks(num_classes: int) -> tuple[bool, int, int, int]:
    """(chunked, BLOCK_N, BLOCK_C, num_warps) for C classes (independent of n, so a run with
    varying segment sizes compiles one specialisation).

    C ≤ 512: BLOCK_C = next_power_of_2(C), BLOCK_N = ROW_TILE / BLOCK_C samples, 4 warps.
    512 < C ≤ MAX_BLOCK_C: one sample per program, BLOCK_C / 256 warps (4, 8 or 16).
    C > MAX_BLOCK_C: the chunked kernel, one sample per program, CHUNK_C columns per step, 4 warps."""
    if num_classes > MAX_BLOCK_C:
        return True, 1, CHUNK_C, NUM_WARPS
    bc = triton.next_power_of_2(max(num_classes, 1))
    if bc <= ROW_TILE:
        return False, ROW_TILE // bc, bc, NUM_WARPS
    return False, 1, bc, max(NUM_WARPS, bc // (32 * WIDE_PER_THREAD))


# ----------------------------------------------------------------------------------------------
# Host launcher
# ----------------------------------------------------------------------------------------------
def apm_loss_forward(z: torch.Tensor, labels: torch.Tensor, inv_batch: float, alpha: float, log: bool,
                     eps: float, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss: 0-dim float32, dz: dloss/dz contiguous in z's dtype, or ``z.new_empty(0)`` without
    ``with_grad``). Inputs are validated by ddfast.ops.apm_loss; here only what the kernels need."""
    if z.dtype not in _DTYPES:
        raise TypeError(f"apm_loss (triton) supports float32/float16/bfloat16 logits, got {z.dtype}")
    if z.ndim != 3 or z.shape[0] < 2:
        raise ValueError(f"apm_loss (triton) expects logits [K+1 >= 2, n, C], got {tuple(z.shape)}")
    if labels.dtype not in (torch.int32, torch.int64) or labels.shape != (z.shape[1],):
        raise ValueError(f"labels must be int32/int64 of shape ({z.shape[1]},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    k1, n, num_classes = z.shape
    dev = z.device
    dz = torch.empty((k1, n, num_classes), dtype=z.dtype, device=dev) if with_grad else z.new_empty(0)
    if n == 0 or num_classes == 0:
        if with_grad:
            dz.zero_()
        return torch.zeros((), dtype=torch.float32, device=dev), dz

    s_k, s_n, s_c = z.stride()
    k = k1 - 1
    # int32 offsets (see the module docstring): z's span and dz's size must stay below 2^31.
    span = k * s_k + (n - 1) * s_n + (num_classes - 1) * s_c
    if max(span, k1 * n * num_classes) > _INT32_MAX:
        raise ValueError(f"apm_loss (triton) indexes z and dz with int32 offsets: z [K+1, n, C] = {tuple(z.shape)} "
                         f"with strides {tuple(z.stride())} spans {max(span, k1 * n * num_classes)} >= 2^31 elements")
    labels = labels.to(dev)
    chunked, bn, bc, warps = blocks(num_classes)
    args = (k, n, num_classes, s_k, s_n, s_c, labels.stride(0), float(inv_batch), float(alpha), float(eps))
    if chunked:
        partials = torch.empty(n, dtype=torch.float32, device=dev)
        g_buf = torch.empty((k, n) if (with_grad and log) else (1,), dtype=torch.float32, device=dev)
        _apm_loss_chunked_kernel[(n,)](
            z, labels, dz, g_buf, partials, *args,
            LOG=bool(log), WITH_GRAD=bool(with_grad), BLOCK_C=bc, num_warps=warps,
        )
    else:
        grid = triton.cdiv(n, bn)
        partials = torch.empty(grid, dtype=torch.float32, device=dev)
        _apm_loss_kernel[(grid,)](
            z, labels, dz, partials, *args,
            LOG=bool(log), WITH_GRAD=bool(with_grad), BLOCK_N=bn, BLOCK_C=bc, num_warps=warps,
        )
    return partials.sum(), dz
