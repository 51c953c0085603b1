"""DiM critic block (LayerNorm([C, H, W]) + per-position affine + LeakyReLU): the closed forms of
ddfast.reference.ln_lrelu against float64 autograd of F.layer_norm + F.leaky_relu; the op on every
backend (reference, cpu, triton under TRITON_INTERPRET=1) against that float64 composition on fresh
random inputs: forward, the first-order gradients (x, γ, β), the double backward (gradgradcheck in
float64 for reference and cpu; every cotangent of the backward; WGAN-GP's penalty through one block and
through a small critic), dtypes, odd shapes, layouts, NaN, the module wrapper, opcheck and
torch.compile, and the cpu backend's determinism across thread counts and its baseline-ISA copy.

Tolerances (tol below): relative L2 error ‖out − ref‖/‖ref‖ ≤ tol and elementwise
|out − ref| ≤ tol·max|ref| + tol·|ref|, against float64 on the same (rounded) inputs:
float64 1e-10, float32 1e-5 (measured ≤ 6e-7), float16 2e-3 (one fp16 rounding of fp32 results:
≤ 4.9e-4 per element), bfloat16 1.6e-2 (one bf16 rounding: ≤ 3.9e-3 per element); plus an absolute
floor for results that are 0 up to rounding (float64 1e-12, float32 1e-7, float16 1e-5, bfloat16 1e-4).
"""
from __future__ import annotations

import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddfast.backend import cpu_extension, use_backend
from ddfast.ops import LayerNormLeakyReLU, ln_lrelu
from ddfast.reference import ln_lrelu as ref
from ddfast.testing import rel_error

op_module = importlib.import_module("ddfast.ops.ln_lrelu")

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
TOL = {F64: 1e-10, F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}
FLOOR = {F64: 1e-12, F32: 1e-7, F16: 1e-5, BF16: 1e-4}
BACKENDS = ["reference", "cpu", "triton"]
SHAPES = [(3, 5, 7, 7), (2, 196, 4, 4), (1, 1, 1, 1), (4, 3, 1, 1), (5, 2, 3, 5), (6, 64, 14, 14)]
SLOPE, EPS = 0.01, 1e-5


def _skip_missing(backend: str) -> None:
    if backend == "cpu" and cpu_extension() is None:
        pytest.skip("ddfast._C is not built")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_inputs(shape, dtype, gen, scale=2.0, offset=0.5):
    """x [N, *normalized] (scaled and shifted), γ around 1 with both signs present, β small."""
    norm = shape[1:]
    x = (scale * torch.randn(shape, generator=gen, dtype=F64) + offset).to(dtype)
    w = (1.0 + 0.5 * torch.randn(norm, generator=gen, dtype=F64)).to(dtype)
    b = (0.3 * torch.randn(norm, generator=gen, dtype=F64)).to(dtype)
    return x, w, b


def composition(x, w, b, slope=SLOPE, eps=EPS):
    """What the block replaces: nn.LayerNorm(normalized, eps) + nn.LeakyReLU(slope)."""
    return F.leaky_relu(F.layer_norm(x, w.shape, w, b, eps), slope)


def leaf64(*ts):
    return [t.detach().to(F64).requires_grad_(True) for t in ts]


