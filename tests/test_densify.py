"""K3 (G-VBSM Gram-eigen data densification): the batched Jacobi eigensolver against float64
torch.linalg.eigh, the loss and its image gradient on every backend against the float64 reference
(ragged classes, singletons, 1/3 channels, 28/32/64 px), gradcheck, the official loop as a second
oracle, errors (NaN/Inf -> ValueError, non-convergence -> warning), Triton under the interpreter and
AOT-compiled for sm_80/sm_90, and the CUDA eigensolver compile-checked with nvcc for sm_80/sm_90a."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from ddfast.backend import use_backend
from ddfast.ops import densify as dop
from ddfast.ops import densify_loss
from ddfast.reference import densify as ref
from ddfast.reference.densify_official import densify_loss_official
from ddfast.testing import AotRequest, aot_compile_many, rel_error

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These tests run many small torch ops; on the shared 2-core machine every intra-op parallel
    region can stall for a scheduler slice, so the module runs torch single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def _matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    """Symmetric PSD test matrices (float64)."""
    gen = _gen(seed)
    q = _orthogonal(n, gen)
    if kind == "spd":  # well conditioned: eigenvalues in [1, 10]
        ev = 1 + 9 * torch.rand(n, generator=gen, dtype=F64)
    elif kind == "rank_deficient":  # rank max(1, n // 3): a Gram matrix of fewer vectors than rows
        x = torch.randn(n, max(1, n // 3), generator=gen, dtype=F64)
        return x @ x.T
    elif kind == "repeated":  # three eigenvalues, each repeated (eigenspaces of dimension ~n/3)
        ev = torch.tensor([1.0, 4.0, 9.0], dtype=F64)[torch.arange(n) % 3]
    else:
        raise ValueError(kind)
    a = (q * ev) @ q.T
    return (a + a.T) / 2


def _clusters(w: torch.Tensor, tol: float) -> list[torch.Tensor]:
    """Index groups of (numerically) equal eigenvalues of an ascending w."""
    groups, start = [], 0
    for i in range(1, len(w) + 1):
        if i == len(w) or w[i] - w[i - 1] > tol:
            groups.append(torch.arange(start, i))
            start = i
    return groups


def _labels(counts: list[int], seed: int, values: list[int] | None = None) -> torch.Tensor:
    values = values if values is not None else list(range(len(counts)))
    lab = torch.cat([torch.full((c,), v, dtype=torch.long) for v, c in zip(values, counts)])
    return lab[torch.randperm(len(lab), generator=_gen(seed))]  # shuffled, not sorted


def _images(b: int, c: int, h: int, seed: int, dtype=torch.float32, pool: int = 32) -> torch.Tensor:
    """A shared pattern plus per-image noise, scaled so the class Gram eigenvalues spread over ~2-20:
    the softmaxes are then neither one-hot nor uniform and the loss and gradient are non-trivial.
    (With raw N(0, 1) pixels the eigenvalues are ~C·32² apart and both softmaxes are one-hot: the
    loss is exactly 0 in float64 — the "DD ≡ 0 early on" regime of the G-VBSM paper.)"""
    gen = _gen(seed)
    d = c * pool * pool
    noise = (8.0 / d) ** 0.5 * max(1.0, h / pool)  # pooled noise variance ~ 8 / D per feature
    base = torch.rand(1, c, h, h, generator=gen, dtype=F64)
    x = (0.5 / d) ** 0.5 * base + noise * torch.randn(b, c, h, h, generator=gen, dtype=F64)
    return x.to(dtype)


def _reference(x: torch.Tensor, labels: torch.Tensor, tau: float = 4.0, pool: int = 32):
    x64 = x.detach().to(F64).requires_grad_(True)
    loss = ref.densify_loss(x64, labels, tau, pool)
    (grad,) = torch.autograd.grad(loss, x64)
    return loss.detach(), grad


def _op(x: torch.Tensor, labels: torch.Tensor, backend: str, tau: float = 4.0, pool: int = 32):
    xg = x.detach().clone().requires_grad_(True)
    with use_backend(backend):
        loss = densify_loss(xg, labels, tau, pool)
    loss.backward()
    return loss.detach(), xg.grad


# ---------------------------------------------------------------------------------------------
# A. the batched Jacobi eigensolver (csrc/jacobi.h through ddfast._C.jacobi_eigh)
# ---------------------------------------------------------------------------------------------
EIG_NS = [1, 2, 3, 10, 33, 64, 128]
EIG_KINDS = ["spd", "rank_deficient", "repeated"]


@pytest.fixture(scope="module")
def eig_results():
    """Every (kind, n) matrix through the Jacobi solver in float64 and float32 (one batched call per
    n and dtype) next to float64 torch.linalg.eigh."""
    out = {}
    for n in EIG_NS:
        mats = torch.stack([_matrix(kind, n, seed=n * 10 + i) for i, kind in enumerate(EIG_KINDS)])
        w_ref, v_ref = torch.linalg.eigh(mats)
        for dtype in (F64, torch.float32):
            w, v, status = dop.jacobi_eigh(mats.to(dtype))
            for i, kind in enumerate(EIG_KINDS):
                out[(kind, n, dtype)] = (mats[i], w_ref[i], v_ref[i], w[i].to(F64), v[i].to(F64), int(status[i]))
    return out


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", EIG_KINDS)
@pytest.mark.parametrize("n", EIG_NS)
def test_jacobi_eigenpairs_match_float64_eigh(eig_results, n, kind, dtype):
    a, w_ref, v_ref, w, v, status = eig_results[(kind, n, dtype)]
    eps = torch.finfo(dtype).eps
    scale = float(w_ref.abs().max())
    assert status == (0 if n == 1 else status) and (n == 1 or 1 <= status <= dop.MAX_SWEEPS), status
    # eigenvalues (ascending, like eigh): norm-wise relative error, and elementwise for the SPD case
    ev_tol = 1e-12 if dtype == F64 else 1e-5
    assert rel_error(w, w_ref) <= ev_tol, f"eigenvalue relative error {rel_error(w, w_ref):.2e}"
    assert float((w - w_ref).abs().max()) <= 40 * eps * scale
    if kind == "spd":
        assert float(((w - w_ref).abs() / w_ref.abs()).max()) <= ev_tol
    # eigenvectors: orthonormal, V diag(w) V^T = A, and the projector of every eigenspace (repeated
    # eigenvalues: any basis of the space is right; rank-deficient: the null space is one cluster)
    vec_tol = 1e-11 if dtype == F64 else 2e-4
    eye = torch.eye(n, dtype=F64)
    assert float((v.T @ v - eye).abs().max()) <= vec_tol
    assert rel_error((v * w) @ v.T, a) <= vec_tol
    # (an eigenspace is determined to ~eps ||A|| / gap: the tolerance follows the gap to the rest).
    # For orthonormal bases ||P_c - P_ref,c||_F^2 = 2 Σ_{i ∉ c, j ∈ c} (v_i . v_ref,j)^2 (no cancellation),
    # all from one overlap matrix.
    overlap = ((v.T @ v_ref) ** 2).numpy()
    w_np = w_ref.numpy()
    for idx in _clusters(w_ref, tol=1e-6 * scale):
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        dist = (2 * float(overlap[:lo, lo:hi].sum() + overlap[hi:, lo:hi].sum())) ** 0.5
        gaps = [w_np[lo] - w_np[lo - 1]] if lo > 0 else []
        gaps += [w_np[hi] - w_np[hi - 1]] if hi < n else []
        gap = min(gaps) if gaps else scale
        tol = 20 * n**0.5 * eps * scale / gap + 20 * n * eps
        assert dist <= tol, f"eigenspace {lo}..{hi - 1}: projector error {dist:.2e} (gap {gap:.2e})"


@pytest.mark.parametrize("n", [2, 3, 33, 64])
def test_jacobi_gpu_work_split_matches_serial_bit_for_bit(n):
    """lanes > 1 runs the CUDA kernel's code path (work items spread over a block's threads, phases
    separated by barriers, shared rotation counters) one lane after another: same algorithm, same
    per-element arithmetic, so the results must equal the CPU path exactly."""
    mats = torch.stack([_matrix(kind, n, seed=7 + n) for kind in EIG_KINDS])
    w1, v1, s1 = dop.jacobi_eigh(mats, lanes=1)
    for lanes in (3, 32, 256):
        w, v, s = dop.jacobi_eigh(mats, lanes=lanes)
        assert torch.equal(s, s1) and torch.equal(w, w1) and torch.equal(v, v1), lanes


def test_jacobi_reports_non_convergence_and_non_finite():
    a = torch.stack([_matrix("spd", 64, seed=1), _matrix("spd", 64, seed=2)])
    a[1, 5, 3] = float("nan")  # the lower triangle is read (like torch.linalg.eigh)
    w, v, status = dop.jacobi_eigh(a, max_sweeps=1)
    assert status.tolist() == [-1, -2]  # one sweep is not enough for n = 64; NaN: not iterated
    w, v, status = dop.jacobi_eigh(a[:1], max_sweeps=40)
    assert 1 < int(status[0]) <= 40
    z = torch.zeros(1, 5, 5, dtype=F64)  # all-zero matrix: nothing to rotate, eigenvalues 0
    w, v, status = dop.jacobi_eigh(z)
    assert int(status[0]) == 1 and w.abs().max() == 0 and torch.equal(v[0], torch.eye(5, dtype=F64))


# ---------------------------------------------------------------------------------------------
# B. the loss and its image gradient vs the float64 reference
# ---------------------------------------------------------------------------------------------
LAYOUTS = {"1x100": [100], "10x10": [10] * 10, "100x1": [1] * 100, "ragged": [7, 1, 12, 3]}
CHANNELS = [1, 3]
SIZES = [28, 32, 64]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cpu_loss_and_gradient_match_float64_reference(layout, channels, size):
    counts = LAYOUTS[layout]
    seed = zlib.crc32(f"{layout}-{channels}-{size}".encode())  # deterministic (hash() is salted)
    x = _images(sum(counts), channels, size, seed)
    labels = _labels(counts, seed)
    loss64, grad64 = _reference(x, labels)
    loss, grad = _op(x, labels, "cpu")
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32 and grad.shape == x.shape
    if layout == "100x1":  # one image per class: every class contributes exactly 0
        assert float(loss) == 0.0 and float(grad.abs().max()) == 0.0 and float(loss64) == 0.0
        return
    assert float(loss64) > 1e-3  # the test data give a non-trivial loss
    assert abs(float(loss) - float(loss64)) <= 1e-5 * abs(float(loss64))
    assert rel_error(grad, grad64) <= 1e-4, f"gradient relative error {rel_error(grad, grad64):.2e}"


@pytest.mark.parametrize("layout", ["ragged", "10x10"])
def test_cpu_float64_images_are_exact(layout):
    counts = LAYOUTS[layout]
    x = _images(sum(counts), 3, 32, seed=3, dtype=F64)
    labels = _labels(counts, seed=3, values=[-5, 1000, 3, 42, 7, 8, 9, 10, 11, 12][: len(counts)])
    loss64, grad64 = _reference(x, labels)
    loss, grad = _op(x, labels, "cpu")
    assert loss.dtype == F64
    assert abs(float(loss) - float(loss64)) <= 1e-11 * abs(float(loss64))
    assert rel_error(grad, grad64) <= 1e-9


def test_cpu_layouts_dtypes_tau_pool_and_upstream_gradient():
    counts = [7, 1, 12, 3]
    labels = _labels(counts, seed=4)
    x = _images(sum(counts), 3, 20, seed=4, pool=8)  # 20 px pooled to 8: bins of 2 and 3 pixels
    loss64, grad64 = _reference(x, labels, tau=2.5, pool=8)
    for variant in (x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
        loss, grad = _op(variant, labels, "cpu", tau=2.5, pool=8)
        assert abs(float(loss) - float(loss64)) <= 1e-5 * float(loss64)
        assert rel_error(grad, grad64) <= 1e-4
    xb = x.to(torch.bfloat16)
    loss_b64, grad_b64 = _reference(xb, labels, tau=2.5, pool=8)
    loss, grad = _op(xb, labels, "cpu", tau=2.5, pool=8)
    assert grad.dtype == torch.bfloat16 and rel_error(grad, grad_b64) <= 1e-2
    # the backward scales by the upstream gradient
    xg = x.clone().requires_grad_(True)
    (3.0 * densify_loss(xg, labels, 2.5, 8)).backward()
    assert rel_error(xg.grad, 3.0 * grad64) <= 1e-4
    # no grad requested: no gradient is computed, the loss is the same
    with torch.no_grad():
        assert abs(float(densify_loss(x, labels, 2.5, 8)) - float(loss64)) <= 1e-5 * float(loss64)


@pytest.mark.parametrize("layout", ["ragged", "10x10", "1x100"])
def test_reference_backend_and_official_loop_agree(layout):
    counts = LAYOUTS[layout]
    x = _images(sum(counts), 1, 28, seed=5, dtype=F64)
    labels = _labels(counts, seed=5)
    loss64, grad64 = _reference(x, labels)
    x2 = x.clone().requires_grad_(True)
    official = densify_loss_official(x2, labels)
    (grad_off,) = torch.autograd.grad(official, x2)
    assert abs(float(official.detach()) - float(loss64)) <= 1e-9 * float(loss64)
    assert rel_error(grad_off, grad64) <= 1e-7
    loss, grad = _op(x, labels, "reference")
    assert abs(float(loss) - float(loss64)) <= 1e-12 * float(loss64) and rel_error(grad, grad64) <= 1e-12


@pytest.mark.parametrize("layout", ["ragged", "1x100"])
def test_reference_autograd_equals_closed_form(layout):
    """DESIGN §4 K3: dλ = softmax(λ) − softmax(λ/τ), dG = V diag(dλ) Vᵀ, dX̂ = 2 dG X̂, pool backward."""
    counts = LAYOUTS[layout]
    x = _images(sum(counts), 3, 28, seed=6, dtype=F64, pool=16)
    labels = _labels(counts, seed=6)
    loss, grad = _reference(x, labels, tau=4.0, pool=16)
    closed = ref.closed_form_grad(x, labels, tau=4.0, pool=16)  # per class, explicit formulas
    assert rel_error(grad, closed) <= 1e-10
    loss_b, grad_b = ref.densify_loss_and_grad(x, labels, tau=4.0, pool=16)  # batched closed form
    assert abs(float(loss_b) - float(loss)) <= 1e-12 * float(loss) and rel_error(grad_b, closed) <= 1e-10


def test_gradcheck_reference_and_cpu_op():
    """The loss has a stop-gradient target p = sg(softmax(λ/τ)), so its gradient is the derivative with
    p held fixed: gradcheck the surrogate Σ_k −p_k(x0)·log softmax(λ_k(x)) (same value up to a constant,
    same gradient at x0) through the reference's autograd, and compare the op's gradient with it."""
    x0 = _images(8, 1, 6, seed=8, dtype=F64, pool=3)
    labels = _labels([4, 1, 3], seed=8)
    tau, pool = 1.5, 3  # D = 9 features keep the eigenvalues O(1): softmaxes far from one-hot

    with torch.no_grad():
        lam0, valid, _ = ref.densify_eigenvalues(x0, labels, pool)
        p0 = torch.softmax((lam0 / tau).masked_fill(~valid, float("-inf")), dim=-1)

    def surrogate(t):
        lam, _, _ = ref.densify_eigenvalues(t, labels, pool)
        log_q = torch.log_softmax(lam.masked_fill(~valid, float("-inf")), dim=-1)
        return -(p0 * torch.where(valid, log_q, torch.zeros_like(log_q))).sum()

    x = x0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(surrogate, (x,), eps=1e-6, atol=1e-8, rtol=1e-5, fast_mode=True)
    (g_sur,) = torch.autograd.grad(surrogate(x), x)
    _, g_ref = _reference(x0, labels, tau, pool)
    assert rel_error(g_ref, g_sur) <= 1e-10
    for backend in ("cpu", "reference"):
        _, g = _op(x0, labels, backend, tau, pool)
        assert rel_error(g, g_sur) <= 1e-10, backend


def test_custom_op_registration():
    x = _images(10, 1, 8, seed=9, pool=8)
    labels = _labels([6, 4], seed=9)
    with use_backend("cpu"):
        torch.library.opcheck(dop.densify_forward, (x.requires_grad_(True), labels, 4.0, 8, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_images_raise_value_error(backend, bad):
    x = _images(6, 1, 8, seed=10, pool=8)
    x[4, 0, 3, 2] = bad
    labels = _labels([3, 3], seed=10)
    with use_backend(backend), pytest.raises(ValueError, match="NaN or Inf"):
        densify_loss(x.requires_grad_(True), labels, 4.0, 8)


def test_bad_arguments_and_empty_batch():
    x = _images(4, 1, 8, seed=11)
    with pytest.raises(ValueError):
        densify_loss(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        densify_loss(x, torch.zeros(4), 4.0, 8)  # float labels
    with pytest.raises(ValueError):
        densify_loss(x, torch.zeros(4, dtype=torch.long), 0.0, 8)
    with pytest.raises(ValueError):
        densify_loss(x[0], torch.zeros(4, dtype=torch.long))
    empty = torch.zeros(0, 3, 8, 8, requires_grad=True)
    loss = densify_loss(empty, torch.zeros(0, dtype=torch.long), 4.0, 8)
    loss.backward()
    assert float(loss) == 0.0 and empty.grad.shape == empty.shape
    for backend in ("cpu", "reference"):  # no channels: every Gram matrix is 0, so is the loss
        no_channels = torch.zeros(4, 0, 8, 8, requires_grad=True)
        with use_backend(backend):
            loss = densify_loss(no_channels, torch.tensor([0, 0, 1, 1]), 4.0, 8)
        loss.backward()
        assert float(loss.detach()) == 0.0 and no_channels.grad.shape == no_channels.shape
    with pytest.raises(ValueError, match="2\\^31"):
        with use_backend("cpu"):
            densify_loss(x, torch.zeros(4, dtype=torch.long), 4.0, 50_000)


def test_non_convergence_warns(monkeypatch):
    # classes under 9 images use the bounded Jacobi solver on the cpu backend (larger ones LAPACK)
    monkeypatch.setattr(dop, "MAX_SWEEPS", 1)
    x = _images(8, 3, 16, seed=12, pool=16)
    with use_backend("cpu"), pytest.warns(RuntimeWarning, match="did not converge"):
        densify_loss(x.requires_grad_(True), _labels([8], seed=12), 4.0, 16)


def test_default_dispatch_uses_cpu_extension():
    x = _images(12, 1, 8, seed=13, pool=8).requires_grad_(True)
    labels = _labels([5, 7], seed=13)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = densify_loss(x, labels, 4.0, 8)
    assert dop._backend_for(x) == "cpu" and loss.grad_fn is not None


# ---------------------------------------------------------------------------------------------
# C. Triton kernels under the interpreter (small shapes: the interpreter runs kernels in Python)
# ---------------------------------------------------------------------------------------------
TRITON_CASES = [  # (counts, C, H, pool)
    ([7, 1, 12, 3], 1, 8, 8),  # ragged, no pooling (X̂ is a view of the images)
    ([7, 1, 12, 3], 1, 12, 8),  # ragged, 12 -> 8: overlapping bins
    ([5, 4], 1, 6, 8),  # upsampling 6 -> 8 (pixels in several bins)
    ([20, 17], 1, 8, 4),  # two row tiles of 16 in the Gram / dX kernels
    ([1, 1, 1], 1, 4, 4),  # singletons: loss and gradient 0
    ([3, 3], 3, 32, 32),  # the real feature size, D = 3072
]


@pytest.mark.parametrize("counts,c,h,pool", TRITON_CASES, ids=[f"{len(k)}cls-{c}x{h}-p{p}" for k, c, h, p in TRITON_CASES])
def test_triton_matches_float64_reference(counts, c, h, pool):
    x = _images(sum(counts), c, h, seed=sum(counts) + h, pool=pool)
    labels = _labels(counts, seed=h)
    loss64, grad64 = _reference(x, labels, pool=pool)
    loss, grad = _op(x, labels, "triton", pool=pool)
    assert loss.dtype == torch.float32 and grad.shape == x.shape
    if max(counts) == 1:
        assert float(loss) == 0.0 and float(grad.abs().max()) == 0.0
        return
    assert abs(float(loss) - float(loss64)) <= 1e-5 * float(loss64)
    assert rel_error(grad, grad64) <= 1e-4, f"gradient relative error {rel_error(grad, grad64):.2e}"


def test_triton_bf16_channels_last():
    counts = [6, 5]
    x = _images(sum(counts), 2, 10, seed=14, pool=8).to(torch.bfloat16).to(memory_format=torch.channels_last)
    labels = _labels(counts, seed=14)
    loss64, grad64 = _reference(x, labels, pool=8)
    loss, grad = _op(x, labels, "triton", pool=8)
    assert grad.dtype == torch.bfloat16 and grad.is_contiguous(memory_format=torch.channels_last)
    assert abs(float(loss) - float(loss64)) <= 1e-5 * float(loss64)
    assert rel_error(grad, grad64) <= 1e-2  # one bf16 rounding of the result


# ---------------------------------------------------------------------------------------------
# D. AOT compilation of the Triton kernels for sm_80 / sm_90 (no spills)
# ---------------------------------------------------------------------------------------------
def _aot_configs() -> dict[str, tuple[str, dict, dict]]:
    """label -> (kernel name, signature, constexprs) for launch configurations the launcher picks."""
    from ddfast.kernels import densify as kd

    i32 = "i32"
    configs = {}
    for xt, h, pool in (("*fp32", 64, 32), ("*bf16", 28, 32)):  # downsampling / upsampling bins
        ce = {"P": pool, "KH": kd.pool_taps(h, pool), "KW": kd.pool_taps(h, pool), "BLOCK": kd.POOL_BLOCK}
        sig = dict(img_ptr=xt, out_ptr="*fp32", C=i32, H=i32, W=i32, s_b=i32, s_c=i32, s_h=i32, s_w=i32,
                   P="constexpr", KH="constexpr", KW="constexpr", BLOCK="constexpr")
        configs[f"_pool_kernel[{xt[1:]},{h}->{pool}]"] = ("_pool_kernel", sig, ce)
        ce = {"P": pool, "NH": kd.pool_bwd_taps(h, pool), "NW": kd.pool_bwd_taps(h, pool), "BLOCK": kd.POOL_BLOCK}
        sig = dict(g_ptr="*fp32", dimg_ptr=xt, C=i32, H=i32, W=i32, s_b=i32, s_c=i32, s_h=i32, s_w=i32,
                   P="constexpr", NH="constexpr", NW="constexpr", BLOCK="constexpr")
        configs[f"_pool_bwd_kernel[{xt[1:]},{h}->{pool}]"] = ("_pool_bwd_kernel", sig, ce)
    for n_max, ot in ((10, "*fp32"), (128, "*bf16")):  # the smallest and the largest tiles
        bn = kd.gram_block(n_max)
        sig = dict(x_ptr="*fp32", order_ptr="*i64", offsets_ptr="*i64", counts_ptr="*i64", g_ptr="*fp64",
                   D=i32, stride_x=i32, NMAX=i32, BLOCK_N="constexpr", BLOCK_D="constexpr")
        configs[f"_gram_kernel[N{bn}]"] = ("_gram_kernel", sig, {"BLOCK_N": bn, "BLOCK_D": kd.BLOCK_D_GRAM})
        bm = kd.dx_block(n_max)
        sig = dict(x_ptr="*fp32", coef_ptr="*fp32", order_ptr="*i64", offsets_ptr="*i64", counts_ptr="*i64",
                   out_ptr=ot, D=i32, stride_x=i32, stride_out=i32, NMAX=i32,
                   BLOCK_M="constexpr", BLOCK_J="constexpr", BLOCK_D="constexpr")
        ce = {"BLOCK_M": bm, "BLOCK_J": kd.BLOCK_J_DX, "BLOCK_D": kd.BLOCK_D_DX}
        configs[f"_dx_kernel[{ot[1:]},M{bm}]"] = ("_dx_kernel", sig, ce)
    return configs


AOT_ARCHS = (80, 90)
AOT_LABELS = [f"{label}@sm{arch}" for label in _aot_configs() for arch in AOT_ARCHS]


@pytest.fixture(scope="module")
def aot_reports():
    from ddfast.kernels import densify as kd

    configs = _aot_configs()
    requests = [AotRequest(getattr(kd, name), sig, ce, arch, kd.NUM_WARPS)
                for name, sig, ce in configs.values() for arch in AOT_ARCHS]
    return dict(zip(AOT_LABELS, aot_compile_many(requests)))


@pytest.mark.parametrize("label", AOT_LABELS)
def test_triton_aot_compiles_without_spills(aot_reports, label):
    report = aot_reports[label]
    print(f"\n{label}: {report.registers} registers, {report.spills} spill bytes, {report.stack_bytes} stack bytes")
    assert report.spills == 0 and report.registers <= 255


# ---------------------------------------------------------------------------------------------
# E. the CUDA eigensolver (csrc/densify_cuda.cu) compiles with nvcc for sm_80 and sm_90a
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nvcc_reports(tmp_path_factory):
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path_factory.mktemp("nvcc")
    procs = {
        arch: subprocess.Popen(
            [nvcc, "-std=c++17", "-O3", f"-arch={arch}", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}", "-c",
             str(ROOT / "csrc" / "densify_cuda.cu"), "-o", str(out / f"densify_{arch}.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for arch in ("sm_80", "sm_90a")
    }
    return {arch: (p.wait(), p.stdout.read()) for arch, p in procs.items()}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_cuda_eigensolver_compiles_with_nvcc(nvcc_reports, arch):
    rc, log = nvcc_reports[arch]
    assert rc == 0, log[-4000:]
    assert "warning" not in log.lower(), log[-4000:]
    kernels = re.findall(r"Compiling entry function '(\w+)'", log)
    assert any("eigh_kernel" in k for k in kernels) and any("class_grad_kernel" in k for k in kernels)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    print(f"\n{arch}: registers per kernel {regs}, spill bytes {spills}")
    assert spills and not any(spills)


def test_cuda_source_has_no_torch_headers():
    src = (ROOT / "csrc" / "densify_cuda.cu").read_text()
    assert "torch/" not in src and "ATen" not in src and '#include "jacobi.h"' in src


def test_cpu_parallel_phases_match_reference():
    """Large enough for the cpu backend's multi-threaded phases (pooling, Gram, one LAPACK share per
    thread) with ragged classes on both sides of the LAPACK/Jacobi split (20, 7 and 23 images)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(230, 3, 64, 64, generator=gen)
    labels = torch.cat([torch.arange(10).repeat_interleave(20), torch.full((7,), 10), torch.full((23,), 11)])
    labels = labels[torch.randperm(230, generator=gen)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fast = x.clone().requires_grad_(True)
        with use_backend("cpu"):
            loss = densify_loss(fast, labels)
        loss.backward()
    finally:
        torch.set_num_threads(threads)
    oracle = x.double().requires_grad_(True)
    expected = ref.densify_loss(oracle, labels)
    expected.backward()
    assert abs(float(loss.detach()) - float(expected.detach())) <= 1e-5 * abs(float(expected.detach()))
    assert rel_error(fast.grad.double(), oracle.grad) < 1e-4


# (counts, channels, size, pool, labels sorted)
PATH_CASES = {
    # AVX2 2x2 pooling with a ragged tail (45 = 5 x 8 + 5), large enough for the multi-threaded phases
    "2x2-odd-pool": ([64, 7, 60, 1, 40], 3, 90, 45, False),
    "identity-sorted": ([40, 9, 3], 1, 32, 32, True),  # dX̂ GEMM straight into the gradient
    "identity-shuffled": ([40, 9, 3], 3, 16, 16, False),
    "uneven-bins": ([15, 12], 3, 30, 14, False),
}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("isa", ["native", "base"])
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_cpu_code_paths_match_reference_and_repeat_across_threads(monkeypatch, case, isa, dtype):
    """Both CPU code paths (native: AVX2 kernels + direct BLAS/LAPACK; base: portable loops + ATen
    GEMM/eigh) against the float64 reference, and bit-for-bit equal with 1 and 2 threads."""
    counts, channels, size, pool, sorted_labels = PATH_CASES[case]
    if isa == "base":
        monkeypatch.setenv("DDFAST_DENSIFY_ISA", "base")
    seed = zlib.crc32(case.encode())
    x = _images(sum(counts), channels, size, seed, dtype=dtype, pool=pool)
    labels = _labels(counts, seed)
    if sorted_labels:
        labels = labels.sort().values
    loss64, grad64 = _reference(x, labels, pool=pool)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            runs.append(_op(x, labels, "cpu", pool=pool))
        finally:
            torch.set_num_threads(1)
    (loss, grad), (loss2, grad2) = runs
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert float(loss64) > 1e-3
    assert abs(float(loss) - float(loss64)) <= tol * float(loss64)
    assert rel_error(grad, grad64) <= (1e-4 if dtype == torch.float32 else 1e-9)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2), "result depends on the thread count"


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("isa", ["native", "base"])
@pytest.mark.parametrize("size", [64, 32])
def test_cpu_truncated_gradient_matches_reference_and_repeats_across_threads(monkeypatch, size, isa, dtype):
    """Wide spectra (randn pixels, the perf benchmark's data): dλ is negligible for all but the top
    eigenvalues, so the cpu backend keeps r <= n/3 gradient terms, dX̂ = A (V_rᵀ X̂) (at 64 -> 32 px with
    AVX-512 fused with the 2 x 2 pooling backward, split over pieces on two threads). Against the float64
    reference, bit-for-bit equal with 1 and 2 threads; the data are checked to take the truncated path."""
    if isa == "base":
        monkeypatch.setenv("DDFAST_DENSIFY_ISA", "base")
    counts = [60, 21, 5, 33]
    gen = _gen(31)
    x = torch.randn(sum(counts), 3, size, size, generator=gen, dtype=dtype)
    labels = _labels(counts, seed=31)
    # float32: the kept terms (|dλ_i| sqrt(λ_i) above 2^-30 of the largest) are at most a third of each
    # large class (float64 keeps terms down to 2^-60: mostly the full path, checked all the same)
    xp = torch.nn.functional.adaptive_avg_pool2d(x.to(F64), 32).flatten(1)
    for k, n in enumerate(counts):
        if n >= 20 and dtype == torch.float32:
            lam = torch.linalg.eigvalsh(xp[labels == k] @ xp[labels == k].T)
            term = (torch.softmax(lam, 0) - torch.softmax(lam / 4, 0)).abs() * lam.clamp_min(0).sqrt()
            assert 3 * int((term > 2.0**-30 * term.max()).sum()) <= n
    loss64, grad64 = _reference(x, labels)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            runs.append(_op(x, labels, "cpu"))
        finally:
            torch.set_num_threads(1)
    (loss, grad), (loss2, grad2) = runs
    assert float(loss64) > 1e-3
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert abs(float(loss) - float(loss64)) <= tol * float(loss64)
    assert rel_error(grad, grad64) <= (1e-4 if dtype == torch.float32 else 1e-9)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2), "result depends on the thread count"
