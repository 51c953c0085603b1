"""K4 (APM loss head) C++ CPU backend vs the float64 autograd oracle (ddfast.reference.apm_loss)."""
import zlib

import pytest
import torch

import ddfast._C as _C
from ddfast.backend import use_backend
from ddfast.ops.apm_loss import apm_loss
from ddfast.reference import apm_loss as ref
from ddfast.testing import assert_close

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# (dtype, atol, rtol): atol is relative to the largest |value| of the compared tensor (the loss: to the
# sum of the magnitudes of its terms); rtol covers the final rounding of dz to a 16-bit dtype.
DTYPES = [(F32, 1e-5, 1e-5), (F64, 1e-12, 1e-12), (F16, 1e-5, 1e-3), (BF16, 1e-5, 8e-3)]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]
SHAPES = [(K, n, C) for K in (1, 5) for n in (0, 1, 7, 100, 1000) for C in (2, 10, 100, 1000)]
# the n = 1000, C = 1000 cases (the float64 oracle costs most) run for fp32 only: the other dtypes take
# the same code (fp64 with double math) and are covered by every smaller shape
BIG = 1_000_000


def _seed(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_inputs(K, n, C, dtype, gen, ties=True, scale=2.0):
    """Teacher logits and K checkpoints near them; with ties, some checkpoint entries (and whole rows)
    equal the teacher's, so sgn(0) = 0 and d = 0 are exercised."""
    t = scale * torch.randn(n, C, generator=gen, dtype=F64)
    s = t + 0.5 * torch.randn(K, n, C, generator=gen, dtype=F64)
    if ties and n:
        s = torch.where(torch.rand(K, n, C, generator=gen) < 0.2, t.expand(K, n, C), s)
        s[0, n // 2] = t[n // 2]  # a whole row tied: d = 0
    z = torch.cat([t[None], s]).to(dtype)
    labels = torch.randint(0, C, (n,), generator=gen)
    return z, labels


def with_layout(z, layout):
    """The same values as z in another memory layout (z itself for "contig")."""
    K1, n, C = z.shape
    if layout == "contig":
        return z
    if layout == "transposed":  # [n, K+1, C] in memory
        out = z.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "sliced":  # a window of a larger tensor: storage offset, row stride != C
        big = torch.zeros(K1 + 1, 2 * n + 1, C + 3, dtype=z.dtype)
        out = big[1:, 1::2, 2:C + 2]
        out.copy_(z)
    elif layout == "class_strided":  # classes not innermost: stride(2) = (K+1)·n
        out = z.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    else:
        raise ValueError(layout)
    assert torch.equal(out, z)
    assert n * C <= 1 or not out.is_contiguous()
    return out


def oracle(z, labels, batch, alpha, log, eps):
    """(loss, dloss/dz) of the float64 reference by autograd, on z's rounded values."""
    z64 = z.detach().to(F64).requires_grad_(True)
    loss = ref.apm_loss(z64, labels.long(), batch, alpha, log, eps)
    (grad,) = torch.autograd.grad(loss, z64)
    return loss.detach(), grad


def loss_scale(z, labels, batch, alpha, log, eps):
    """Σ of the magnitudes of the loss's terms (so cancellations do not shrink the tolerance)."""
    zd = z.to(F64)
    if zd.shape[1] == 0:
        return 1.0
    d = (zd[1:] - zd[0]).abs().sum(2)
    phi = torch.log(d + eps).abs() if log else d / zd.shape[2]
    lse = torch.logsumexp(zd[0], 1)
    ce = (lse - zd[0].gather(1, labels.long()[:, None])[:, 0]).abs() + lse.abs()
    return float((phi.sum() + alpha * ce.sum()) / batch) + 1e-30


def check(loss, dz, z, labels, batch, alpha, log, eps, atol, rtol, name=""):
    want_loss, want_dz = oracle(z, labels, batch, alpha, log, eps)
    assert loss.shape == () and loss.dtype == (F64 if z.dtype == F64 else F32)
    assert_close(loss, want_loss, atol * loss_scale(z, labels, batch, alpha, log, eps), 1e-5 if z.dtype != F64 else 1e-12,
                 name=f"{name} loss")
    assert dz.shape == z.shape and dz.dtype == z.dtype and dz.is_contiguous()
    if dz.numel():
        fin = torch.finfo(z.dtype)  # + half the subnormal spacing: fp16 dz of small values
        assert_close(dz, want_dz, atol * float(want_dz.abs().max()) + fin.smallest_normal * fin.eps, rtol,
                     name=f"{name} dz")


@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"K{k}-n{n}-C{c}" for k, n, c in SHAPES])
def test_matches_oracle(shape, dtype, atol, rtol, log):
    K, n, C = shape
    if dtype != F32 and (K + 1) * n * C > BIG:
        pytest.skip("the largest float64 oracle runs for fp32 only (the other dtypes: smaller shapes)")
    gen = _seed(shape, str(dtype), log)
    z, labels = make_inputs(K, n, C, dtype, gen)
    alpha, eps = 0.1, 1e-8
    batch = float(max(n, 1))
    # direct call, with and without the gradient
    loss, dz = _C.apm_loss_forward(z, labels, 1.0 / batch, alpha, log, eps, True)
    check(loss, dz, z, labels, batch, alpha, log, eps, atol, rtol, "direct")
    loss_ng, dz_ng = _C.apm_loss_forward(z, labels, 1.0 / batch, alpha, log, eps, False)
    assert torch.equal(loss_ng, loss) and dz_ng.numel() == 0 and dz_ng.dtype == z.dtype
    # through the op (cpu backend) and autograd
    zr = z.clone().requires_grad_(True)
    with use_backend("cpu"):
        out = apm_loss(zr, labels, alpha=alpha, log=log, eps=eps)
    assert torch.equal(out.detach(), loss)
    if n:
        (grad,) = torch.autograd.grad(out, zr)
        assert torch.equal(grad, dz)
    else:
        assert float(loss) == 0.0


