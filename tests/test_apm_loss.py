"""K4 (APM loss head): the closed form against float64 autograd of the formula, the op on every
available CPU backend (reference, cpu), segment additivity (1/B with the global B), torch.library
opcheck, torch.compile tracing and input validation. The cpu and triton kernels have their own
files (test_apm_loss_cpu.py, test_apm_loss_triton.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddfast.backend import cpu_extension, use_backend
from ddfast.ops import apm_loss
from ddfast.reference import apm_loss as ref
from ddfast.testing import assert_close

F64 = torch.float64
BACKENDS = ["reference", "cpu"]


def _inputs(k: int, n: int, c: int, seed: int, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(k + 1, n, c, generator=gen, dtype=F64) * 3).to(dtype)
    return z, torch.randint(0, c, (n,), generator=gen)


def _official(z: torch.Tensor, y: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """The official distill.py:343,361 terms for one chunk: −(|c|/B)·l1_loss per checkpoint + (|c|/B)·α·CE."""
    t, n = z[0], z.shape[1]
    loss = sum(-(n / batch) * F.l1_loss(s, t) for s in z[1:])
    return loss + (n / batch) * alpha * F.cross_entropy(t, y)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("k,n,c", [(1, 1, 2), (5, 7, 10), (3, 33, 100), (5, 0, 10)])
def test_closed_form_matches_autograd_float64(k, n, c, log):
    z, y = _inputs(k, n, c, seed=k * 100 + n + c)
    z = z.requires_grad_(True)
    expected = ref.apm_loss(z, y, batch_size=50, alpha=0.3, log=log)
    (dz_expected,) = torch.autograd.grad(expected, z) if n else (torch.zeros_like(z),)
    loss, dz = ref.apm_loss_and_grad(z.detach(), y, 1 / 50, 0.3, log, 1e-8)
    assert_close(loss, expected.detach(), atol=1e-12, rtol=1e-12, name="loss")
    assert_close(dz, dz_expected, atol=1e-14, rtol=1e-12, name="dz")


def test_code_form_is_the_official_l1_expression():
    z, y = _inputs(5, 13, 10, seed=3)
    assert_close(ref.apm_loss(z, y, batch_size=40, alpha=0.1), _official(z, y, 40, 0.1), atol=1e-14, rtol=1e-12, name="loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 2e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("k,n,c", [(1, 3, 2), (5, 17, 10), (4, 9, 1000)])
def test_op_matches_float64_oracle(backend, k, n, c, dtype, tol, log):
    if backend == "cpu" and cpu_extension() is None:
        pytest.skip("ddfast._C is not built")
    z, y = _inputs(k, n, c, seed=n * c + k, dtype=dtype)
    z = z.requires_grad_(True)
    z64 = z.detach().double().requires_grad_(True)  # the rounded input, exactly
    with use_backend(backend):
        loss = apm_loss(z, y, batch_size=2 * n, alpha=0.1, log=log)
    expected = ref.apm_loss(z64, y, batch_size=2 * n, alpha=0.1, log=log)
    assert loss.dtype == (F64 if dtype == F64 else torch.float32) and loss.shape == ()
    assert_close(loss.double(), expected.detach(), atol=tol * float(expected.abs()) + 1e-12, rtol=tol, name="loss")
    g = torch.tensor(0.7, dtype=loss.dtype)
    (dz,) = torch.autograd.grad(loss, z, g)
    (dz64,) = torch.autograd.grad(expected, z64, g.double())
    assert dz.dtype == dtype and dz.shape == z.shape
    assert_close(dz.double(), dz64, atol=tol * float(dz64.abs().max()) + 1e-12, rtol=tol, name="dz")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input_and_int32_labels(backend):
    if backend == "cpu" and cpu_extension() is None:
        pytest.skip("ddfast._C is not built")
    z, y = _inputs(3, 11, 10, seed=5, dtype=torch.float32)
    wide = torch.randn(4, 11, 20, dtype=torch.float32)
    wide[:, :, ::2] = z
    strided = wide[:, :, ::2].requires_grad_(True)  # stride 2 in the class dimension
    zt = z.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)  # n-major layout
    with use_backend(backend):
        out = [apm_loss(t, y.int(), alpha=0.2, log=True) for t in (strided, zt)]
    expected = ref.apm_loss(z.double(), y, alpha=0.2, log=True)
    for t, loss in zip((strided, zt), out):
        assert_close(loss.double(), expected, atol=1e-6, rtol=2e-6, name="loss")
        (dz,) = torch.autograd.grad(loss, t)
        assert dz.shape == z.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log", [False, True])
def test_segments_add_up_to_the_batch(backend, log):
    """(1/B) with the global B: the losses and gradients of ragged segments concatenate to the batch's."""
    if backend == "cpu" and cpu_extension() is None:
        pytest.skip("ddfast._C is not built")
    z, y = _inputs(5, 23, 10, seed=9)
    z = z.requires_grad_(True)
    with use_backend(backend):
        whole = apm_loss(z, y, log=log)
        (dz_whole,) = torch.autograd.grad(whole, z)
        parts, grads = [], []
        for seg in torch.arange(23).split(10):  # 10, 10, 3
            zs = z.detach()[:, seg].requires_grad_(True)
            loss = apm_loss(zs, y[seg], batch_size=23, log=log)
            parts.append(loss)
            grads.append(torch.autograd.grad(loss, zs)[0])
    assert_close(sum(parts), whole.detach(), atol=1e-13, rtol=1e-13, name="loss")
    assert_close(torch.cat(grads, 1), dz_whole, atol=1e-15, rtol=1e-13, name="dz")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_give_zero_sign_and_finite_log(backend):
    """d = 0 (a checkpoint equal to the teacher): sgn(0) = 0 as torch's l1_loss, and the log form stays finite through ε."""
    if backend == "cpu" and cpu_extension() is None:
        pytest.skip("ddfast._C is not built")
    z, y = _inputs(2, 4, 10, seed=1)
    z[1] = z[0]
    z = z.requires_grad_(True)
    with use_backend(backend):
        for log in (False, True):
            loss = apm_loss(z, y, log=log, eps=1e-6)
            (dz,) = torch.autograd.grad(loss, z)
            assert torch.isfinite(loss) and torch.isfinite(dz).all()
            assert (dz[1] == 0).all()