def leaf(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def check(out, expected, dtype, name):
    """rel L2 ≤ tol and |out − ref| ≤ floor + tol·max|ref| + tol·|ref|; floor (values that are 0 up to
    rounding, e.g. dγ when D = 1) is tiny next to the O(1) inputs."""
    assert out is not None and out.shape == expected.shape, name
    tol, floor = TOL[dtype], FLOOR[dtype]
    a, e = out.detach().double(), expected.detach().double()
    if float(e.norm()) > floor * e.numel() ** 0.5:
        err = rel_error(a, e)
        assert err <= tol, f"{name}: relative L2 error {err:.3e} > {tol:g}"
    bound = floor + tol * (float(e.abs().max()) if e.numel() else 0.0) + tol * e.abs()
    bad = (a - e).abs() > bound
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, worst |diff| {float((a - e).abs().max()):.3e}"


# ----------------------------------------------------------------------------- closed forms (float64)


@pytest.mark.parametrize("slope", [0.01, 0.2])
@pytest.mark.parametrize("shape", [(3, 5, 7, 7), (2, 4, 3, 3), (1, 1, 1, 1), (4, 6)], ids=str)
def test_closed_forms_match_autograd_float64(shape, slope):
    x, w, b = leaf64(*make_inputs(shape, F64, _gen("closed", shape, slope)))
    y = composition(x, w, b, slope)
    check(ref.ln_lrelu(x, w, b, slope), y, F64, "oracle composition")
    y2, mean, rstd = ref.forward(x.detach(), w.detach(), b.detach(), slope, EPS)
    check(y2, y, F64, "forward")
    g = torch.randn(shape, dtype=F64, generator=_gen("g", shape)).requires_grad_(True)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g, create_graph=True)
    dx, dw, db = ref.backward(g.detach(), x.detach(), w.detach(), b.detach(), mean, rstd, slope)
    for got, want, name in ((dx, gx, "dx"), (dw, gw, "dw"), (db, gb, "db")):  # (dx = 0 exactly when D = 1)
        assert (got - want).abs().max() <= 1e-10 * (1 + float(want.detach().abs().max())), name
    gen = _gen("cot", shape)
    u, vw, vb = (torch.randn(t.shape, generator=gen, dtype=F64) for t in (x, w, b))
    s = (gx * u).sum() + (gw * vw).sum() + (gb * vb).sum()
    eg, ex, ew = torch.autograd.grad(s, (g, x, w))
    dg, dx2, dw2 = ref.double_backward(u, vw, vb, g.detach(), x.detach(), w.detach(), b.detach(), mean, rstd, slope)
    for got, want, name in ((dg, eg, "∂S/∂g"), (dx2, ex, "∂S/∂x"), (dw2, ew, "∂S/∂γ")):
        assert (got - want).abs().max() <= 1e-10 * (1 + float(want.detach().abs().max())), name


# ----------------------------------------------------------------------------- every backend


@pytest.mark.parametrize("dtype", [F32, F64, F16, BF16], ids=["fp32", "fp64", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) for s in SHAPES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_first_order_grads(backend, shape, dtype):
    _skip_missing(backend)
    if backend == "triton" and dtype == F64 and shape != SHAPES[0]:
        pytest.skip("float64 takes the reference path under the triton backend (checked once)")
    gen = _gen("fwd", backend, shape, str(dtype))
    x, w, b = make_inputs(shape, dtype, gen)
    g = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    xo, wo, bo = leaf(x, w, b)
    with use_backend(backend):
        y = ln_lrelu(xo, wo, bo, SLOPE, EPS)
        dx, dw, db = torch.autograd.grad(y, (xo, wo, bo), g)
    x6, w6, b6 = leaf64(x, w, b)
    y6 = composition(x6, w6, b6)
    dx6, dw6, db6 = torch.autograd.grad(y6, (x6, w6, b6), g.double())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype and db.dtype == dtype
    check(y, y6, dtype, "y")
    check(dx, dx6, dtype, "dx")
    check(dw, dw6, dtype, "dγ")
    check(db, db6, dtype, "dβ")


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_outputs(backend):
    """The forward op's per-sample mean and rstd (saved for the backward) are the biased statistics."""
    _skip_missing(backend)
    x, w, b = make_inputs((4, 6, 5, 5), F32, _gen("stats"))
    with use_backend(backend):
        y, mean, rstd = op_module.ln_lrelu_forward(x, w, b, SLOPE, EPS)
    x6 = x.double()
    var, mu = torch.var_mean(x6.flatten(1), dim=1, unbiased=False)
    assert mean.dtype == F32 and rstd.dtype == F32 and mean.shape == (4,)
    check(mean, mu, F32, "mean")
    check(rstd, (var + EPS).rsqrt(), F32, "rstd")


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_every_cotangent(backend, dtype):
    """S = Σu·dx + Σv_γ·dγ + Σv_β·dβ of the op's create_graph backward: ∂S/∂(g, x, γ, β) against the
    float64 composition (the closed form's v_γ and v_β paths; ∂S/∂β is exactly 0)."""
    _skip_missing(backend)
    shape = (3, 5, 6, 6)
    gen = _gen("dbl", backend, str(dtype))
    x, w, b = make_inputs(shape, dtype, gen)
    g = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    u, vw, vb = (torch.randn(t.shape, generator=gen, dtype=F64).to(dtype) for t in (x, w, b))

    def grads(fn, tensors):
        xo, wo, bo, go = tensors
        y = fn(xo, wo, bo)
        gx, gw, gb = torch.autograd.grad(y, (xo, wo, bo), go, create_graph=True)
        s = (gx * u.to(gx.dtype)).sum() + (gw * vw.to(gw.dtype)).sum() + (gb * vb.to(gb.dtype)).sum()
        return torch.autograd.grad(s, (go, xo, wo, bo), allow_unused=True)

    with use_backend(backend):
        got = grads(lambda *a: ln_lrelu(*a, SLOPE, EPS), leaf(x, w, b, g))
    want = grads(composition, leaf64(x, w, b, g))
    tol_dtype = F32 if dtype == BF16 else dtype  # u, v are rounded inputs; outputs one bf16 rounding
    for got_t, want_t, name in zip(got[:3], want[:3], ("∂S/∂g", "∂S/∂x", "∂S/∂γ")):
        assert got_t.dtype == dtype
        check(got_t, want_t, BF16 if dtype == BF16 else tol_dtype, name)
    assert got[3] is not None and not got[3].any() and (want[3] is None or not want[3].any())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_and_gradgradcheck_float64(backend):
    _skip_missing(backend)
    for shape in [(2, 3, 2, 2), (3, 4)]:
        x, w, b = leaf64(*make_inputs(shape, F64, _gen("gg", shape)))
        with use_backend(backend):
            fn = lambda x, w, b: ln_lrelu(x, w, b, 0.1, EPS)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (x, w, b))
            assert torch.autograd.gradgradcheck(fn, (x, w, b))