LAYOUT_SHAPES = [(1, 7, 10), (5, 100, 10), (5, 33, 1000), (5, 1000, 100), (3, 5, 2)]


@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["transposed", "sliced", "class_strided"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=[f"K{k}-n{n}-C{c}" for k, n, c in LAYOUT_SHAPES])
def test_layouts_and_int32_labels(shape, dtype, atol, rtol, layout, label_dtype):
    """Any strides give the contiguous input's result bit for bit; int32 labels work like int64."""
    K, n, C = shape
    gen = _seed(shape, str(dtype), layout, str(label_dtype))
    z, labels = make_inputs(K, n, C, dtype, gen)
    labels = labels.to(label_dtype)
    zl = with_layout(z, layout)
    batch, alpha, log = 3.0 * n + 1, 0.7, layout == "sliced"  # a global batch B != n
    loss, dz = _C.apm_loss_forward(zl, labels, 1.0 / batch, alpha, log, 1e-8, True)
    want = _C.apm_loss_forward(z, labels.long(), 1.0 / batch, alpha, log, 1e-8, True)
    assert torch.equal(loss, want[0]) and torch.equal(dz, want[1])
    check(loss, dz, z, labels, batch, alpha, log, 1e-8, atol, rtol, layout)
    zr = with_layout(z, layout).requires_grad_(True)
    with use_backend("cpu"):
        out = apm_loss(zr, labels, batch_size=batch, alpha=alpha, log=log)
    (grad,) = torch.autograd.grad(out, zr)
    assert torch.equal(out.detach(), loss) and torch.equal(grad, dz)


@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_exact_ties(dtype, atol, rtol, log):
    """Checkpoints equal to the teacher: d = 0 (log mode: −log(eps), g = −1/eps) and sgn = 0, so
    their dz rows are exactly 0 and dT is the cross-entropy gradient alone."""
    gen = _seed("ties", str(dtype), log)
    z, labels = make_inputs(3, 20, 10, dtype, gen, ties=False)
    z[1:] = z[0]
    eps = 1e-6
    loss, dz = _C.apm_loss_forward(z, labels, 1.0 / 20, 0.1, log, eps, True)
    check(loss, dz, z, labels, 20.0, 0.1, log, eps, atol, rtol, "ties")
    assert torch.equal(dz[1:], torch.zeros_like(dz[1:]))
    phi = 3 * 20 * (-torch.log(torch.tensor(eps, dtype=F64)) if log else 0.0)
    ce = torch.nn.functional.cross_entropy(z[0].double(), labels, reduction="sum")
    assert abs(float(loss) - float((phi + 0.1 * ce) / 20)) <= 1e-5 * abs(float(phi + 0.1 * ce) / 20)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
def test_extreme_logits(dtype, atol, rtol):
    """Large logits (stable logsumexp) and spreads far past exp's underflow."""
    gen = _seed("extreme", str(dtype))
    z, labels = make_inputs(2, 50, 100, F64, gen, ties=False)
    z[0, :25] *= 500.0  # softmax one-hot; most exps underflow
    z[0, 25:] += 3e4 if dtype != F16 else 3e3  # a large common offset
    z = z.to(dtype)
    for log in (False, True):
        loss, dz = _C.apm_loss_forward(z, labels, 1.0 / 50, 0.5, log, 1e-8, True)
        check(loss, dz, z, labels, 50.0, 0.5, log, 1e-8, atol, rtol, "extreme")