def test_opcheck_and_torch_compile():
    z, y = _inputs(5, 6, 10, seed=2, dtype=torch.float32)
    with use_backend("reference"):
        torch.library.opcheck(torch.ops.ddfast.apm_loss_forward.default, (z.requires_grad_(True), y, 0.1, 0.1, False, 1e-8, True),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        compiled = torch.compile(lambda t: apm_loss(t, y, log=True) * 2, fullgraph=True)
        value = compiled(z)
        (dz,) = torch.autograd.grad(value, z)
        expected = ref.apm_loss(z.detach().double().requires_grad_(True), y, log=True) * 2
    assert_close(value.double(), expected.detach(), atol=1e-6, rtol=1e-6, name="compiled loss")
    assert dz.shape == z.shape and torch.isfinite(dz).all()


@pytest.mark.parametrize("case,match", [
    (lambda z, y: (z[0], y), "K\\+1, n, C"),
    (lambda z, y: (z[:1], y), "at least one checkpoint"),
    (lambda z, y: (z, y[:-1]), "labels must be"),
    (lambda z, y: (z, y.float()), "labels must be"),
    (lambda z, y: (z, y + 10), "labels must lie"),
    (lambda z, y: (z.long(), y), "floating"),
])
def test_bad_inputs_raise(case, match):
    z, y = _inputs(2, 5, 10, seed=0)
    with pytest.raises(ValueError, match=match):
        apm_loss(*case(z, y))
    with pytest.raises(ValueError, match="batch_size"):
        apm_loss(z, y, batch_size=0)
