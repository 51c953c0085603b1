"""K4 Triton backend (kernels/apm_loss.py): numerics under TRITON_INTERPRET=1 against the float64
autograd oracle (ddfast.reference.apm_loss.apm_loss + torch.autograd.grad), through the launcher and
through ddfast.ops.apm_loss under use_backend("triton"), and ahead-of-time compilation of the kernel
specialisations the launcher picks for sm_80/sm_90 (no spills).

The AOT checks go through ddfast.testing.aot_compile_many, which compiles in a child process without
the interpreter. `pytest -s -k aot` prints the register table.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (tests/conftest.py does too)

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from ddfast.backend import use_backend  # noqa: E402
from ddfast.kernels import apm_loss as ka  # noqa: E402
from ddfast.ops.apm_loss import apm_loss as apm_loss_op  # noqa: E402
from ddfast.reference import apm_loss as ref  # noqa: E402
from ddfast.testing import AotRequest, PtxasReport, aot_compile_many, assert_close  # noqa: E402

F64 = torch.float64
# dtype -> relative tolerance of dz (one rounding of the fp32 result to the dtype); the loss is fp32
# from exactly the same (rounded) inputs as the oracle for every dtype.
DZ_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LOSS_ATOL, LOSS_RTOL = 1e-6, 1e-5


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(k: int, n: int, c: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """[K+1, n, C]: a teacher and K checkpoints scattered around it (so the L1 distances differ)."""
    gen = _gen(seed)
    teacher = 2.0 * torch.randn(1, n, c, generator=gen, dtype=F64)
    scale = torch.rand(k, 1, 1, generator=gen, dtype=F64) + 0.1
    students = teacher + scale * torch.randn(k, n, c, generator=gen, dtype=F64)
    return torch.cat([teacher, students]).to(dtype)


def _labels(n: int, c: int, seed: int, dtype=torch.int64) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=_gen(seed + 1)).to(dtype)


def oracle(z: torch.Tensor, labels: torch.Tensor, batch: float, alpha: float, log: bool, eps: float):
    """(loss, dloss/dz) in float64 by autograd through the reference formulation."""
    z64 = z.detach().to(F64).requires_grad_(True)
    loss = ref.apm_loss(z64, labels, batch, alpha, log, eps)
    (grad,) = torch.autograd.grad(loss, z64, allow_unused=True)
    return loss.detach(), (torch.zeros_like(z64) if grad is None else grad)


def check_loss_grad(loss, dz, ref_loss, ref_grad, dtype, with_grad=True, name=""):
    assert loss.dtype == torch.float32 and loss.shape == (), (loss.dtype, loss.shape)
    assert_close(loss, ref_loss, LOSS_ATOL, LOSS_RTOL, f"{name} loss")
    if not with_grad:
        assert dz.numel() == 0 and dz.dtype == dtype
        return
    assert dz.dtype == dtype and dz.shape == ref_grad.shape and dz.is_contiguous()
    rtol = DZ_RTOL[dtype]
    expected = ref_grad if dtype == torch.float32 else ref_grad.to(dtype).to(F64)
    scale = float(ref_grad.abs().max()) if ref_grad.numel() else 0.0
    assert_close(dz, expected, rtol * scale, rtol, f"{name} dz")


def check(z, labels, *, batch=None, alpha=0.1, log=False, eps=1e-8, with_grad=True, name=""):
    batch = float(batch if batch is not None else max(z.shape[1], 1))
    loss, dz = ka.apm_loss_forward(z, labels, 1.0 / batch, alpha, log, eps, with_grad)
    ref_loss, ref_grad = oracle(z, labels, batch, alpha, log, eps)
    check_loss_grad(loss, dz, ref_loss, ref_grad, z.dtype, with_grad, name)
    return loss, dz


# ---------------------------------------------------------------------------------------------
# numerics (interpreter)
# ---------------------------------------------------------------------------------------------
SHAPES = [(k, n, c) for k in (1, 5) for n in (0, 1, 7, 130) for c in (2, 10, 100, 1000)]


def _shape_cases():
    for k, n, c in SHAPES:
        for log in (False, True):
            # n = 130, C = 1000 runs 130 one-row programs (~2 s each under the interpreter): one
            # log mode per K there.
            if (n, c) == (130, 1000) and log != (k == 5):
                continue
            yield pytest.param(k, n, c, log, id=f"K{k}-n{n}-C{c}-{'log' if log else 'l1'}")


@pytest.mark.parametrize("k,n,c,log", list(_shape_cases()))
def test_shapes_fp32(k, n, c, log):
    z = _logits(k, n, c, seed=1000 * k + 10 * n + c)
    labels = _labels(n, c, seed=c)
    loss, dz = check(z, labels, log=log, alpha=0.1, name="grad")
    if n * c <= 1000:  # the forward-only specialisation gives the same loss
        loss_ng, dz_ng = check(z, labels, log=log, alpha=0.1, with_grad=False, name="no grad")
        assert torch.equal(loss_ng, loss)
    if n == 0:
        assert float(loss) == 0.0 and dz.shape == (k + 1, 0, c)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
@pytest.mark.parametrize("k,n,c", [(5, 7, 100), (1, 130, 10), (3, 3, 1000)])
def test_half_inputs(dtype, log, k, n, c):
    z = _logits(k, n, c, seed=7 * n + c, dtype=dtype)
    check(z, _labels(n, c, seed=n), log=log, alpha=0.3, batch=256, name=str(dtype))
    check(z, _labels(n, c, seed=n), log=log, alpha=0.3, batch=256, with_grad=False, name=str(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs_and_int32_labels(dtype):
    k, n, c = 3, 9, 37
    # z stored as [C, K+1, n] and viewed as [K+1, n, C]: strides (n, 1, (K+1)·n)
    z = _logits(k, n, c, seed=11, dtype=dtype).permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert not z.is_contiguous() and z.stride(2) != 1
    labels = _labels(2 * n, c, seed=12, dtype=torch.int32)[::2]  # int32, stride 2
    for log in (False, True):
        check(z, labels, log=log, alpha=0.5, name="permuted")
    # a crop of a bigger tensor: every stride differs from the contiguous one
    base = _logits(k + 1, 2 * n + 1, c + 5, seed=13, dtype=dtype)
    z = base[1:, 1::2, 3:-2]
    assert z.shape == (k + 1, n, c) and not z.is_contiguous()
    for log in (False, True):
        check(z, _labels(n, c, seed=14, dtype=torch.int32), log=log, alpha=0.2, name="crop")


@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_ties(log, dtype):
    """d = 0 rows (S_k = T: dS = 0, φ = −log ε) and single tied elements (sgn(0) = 0)."""
    k, n, c = 3, 6, 10
    z = _logits(k, n, c, seed=21, dtype=dtype)
    z[1] = z[0]  # checkpoint 1 equals the teacher: d_1i = 0 for every i
    z[2, :, ::2] = z[0, :, ::2]  # checkpoint 2 ties on every other class
    z[3, 2] = z[0, 2]  # checkpoint 3 ties on one sample
    loss, dz = check(z, _labels(n, c, seed=22), log=log, eps=1e-3, name="ties")
    assert dz[1].eq(0).all() and dz[2, :, ::2].eq(0).all() and dz[3, 2].eq(0).all()
    # stride-0 slabs: every checkpoint is the teacher
    row = _logits(0, n, c, seed=23, dtype=dtype)
    z0 = row.expand(k + 1, n, c)
    assert z0.stride(0) == 0
    loss, dz = check(z0, _labels(n, c, seed=24), log=log, eps=1e-3, name="expanded")
    assert dz[1:].eq(0).all()


@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
def test_one_class(log):
    """C = 1: CE = 0 and softmax − onehot = 0; only the L1 terms remain."""
    z = _logits(2, 5, 1, seed=25)
    check(z, torch.zeros(5, dtype=torch.long), log=log, alpha=0.7, name="C=1")


def test_chunked_kernel_real():
    """C > MAX_BLOCK_C takes the column-chunked kernel (one sample per program, 1024-column chunks)."""
    assert ka.blocks(ka.MAX_BLOCK_C)[0] is False and ka.blocks(ka.MAX_BLOCK_C + 1)[0] is True
    z = _logits(2, 2, 5000, seed=31)
    labels = torch.tensor([4999, 2500])
    check(z, labels, log=True, alpha=0.2, name="chunked log")
    check(z, labels, log=False, alpha=0.2, name="chunked l1")
    check(z.to(torch.bfloat16), labels, log=True, alpha=0.2, name="chunked bf16")


@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
def test_chunked_kernel_small_chunks(monkeypatch, log):
    """The chunked kernel on many chunks with a ragged last one (C = 100 in chunks of 16), strided z,
    int32 labels, a d = 0 row, with and without the gradient."""
    monkeypatch.setattr(ka, "MAX_BLOCK_C", 64)
    monkeypatch.setattr(ka, "CHUNK_C", 16)
    assert ka.blocks(100) == (True, 1, 16, ka.NUM_WARPS)
    k, n, c = 3, 3, 100
    z = _logits(k, n, c, seed=41).permute(2, 0, 1).contiguous().permute(1, 2, 0)
    z[2, 1] = z[0, 1]
    labels = _labels(n, c, seed=42, dtype=torch.int32)
    check(z, labels, log=log, alpha=0.1, batch=64, name="chunked")
    check(z, labels, log=log, alpha=0.1, batch=64, with_grad=False, name="chunked no grad")


def test_deterministic_and_alpha_zero():
    z = _logits(5, 40, 100, seed=51)  # 10 programs
    labels = _labels(40, 100, seed=52)
    a = ka.apm_loss_forward(z, labels, 1 / 40, 0.0, True, 1e-8, True)
    b = ka.apm_loss_forward(z, labels, 1 / 40, 0.0, True, 1e-8, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ref_loss, ref_grad = oracle(z, labels, 40, 0.0, True, 1e-8)
    check_loss_grad(*a, ref_loss, ref_grad, torch.float32)


def test_launcher_rejects_bad_input():
    one = torch.zeros(1, dtype=torch.long)
    with pytest.raises(TypeError):
        ka.apm_loss_forward(torch.zeros(2, 1, 3, dtype=F64), one, 1.0, 0.1, False, 1e-8, True)
    with pytest.raises(ValueError):
        ka.apm_loss_forward(torch.zeros(1, 1, 3), one, 1.0, 0.1, False, 1e-8, True)  # no checkpoint
    # int32 offsets: a z spanning >= 2^31 elements is refused before anything runs (meta tensors)
    huge = torch.empty_strided((3, 4, 10), (2**30, 10, 1), device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        ka.apm_loss_forward(huge, torch.zeros(4, dtype=torch.long, device="meta"), 1.0, 0.1, False, 1e-8, True)


# ---------------------------------------------------------------------------------------------
# through the op (ddfast.ops.apm_loss) with the triton backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("log", [False, True], ids=["l1", "log"])
def test_op_under_triton_backend(monkeypatch, dtype, log):
    calls = []
    launcher = ka.apm_loss_forward

    def spy(*args):
        calls.append(args[-1])  # with_grad
        return launcher(*args)

    monkeypatch.setattr(ka, "apm_loss_forward", spy)
    k, n, c = 4, 7, 10
    z = _logits(k, n, c, seed=61, dtype=dtype)
    labels = _labels(n, c, seed=62, dtype=torch.int32)
    ref_loss, ref_grad = oracle(z, labels, 32.0, 0.25, log, 1e-8)
    with use_backend("triton"):
        zg = z.clone().requires_grad_(True)
        loss = apm_loss_op(zg, labels, batch_size=32, alpha=0.25, log=log)
        (3.0 * loss).backward()
        with torch.no_grad():
            loss_ng = apm_loss_op(z, labels, batch_size=32, alpha=0.25, log=log)
    assert calls == [True, False]
    check_loss_grad(loss.detach(), zg.grad / 3.0, ref_loss, ref_grad, dtype, name="op")
    assert_close(loss_ng, ref_loss, LOSS_ATOL, LOSS_RTOL, "op no grad")
    assert zg.grad.dtype == dtype and zg.grad.shape == z.shape


# ---------------------------------------------------------------------------------------------
# AOT compilation for sm_80 / sm_90
# ---------------------------------------------------------------------------------------------
AOT_ARCHS = (80, 90)
_I = "i32"


def _signature(xt: str, lt: str, chunked: bool) -> dict[str, str]:
    sig = dict(z_ptr=xt, labels_ptr=lt, dz_ptr=xt)
    if chunked:
        sig["g_ptr"] = "*fp32"
    sig.update(partial_ptr="*fp32", K=_I, N=_I, C=_I, s_k=_I, s_n=_I, s_c=_I, s_lab=_I,
               inv_batch="fp32", alpha="fp32", eps="fp32", LOG="constexpr", WITH_GRAD="constexpr")
    if not chunked:
        sig["BLOCK_N"] = "constexpr"
    sig["BLOCK_C"] = "constexpr"
    return sig


def aot_configs() -> dict[str, tuple[str, dict, dict, int]]:
    """label -> (kernel name, signature, constexprs, num_warps) for the launcher's block choices
    (ka.blocks): every tile class once (multi-row 2 / 16 / 128 columns, one-row 1024 / 4096 columns,
    chunked), then the smallest, largest and chunked tiles for fp32 and bf16 logits, both φ, with the
    gradient (the register-heaviest) and without; one fp16 / int32-labels build."""
    cases = [("*fp32", "*i64", True, True, c) for c in (2, 16, 128, 1000, 4096, 5000)]  # every tile class
    cases += [("*fp32", "*i64", False, True, c) for c in (16, 4096, 5000)]
    cases += [("*bf16", "*i64", log, True, c) for log in (False, True) for c in (16, 4096, 5000)]
    cases += [("*fp32", "*i64", True, False, c) for c in (16, 4096, 5000)]  # forward only
    cases += [("*fp16", "*i32", False, True, 1000)]  # fp16 logits, int32 labels
    configs = {}
    for xt, lt, log, grad, c in cases:
        chunked, bn, bc, warps = ka.blocks(c)
        ce = dict(LOG=log, WITH_GRAD=grad, BLOCK_C=bc)
        if not chunked:
            ce["BLOCK_N"] = bn
        name = "_apm_loss_chunked_kernel" if chunked else "_apm_loss_kernel"
        tag = f"{xt[1:]},{lt[1:]},{'log' if log else 'l1'},{'grad' if grad else 'fwd'},N{bn}xC{bc},w{warps}"
        configs[f"{name}[{tag}]"] = (name, _signature(xt, lt, chunked), ce, warps)
    # Triton's JIT turns integer arguments equal to 1 into constexprs (n = 1, K = 1, C = 1, unit
    # column / label strides): the kernels must compile that way too (C.to(...) would not).
    for c in (1, 5000):
        chunked, bn, bc, warps = ka.blocks(c)
        ones = dict(K=1, N=1, s_c=1, s_lab=1, **({"C": 1} if c == 1 else {}))
        sig = dict(_signature("*fp32", "*i64", chunked), **{arg: "constexpr" for arg in ones})
        ce = dict(ones, LOG=True, WITH_GRAD=True, BLOCK_C=bc, **({} if chunked else {"BLOCK_N": bn}))
        name = "_apm_loss_chunked_kernel" if chunked else "_apm_loss_kernel"
        configs[f"{name}[fp32,i64,log,grad,N{bn}xC{bc},w{warps},ints=1]"] = (name, sig, ce, warps)
    return configs


AOT_LABELS = [f"{label}@sm{arch}" for label in aot_configs() for arch in AOT_ARCHS]


@pytest.fixture(scope="module")
def aot_results() -> dict[str, PtxasReport]:
    requests = [AotRequest(getattr(ka, name), sig, ce, arch, warps)
                for name, sig, ce, warps in aot_configs().values() for arch in AOT_ARCHS]
    # two child processes (the machine has 2 cores; each compile is single-threaded)
    half = (len(requests) + 1) // 2
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(aot_compile_many, [requests[:half], requests[half:]]))
    return dict(zip(AOT_LABELS, parts[0] + parts[1]))


@pytest.mark.parametrize("label", AOT_LABELS)
def test_aot_compiles_without_spills(aot_results, label):
    report = aot_results[label]
    print(f"\n{label}: {report.registers} registers, {report.spills} spill bytes, {report.stack_bytes} stack bytes")
    assert report.spills == 0
    assert report.registers <= 128