def test_deterministic_across_thread_counts():
    """Blocks of samples do not depend on the thread count: identical bits for 1, 2 and 3 threads."""
    gen = _seed("threads")
    cases = [make_inputs(5, 1000, 100, F32, gen), make_inputs(5, 257, 1000, BF16, gen), make_inputs(1, 5000, 10, F32, gen)]
    old = torch.get_num_threads()
    runs = []
    try:
        for nt in (1, 2, 3, 1):
            torch.set_num_threads(nt)
            assert _C.num_threads() == nt  # the extension's OpenMP follows torch's setting
            runs.append([_C.apm_loss_forward(z, y, 1e-3, 0.1, log, 1e-8, True) for z, y in cases for log in (False, True)])
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for (la, da), (lb, db) in zip(runs[0], other):
            assert torch.equal(la, lb) and torch.equal(da, db)


@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(5, 100, 10), (1, 7, 1000), (5, 33, 100), (2, 3, 37)])
def test_baseline_isa(shape, dtype, atol, rtol, log, monkeypatch):
    """The per-sample kernels are compiled for the baseline ISA and with AVX2 + FMA; the baseline copy
    only runs on CPUs without AVX2, so force it here (strided and contiguous z)."""
    gen = _seed("base", shape, str(dtype), log)
    z, labels = make_inputs(*shape, dtype, gen)
    monkeypatch.setenv("DDFAST_APM_LOSS_ISA", "base")
    for zl in (z, with_layout(z, "class_strided")):
        loss, dz = _C.apm_loss_forward(zl, labels, 0.01, 0.1, log, 1e-8, True)
        check(loss, dz, z, labels, 100.0, 0.1, log, 1e-8, atol, rtol, "base")


def test_segments_add_up():
    """With the global batch B, the losses and gradients of two segments make the whole batch's."""
    gen = _seed("segments")
    z, labels = make_inputs(5, 64, 10, F32, gen)
    whole, dz = _C.apm_loss_forward(z, labels, 1 / 64, 0.1, False, 1e-8, True)
    a = _C.apm_loss_forward(z[:, :40], labels[:40], 1 / 64, 0.1, False, 1e-8, True)
    b = _C.apm_loss_forward(z[:, 40:], labels[40:], 1 / 64, 0.1, False, 1e-8, True)
    assert abs(float(a[0] + b[0]) - float(whole)) <= 1e-6 * abs(float(whole))
    assert torch.equal(torch.cat([a[1], b[1]], dim=1), dz)  # per-sample rows: bit-identical


def _bad_inputs():
    z = torch.randn(3, 4, 5)
    y = torch.tensor([0, 1, 4, 2])
    return [
        ("ndim", (torch.randn(3, 4), y, 1.0, 0.1, False, 1e-8, True)),
        ("one slice", (torch.randn(1, 4, 5), y, 1.0, 0.1, False, 1e-8, True)),
        ("int z", (torch.ones(3, 4, 5, dtype=torch.int32), y, 1.0, 0.1, False, 1e-8, True)),
        ("labels length", (z, y[:3], 1.0, 0.1, False, 1e-8, True)),
        ("labels 2-D", (z, y[None], 1.0, 0.1, False, 1e-8, True)),
        ("labels float", (z, y.float(), 1.0, 0.1, False, 1e-8, True)),
        ("labels int16", (z, y.to(torch.int16), 1.0, 0.1, False, 1e-8, True)),
        ("label too large", (z, torch.tensor([0, 1, 5, 2]), 1.0, 0.1, False, 1e-8, True)),
        ("label negative", (z, torch.tensor([0, -1, 4, 2], dtype=torch.int32), 1.0, 0.1, False, 1e-8, False)),
        ("inv_batch", (z, y, 0.0, 0.1, False, 1e-8, True)),
        ("alpha", (z, y, 1.0, -0.1, False, 1e-8, True)),
        ("eps", (z, y, 1.0, 0.1, True, -1e-8, True)),
    ]


@pytest.mark.parametrize("name,args", _bad_inputs(), ids=[name for name, _ in _bad_inputs()])
def test_bad_input(name, args):
    with pytest.raises(ValueError):
        _C.apm_loss_forward(*args)


def test_bad_input_through_op():
    z = torch.randn(3, 4, 5)
    with use_backend("cpu"), pytest.raises(ValueError):
        apm_loss(z, torch.tensor([0, 1, 7, 2]))