def _penalty_grads(block, tensors, project):
    """WGAN-GP through one block: grads of 10·((‖∂Σ(c·y)/∂x‖ − 1)²).mean() w.r.t. x, γ, β."""
    x, w, b = tensors
    y = block(x, w, b)
    out = (y * project.to(y.dtype)).sum()
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    penalty = 10 * ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
    return torch.autograd.grad(penalty, (x, w, b))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("project", ["sum", "random"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_one_block(backend, dtype, project, layout):
    _skip_missing(backend)
    shape = (4, 8, 7, 7)
    gen = _gen("gp", backend, str(dtype), project)
    x, w, b = make_inputs(shape, dtype, gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    c = torch.ones(shape, dtype=F64) if project == "sum" else torch.randn(shape, generator=gen, dtype=F64)
    with use_backend(backend):
        got = _penalty_grads(lambda *a: ln_lrelu(*a, SLOPE, EPS), leaf(x, w, b), c)
    want = _penalty_grads(composition, leaf64(x, w, b), c)
    for g_, w_, name in zip(got, want, ("x", "γ", "β")):
        check(g_, w_, dtype, f"∂penalty/∂{name}")


class _Critic(nn.Module):
    """Two DiM critic blocks, conv in between, a linear score: the GP's cotangent of the second block
    depends on the first block's output and on every later parameter."""

    def __init__(self, fused: bool, c: int = 4, size: int = 6) -> None:
        super().__init__()
        block = (lambda: LayerNormLeakyReLU([c, size, size])) if fused else \
            (lambda: nn.Sequential(nn.LayerNorm([c, size, size]), nn.LeakyReLU(0.01)))
        self.conv1 = nn.Conv2d(2, c, 3, 1, 1)
        self.block1 = block()
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1)
        self.block2 = block()
        self.head = nn.Linear(c * size * size, 1)

    def forward(self, x):
        return self.head(self.block2(self.conv2(self.block1(self.conv1(x)))).flatten(1)).squeeze(1)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_penalty_through_a_critic(backend, dtype):
    """DiM's critic step: WGAN loss + GP on interpolates; every parameter's gradient as with nn.LayerNorm + nn.LeakyReLU."""
    _skip_missing(backend)
    torch.manual_seed(0)
    fused, plain = _Critic(True).to(dtype), _Critic(False).to(F64)
    gen = _gen("critic", backend, str(dtype))
    with torch.no_grad():
        for name, p in fused.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * (0.3 if "conv" in name or "head" in name else 1.0) +
                    (1.0 if name.endswith("block1.weight") or name.endswith("block2.weight") else 0.0))
        plain_params = dict(plain.named_parameters())
        for name, p in fused.named_parameters():
            key = name.replace("block1.", "block1.0.").replace("block2.", "block2.0.")
            plain_params[key].copy_(p.double())
    real = torch.randn(3, 2, 6, 6, generator=gen, dtype=F64)
    fake = torch.randn(3, 2, 6, 6, generator=gen, dtype=F64)
    alpha = torch.rand(3, 1, 1, 1, generator=gen, dtype=F64)

    def step(model, dt):
        model.zero_grad()
        r, f = real.to(dt), fake.to(dt)
        inter = (alpha.to(dt) * r + (1 - alpha.to(dt)) * f).requires_grad_(True)
        (gx,) = torch.autograd.grad(model(inter).sum(), inter, create_graph=True)
        penalty = 10 * ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
        (model(f).mean() - model(r).mean() + penalty).backward()
        return {n.replace(".0.", "."): p.grad for n, p in model.named_parameters()}

    with use_backend(backend):
        got = step(fused, dtype)
    want = step(plain, F64)
    assert set(got) == set(want)
    for name in want:
        check(got[name], want[name], dtype, name)


# ----------------------------------------------------------------------------- layouts, shapes, NaN


def _layouts(x):
    yield "contiguous", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(2 * x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3], dtype=x.dtype)
    big[::2, :, :, ::2] = x
    yield "strided", big[::2, :, :, ::2]  # copied once
    batch = torch.zeros(2 * x.shape[0], *x.shape[1:], dtype=x.dtype)
    batch[1::2] = x
    yield "batch_slice", batch[1::2]  # read in place (sample stride 2·D)
    yield "permuted", x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).transpose(2, 3).contiguous().transpose(2, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_give_the_contiguous_result(backend):
    _skip_missing(backend)
    shape = (3, 6, 5, 4)
    gen = _gen("layouts", backend)
    x, w, b = make_inputs(shape, F32, gen)
    g = torch.randn(shape, generator=gen)
    u = torch.randn(shape, generator=gen)
    want = None
    for name, xl in _layouts(x):
        assert torch.equal(xl, x) and (name == "contiguous" or not xl.is_contiguous())
        xo, wo, bo = leaf(xl, w, b)
        with use_backend(backend):
            y = ln_lrelu(xo, wo, bo)
            gx, gw, gb = torch.autograd.grad(y, (xo, wo, bo), g.contiguous(memory_format=torch.channels_last),
                                             create_graph=True)
            second = torch.autograd.grad((gx * u).sum(), (xo, wo))
        if name in ("contiguous", "channels_last", "permuted"):
            assert y.stride() == xl.stride() and gx.stride() == xl.stride(), name  # dense layouts are kept
        got = [y, gx, gw, gb, *second]
        if want is None:
            want = got
            x6, w6, b6 = leaf64(x, w, b)
            check(y, composition(x6, w6, b6), F32, "y")
            continue
        for a, e, what in zip(got, want, ("y", "dx", "dγ", "dβ", "ddx", "ddγ")):
            check(a, e.double(), F32, f"{name} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_1d_normalized_shape(backend):
    """nn.LayerNorm semantics: any number of leading dims (none, one, several), normalized over weight's dims."""
    _skip_missing(backend)
    gen = _gen("lead", backend)
    w = 1 + 0.5 * torch.randn(7, generator=gen)
    b = 0.3 * torch.randn(7, generator=gen)
    for shape in [(7,), (5, 7), (2, 3, 7)]:
        x = torch.randn(shape, generator=gen) * 2
        with use_backend(backend):
            y = ln_lrelu(x, w, b, 0.2)
        check(y, F.leaky_relu(F.layer_norm(x.double(), (7,), w.double(), b.double(), EPS), 0.2), F32, str(shape))
        assert y.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_and_constant_samples(backend):
    _skip_missing(backend)
    x, w, b = leaf(*make_inputs((0, 3, 4, 4), F32, _gen("empty")))
    with use_backend(backend):
        y = ln_lrelu(x, w, b)
        dx, dw, db = torch.autograd.grad(y.sum(), (x, w, b), allow_unused=True)
    assert y.shape == (0, 3, 4, 4) and dx.shape == x.shape and not dw.any() and not db.any()
    # a constant sample: variance 0, x̂ = 0, y = LeakyReLU(β), dx = r·(h − ⟨h⟩) with r = 1/√eps
    x = torch.full((2, 3, 2, 2), 1.5)
    x[1] = torch.randn(3, 2, 2, generator=_gen("const"))
    x, w, b = leaf(x, *make_inputs((2, 3, 2, 2), F32, _gen("const2"))[1:])
    c = torch.arange(24.0).view(2, 3, 2, 2)
    with use_backend(backend):
        y = ln_lrelu(x, w, b)
        got = torch.autograd.grad((y * c).sum(), (x, w, b))
    x6, w6, b6 = leaf64(x, w, b)
    y6 = composition(x6, w6, b6)
    want = torch.autograd.grad((y6 * c.double()).sum(), (x6, w6, b6))
    check(y[0], F.leaky_relu(b.detach().double(), SLOPE), F32, "constant sample")
    for g_, w_, name in zip(got, want, ("dx", "dγ", "dβ")):
        check(g_, w_, F32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_per_sample(backend):
    """A non-finite element makes its own sample NaN (as the torch composition); other samples are untouched."""
    _skip_missing(backend)
    x, w, b = make_inputs((3, 4, 3, 3), F32, _gen("nan"))
    x[1, 2, 1, 1] = float("nan")
    x[2, 0, 0, 0] = float("inf")
    xo, wo, bo = leaf(x, w, b)
    with use_backend(backend):
        y = ln_lrelu(xo, wo, bo)
        (dx,) = torch.autograd.grad(y.sum(), xo)
    want = composition(x.double(), w.double(), b.double())
    assert torch.isnan(y[1]).all() and torch.isnan(y[2]).all() and torch.isnan(want[1:]).all()
    check(y[0], want[0], F32, "finite sample")
    assert torch.isfinite(dx[0]).all() and torch.isnan(dx[1]).all()


def test_triton_backend_is_used(monkeypatch):
    """use_backend("triton") runs the Triton launchers (forward, backward, double backward) on CPU tensors."""
    kernels = importlib.import_module("ddfast.kernels.ln_lrelu")
    calls = []
    for name in ("ln_lrelu_forward", "ln_lrelu_backward", "ln_lrelu_double_backward"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    x, w, b = leaf(*make_inputs((2, 3, 4, 4), F32, _gen("spy")))
    with use_backend("triton"):
        _penalty_grads(lambda *a: ln_lrelu(*a), (x, w, b), torch.ones(2, 3, 4, 4))
    assert calls == ["ln_lrelu_forward", "ln_lrelu_backward", "ln_lrelu_double_backward"]


# ----------------------------------------------------------------------------- module, op registration


def test_module_matches_layernorm_leakyrelu_and_loads_its_state():
    torch.manual_seed(1)
    shape = [6, 5, 5]
    plain = nn.Sequential(nn.LayerNorm(shape), nn.LeakyReLU(0.01))
    with torch.no_grad():
        plain[0].weight.normal_()
        plain[0].bias.normal_()
    fused = LayerNormLeakyReLU(shape)
    assert set(fused.state_dict()) == {"weight", "bias"}
    assert torch.equal(fused.weight, torch.ones(shape)) and torch.equal(fused.bias, torch.zeros(shape))
    fused.load_state_dict(plain[0].state_dict())
    x = torch.randn(4, *shape)
    check(fused(x), plain.double()(x.double()), F32, "module")
    assert "slope=0.01" in repr(fused) and LayerNormLeakyReLU(7).normalized_shape == (7,)


def test_opcheck_and_torch_compile():
    x, w, b = make_inputs((3, 4, 5, 5), F32, _gen("opcheck"))
    with use_backend("reference"):
        y, mean, rstd = op_module.ln_lrelu_forward(x, w, b, SLOPE, EPS)
        g = torch.randn_like(y)
        utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(torch.ops.ddfast.ln_lrelu_forward.default,
                              (x.requires_grad_(True), w.requires_grad_(True), b, SLOPE, EPS), test_utils=utils)
        torch.library.opcheck(torch.ops.ddfast.ln_lrelu_backward.default,
                              (g, x.detach(), w.detach(), b, mean, rstd, SLOPE), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.ddfast.ln_lrelu_double_backward.default,
                              (torch.randn_like(y), torch.randn_like(w), torch.randn_like(b), g, x.detach(), w.detach(), b,
                               mean, rstd, SLOPE), test_utils=("test_schema", "test_faketensor"))
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        compiled = torch.compile(lambda t: (ln_lrelu(t, w, b) * 2).sum(), fullgraph=True)
        value = compiled(xc)
        (dx,) = torch.autograd.grad(value, xc)
    x6, w6, b6 = leaf64(x, w, b)
    want = (composition(x6, w6, b6) * 2).sum()
    (dx6,) = torch.autograd.grad(want, x6)
    assert abs(float(value) - float(want)) <= 1e-5 * float(composition(x6, w6, b6).abs().sum())
    check(dx, dx6, F32, "compiled dx")


def test_third_derivative_raises():
    x, w, b = leaf64(*make_inputs((2, 3, 2, 2), F64, _gen("third")))
    with use_backend("reference"):
        y = ln_lrelu(x, w, b)
        (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad((gx * gx).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="third derivatives"):
            torch.autograd.grad(ggx.sum(), x)


@pytest.mark.parametrize("case,match", [
    (lambda x, w, b: (x, w[:2], b), "same"),
    (lambda x, w, b: (x, w[:2], b[:2]), "normalized_shape"),
    (lambda x, w, b: (x.long(), w, b), "floating"),
    (lambda x, w, b: (x, w[0, 0, 0], b[0, 0, 0]), "non-empty"),
])
def test_bad_inputs_raise(case, match):
    x, w, b = make_inputs((2, 3, 4, 4), F32, _gen("bad"))
    with pytest.raises(ValueError, match=match):
        ln_lrelu(*case(x, w, b))
    with pytest.raises(ValueError, match="eps"):
        ln_lrelu(x, w, b, eps=-1.0)


# ----------------------------------------------------------------------------- cpu backend specifics


def _cpu_run(x, w, b, g, u, vw, vb):
    ext = cpu_extension()
    xr, gr, ur = x.flatten(1), g.flatten(1), u.flatten(1)
    y, mean, rstd = ext.ln_lrelu_forward(xr, w.flatten(), b.flatten(), SLOPE, EPS)
    bwd = ext.ln_lrelu_backward(gr, xr, w.flatten(), b.flatten(), mean, rstd, SLOPE)
    dbl = ext.ln_lrelu_double_backward(ur, vw.flatten(), vb.flatten(), gr, xr, w.flatten(), b.flatten(), mean, rstd, SLOPE)
    return [y, mean, rstd, *bwd, *dbl]


def _cpu_case(shape, dtype, key):
    gen = _gen(key, shape, str(dtype))
    x, w, b = make_inputs(shape, dtype, gen)
    g, u = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    vw, vb = (torch.randn(shape[1:], generator=gen) for _ in range(2))
    return x, w, b, g, u, vw, vb


def test_cpu_deterministic_across_thread_counts():
    """Parallel paths (samples, then column chunks over tiles of samples): identical bits for 1, 2, 3 threads."""
    if cpu_extension() is None:
        pytest.skip("ddfast._C is not built")
    case = _cpu_case((9, 16, 20, 20), F32, "threads")
    old = torch.get_num_threads()
    runs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            assert cpu_extension().num_threads() == nt
            runs.append(_cpu_run(*case))
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("dtype", [F32, F64, BF16], ids=["fp32", "fp64", "bf16"])
def test_cpu_baseline_isa(monkeypatch, dtype):
    """The per-row code is compiled for the baseline ISA and with AVX2 + FMA; both agree with the oracle."""
    if cpu_extension() is None:
        pytest.skip("ddfast._C is not built")
    case = _cpu_case((3, 5, 7, 7), dtype, "isa")
    fast = _cpu_run(*case)
    monkeypatch.setenv("DDFAST_LN_LRELU_ISA", "base")
    base = _cpu_run(*case)
    x, w, b, g, u, vw, vb = case
    x6, w6, b6 = (t.double() for t in (x, w, b))
    y6, mean6, rstd6 = ref.forward(x6, w6, b6, SLOPE, EPS)
    want = [y6, mean6, rstd6, *ref.backward(g.double(), x6, w6, b6, mean6, rstd6, SLOPE),
            *ref.double_backward(u.double(), vw.double(), vb.double(), g.double(), x6, w6, b6, mean6, rstd6, SLOPE)]
    names = ["y", "mean", "rstd", "dx", "dw", "db", "dg", "ddx", "ddw"]
    for run in (fast, base):
        for got, exp, name in zip(run, want, names):
            # stats and parameter gradients are float32 (double accumulation) for bf16 inputs
            tol_dtype = dtype if got.dtype == dtype else F32
            check(got.reshape(exp.shape), exp, tol_dtype, name)


def test_cpu_rejects_bad_rows():
    if cpu_extension() is None:
        pytest.skip("ddfast._C is not built")
    ext = cpu_extension()
    x = torch.randn(4, 10)
    w = torch.ones(10)
    with pytest.raises(ValueError, match="unit element stride"):
        ext.ln_lrelu_forward(torch.randn(10, 4).t(), w, w, SLOPE, EPS)
    with pytest.raises(ValueError, match="length D"):
        ext.ln_lrelu_forward(x, torch.ones(9), w, SLOPE, EPS)
    with pytest.raises(ValueError, match="dtype"):
        ext.ln_lrelu_backward(x.double(), x, w, w, torch.zeros(4), torch.ones(4), SLOPE)
    with pytest.raises(ValueError, match="float32"):
        ext.ln_lrelu_forward(x.int(), w, w, SLOPE, EPS)
