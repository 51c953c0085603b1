"""DiM critic block, Triton backend (kernels/ln_lrelu.py): the launchers' numerics under
TRITON_INTERPRET=1 against the float64 closed forms of ddfast.reference.ln_lrelu (which
tests/test_ln_lrelu.py checks against autograd of F.layer_norm + F.leaky_relu), including many chunks
per sample, several samples per column program and looped partial sums (small blocks forced by
monkeypatching); the WGAN-GP loss gradient through the op under use_backend("triton"); and
ahead-of-time compilation of every kernel for sm_80/sm_90 at the launcher's block choices (no spills).

The AOT checks go through ddfast.testing.aot_compile_many, which compiles in a child process without
the interpreter. `pytest -s -k aot` prints the register table.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (tests/conftest.py does too)

import inspect  # noqa: E402
import zlib  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ddfast.backend import use_backend  # noqa: E402
from ddfast.kernels import ln_lrelu as kl  # noqa: E402
from ddfast.ops import ln_lrelu  # noqa: E402
from ddfast.reference import ln_lrelu as ref  # noqa: E402
from ddfast.testing import AotRequest, PtxasReport, aot_compile_many, rel_error  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# relative L2 error bound per output dtype (fp32 arithmetic, one rounding to the output dtype)
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}
SLOPE, EPS = 0.01, 1e-5


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _case(n, d, dtype, key, row_stride=None):
    """[N, D] row views x, g, u (row stride ≥ D: windows of wider buffers) and fp32 vectors w, b, vw, vb."""
    gen = _gen(key, n, d, str(dtype))
    stride = row_stride or d

    def rows(scale=1.0, offset=0.0):
        buf = (scale * torch.randn(n, stride, generator=gen, dtype=F64) + offset).to(dtype)
        return buf[:, :d]

    x, g, u = rows(2.0, 0.5), rows(), rows()
    w = 1 + 0.5 * torch.randn(d, generator=gen)
    b, vw, vb = (0.3 * torch.randn(d, generator=gen) for _ in range(3))
    return x, g, u, w, b, vw, vb


def _close(out, expected, dtype, name):
    assert out.shape == expected.shape, name
    err = rel_error(out, expected)
    assert err <= TOL[dtype], f"{name}: relative L2 error {err:.3e} > {TOL[dtype]:g}"


def check_all(x, g, u, w, b, vw, vb, name=""):
    """The three launchers against the float64 closed forms on the same (rounded) inputs."""
    dtype = x.dtype
    y, mean, rstd = kl.ln_lrelu_forward(x, w, b, SLOPE, EPS)
    x6, w6, b6 = x.double(), w.double(), b.double()
    y6, mean6, rstd6 = ref.forward(x6, w6, b6, SLOPE, EPS)
    assert y.dtype == dtype and y.is_contiguous() and mean.dtype == F32 and rstd.dtype == F32
    _close(y, y6, dtype, f"{name} y")
    _close(mean, mean6, F32, f"{name} mean")
    _close(rstd, rstd6, F32, f"{name} rstd")
    dx, dw, db = kl.ln_lrelu_backward(g, x, w, b, mean, rstd, SLOPE)
    dx6, dw6, db6 = ref.backward(g.double(), x6, w6, b6, mean6, rstd6, SLOPE)
    assert dx.dtype == dtype and dw.dtype == F32
    _close(dx, dx6, dtype, f"{name} dx")
    _close(dw, dw6, F32, f"{name} dγ")
    _close(db, db6, F32, f"{name} dβ")
    dg, ddx, ddw = kl.ln_lrelu_double_backward(u, vw, vb, g, x, w, b, mean, rstd, SLOPE)
    dg6, ddx6, ddw6 = ref.double_backward(u.double(), vw.double(), vb.double(), g.double(), x6, w6, b6, mean6, rstd6,
                                          SLOPE)
    _close(dg, dg6, dtype, f"{name} ∂/∂g")
    _close(ddx, ddx6, dtype, f"{name} ∂/∂x")
    _close(ddw, ddw6, F32, f"{name} ∂/∂γ")


# ---------------------------------------------------------------------------------------------
# numerics (interpreter)
# ---------------------------------------------------------------------------------------------
SHAPES = [(1, 1), (3, 5), (4, 245), (2, 3136), (5, 9604), (1, 4097)]  # D = 1, odd, [5,7,7], [196,4,4], [196,7,7], 2 chunks + 1


@pytest.mark.parametrize("n,d", SHAPES, ids=[f"N{n}-D{d}" for n, d in SHAPES])
def test_launchers_fp32(n, d):
    check_all(*_case(n, d, F32, "fp32"), name=f"N{n} D{d}")


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("n,d", [(3, 245), (2, 3136)])
def test_launchers_half(n, d, dtype):
    check_all(*_case(n, d, dtype, "half"), name=str(dtype))


def test_row_strides_and_empty_batch():
    """Windows of wider buffers (row stride > D) read in place; N = 0 gives empty outputs and zero parameter grads."""
    check_all(*_case(3, 100, F32, "strided", row_stride=131), name="row stride 131")
    x, g, u, w, b, vw, vb = _case(0, 12, F32, "empty")
    y, mean, rstd = kl.ln_lrelu_forward(x, w, b, SLOPE, EPS)
    dx, dw, db = kl.ln_lrelu_backward(g, x, w, b, mean, rstd, SLOPE)
    dg, ddx, ddw = kl.ln_lrelu_double_backward(u, vw, vb, g, x, w, b, mean, rstd, SLOPE)
    assert y.shape == dx.shape == dg.shape == ddx.shape == (0, 12) and mean.shape == (0,)
    assert not dw.any() and not db.any() and not ddw.any()


def test_many_chunks_rows_and_looped_partials(monkeypatch):
    """Small blocks: 16-element chunks (P = 7 per sample, ragged last chunk), partial sums read 4 at a
    time (a loop over P), 3 samples per column program with a ragged last block, row stride > D."""
    monkeypatch.setattr(kl, "MAX_BLOCK_D", 16)
    monkeypatch.setattr(kl, "MAX_BLOCK_P", 4)
    monkeypatch.setattr(kl, "TARGET_PROGRAMS", 10)
    block_d, p, block_p, rows, warps, warps_cols = kl.blocks(5, 100)
    assert (block_d, p, block_p, rows) == (16, 7, 4, 3) and warps == warps_cols == 1
    check_all(*_case(5, 100, F32, "chunks", row_stride=103), name="chunked")


def test_outlier_first_element_statistics():
    """Chan-merged chunk statistics stay exact when one element is far from the rest (no shifted sums)."""
    x, g, u, w, b, vw, vb = _case(2, 5000, F32, "outlier")
    x = x.clone()
    x[:, 0] = 1e4
    x[1] += 300.0  # a large common offset
    check_all(x, g, u, w, b, vw, vb, name="outlier")


def test_launchers_reject_bad_input():
    x, g, u, w, b, vw, vb = _case(2, 8, F32, "bad")
    with pytest.raises(TypeError):
        kl.ln_lrelu_forward(x.double(), w, b, SLOPE, EPS)
    with pytest.raises(ValueError, match="unit"):
        kl.ln_lrelu_forward(torch.randn(8, 2).t(), w, b, SLOPE, EPS)
    with pytest.raises(ValueError, match="length D"):
        kl.ln_lrelu_forward(x, w[:3], b, SLOPE, EPS)
    with pytest.raises(ValueError, match="grad"):
        kl.ln_lrelu_backward(g.half(), x, w, b, torch.zeros(2), torch.ones(2), SLOPE)


def test_gradient_penalty_through_the_op():
    """use_backend("triton"): the WGAN-GP loss gradient (fwd, create_graph backward, backward) of a
    channels_last fp32 batch matches float64 autograd of F.layer_norm + F.leaky_relu."""
    gen = _gen("gp")
    shape = (3, 196, 4, 4)
    x = (2 * torch.randn(shape, generator=gen) + 0.5).contiguous(memory_format=torch.channels_last)
    w = 1 + 0.5 * torch.randn(shape[1:], generator=gen)
    b = 0.3 * torch.randn(shape[1:], generator=gen)
    c = torch.randn(shape, generator=gen)

    def penalty_grads(fn, tensors):
        xs, ws, bs = tensors
        y = fn(xs, ws, bs)
        (gx,) = torch.autograd.grad((y * c.to(y.dtype)).sum(), xs, create_graph=True)
        return torch.autograd.grad(10 * ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean(), (xs, ws, bs))

    with use_backend("triton"):
        got = penalty_grads(lambda *a: ln_lrelu(*a, SLOPE, EPS), [t.clone().requires_grad_(True) for t in (x, w, b)])
    want = penalty_grads(lambda x_, w_, b_: F.leaky_relu(F.layer_norm(x_, shape[1:], w_, b_, EPS), SLOPE),
                         [t.double().requires_grad_(True) for t in (x, w, b)])
    for g_, w_, name in zip(got, want, ("x", "γ", "β")):
        if w_.abs().max() == 0:
            assert not g_.any(), name
        else:
            _close(g_, w_, F32, f"∂penalty/∂{name}")
    assert got[0].stride() == x.stride()


# ---------------------------------------------------------------------------------------------
# AOT compilation for sm_80 / sm_90
# ---------------------------------------------------------------------------------------------
AOT_ARCHS = (80, 90)
KERNELS = ("_fwd_stats_kernel", "_fwd_kernel", "_bwd_sums_kernel", "_bwd_cols_kernel", "_dbl_sums_kernel",
           "_dbl_cols_kernel")
_ACTIVATIONS = ("x_ptr", "g_ptr", "u_ptr", "y_ptr", "dx_ptr", "dg_ptr")


def _signature(name: str, act: str) -> dict[str, str]:
    """Triton types of a kernel's arguments: activation pointers `act`, other pointers fp32 (statistics,
    parameters, partials), slope/eps fp32, BLOCK_* constexpr, the rest i32."""
    sig = {}
    for arg in inspect.signature(getattr(kl, name).fn).parameters:
        if arg.endswith("_ptr"):
            sig[arg] = act if arg in _ACTIVATIONS else "*fp32"
        elif arg in ("slope", "eps"):
            sig[arg] = "fp32"
        elif arg.startswith("BLOCK_"):
            sig[arg] = "constexpr"
        else:
            sig[arg] = "i32"
    return sig


def aot_configs() -> dict[str, tuple[str, dict, dict, int]]:
    """label -> (kernel, signature, constexprs, num_warps) at the launcher's choices (kl.blocks) for the
    DiM critic's shapes: D = 196·28·28 (BLOCK_D 2048, P = 76) in fp32 / bf16 / fp16, D = 64·4·4 = 1024,
    D = 20 (one warp); and N = D = 1 with Triton's specialisation of integer arguments equal to 1."""
    configs = {}
    for act, n, d in [("*fp32", 192, 153664), ("*bf16", 192, 153664), ("*fp16", 192, 153664),
                      ("*fp32", 192, 1024), ("*fp32", 3, 20)]:
        block_d, p, block_p, rows, warps, warps_cols = kl.blocks(n, d)
        for name in KERNELS:
            sig = _signature(name, act)
            ce = {k: v for k, v in dict(BLOCK_D=block_d, BLOCK_P=block_p).items() if k in sig}
            w = warps_cols if "cols" in name else warps
            configs[f"{name}[{act[1:]},D{d},B{block_d}xP{block_p},w{w}]"] = (name, sig, ce, w)
    block_d, p, block_p, rows, warps, warps_cols = kl.blocks(1, 1)
    for name in KERNELS:
        sig = _signature(name, "*fp32")
        ones = {k: 1 for k in ("N", "D", "P", "ROWS", "s_x", "s_g", "s_u") if k in sig}
        sig.update({k: "constexpr" for k in ones})
        ce = dict(ones, **{k: v for k, v in dict(BLOCK_D=block_d, BLOCK_P=block_p).items() if k in sig})
        w = warps_cols if "cols" in name else warps
        configs[f"{name}[fp32,ints=1,w{w}]"] = (name, sig, ce, w)
    return configs


AOT_LABELS = [f"{label}@sm{arch}" for label in aot_configs() for arch in AOT_ARCHS]


@pytest.fixture(scope="module")
def aot_results() -> dict[str, PtxasReport]:
    requests = [AotRequest(getattr(kl, name), sig, ce, arch, warps)
                for name, sig, ce, warps in aot_configs().values() for arch in AOT_ARCHS]
    half = (len(requests) + 1) // 2  # two child processes (2 cores; each compile is single-threaded)
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(aot_compile_many, [requests[:half], requests[half:]]))
    return dict(zip(AOT_LABELS, parts[0] + parts[1]))


@pytest.mark.parametrize("label", AOT_LABELS)
def test_aot_compiles_without_spills(aot_results, label):
    report = aot_results[label]
    print(f"\n{label}: {report.registers} registers, {report.spills} spill bytes, {report.stack_bytes} stack bytes")
    assert report.spills == 0 and report.stack_bytes == 0
    assert report.registers <= 128
