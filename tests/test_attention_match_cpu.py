"""K2 (batched attention matching) C++ CPU backend vs the float64 oracle (ddfast.reference.attention_match
by autograd; the closed form for p < 1, where autograd gives NaN at F == 0): p ∈ {1, 2, 4, 1.5, 0.5},
both modes, several layers of odd sizes, ragged / unsorted labels with classes absent on either side, an
all-zero synthetic map (F.normalize's eps branch), every float dtype (inputs rounded to the dtype, the
oracle computed on the rounded values), strided and channels_last inputs, empty sides and layer lists,
bitwise determinism across thread counts and the baseline-ISA copy."""
import zlib

import pytest
import torch

import ddfast._C as _C
from ddfast.backend import use_backend
from ddfast.ops.attention_match import attention_match as op
from ddfast.reference import attention_match as ref
from ddfast.testing import assert_close

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# (dtype, loss rtol, grad tol): grads are compared with atol = tol·max|expected| and rtol = tol (the
# closed-form gradient is a difference of class means, so its error scales with the largest entries)
DTYPES = [(F32, 2e-5, 2e-5), (F64, 1e-10, 1e-10), (F16, 2e-5, 2e-3), (BF16, 2e-5, 1e-2)]
DTYPE_IDS = ["fp32", "fp64", "fp16", "bf16"]
# odd sizes; 130 and 260 channels pass the four-row blocking and the float -> double flushes, 30×20
# positions the row-sum chunks
SHAPES = [(5, 3, 7), (3, 2, 2), (260, 3, 5), (2, 30, 20)]
YR = [2, 0, 0, 1, 2, 2, 4, 0, 1]  # class 3 absent on the real side
YS = [0, 3, 2, 2, 0, 1, 2, 0]  # ragged, unsorted; class 4 absent on the synthetic side
WEIGHTS = [100.0, 3.0, 0.5, 7.0]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_case(shapes, yr, ys, dtype, gen, emb_dim=6, zero_map=True):
    """Real features ReLU'd (exact zeros), synthetic ones signed with some exact zeros; rounded to dtype."""
    yr, ys = torch.tensor(yr, dtype=torch.long), torch.tensor(ys, dtype=torch.long)
    fr = [torch.randn(len(yr), *s, generator=gen, dtype=F64).relu().to(dtype) for s in shapes]
    fs = []
    for s in shapes:
        f = torch.randn(len(ys), *s, generator=gen, dtype=F64)
        f = torch.where(torch.rand(f.shape, generator=gen, dtype=F64) < 0.1, 0.0, f)
        fs.append(f.to(dtype))
    if zero_map and len(ys) > 4:
        fs[0][4] = 0  # an all-zero map of an active class: ‖a‖ = 0 <= eps
        if len(fs) > 1:
            fs[1][2] = 0
    er = es = None
    if emb_dim:
        er = torch.randn(len(yr), emb_dim, generator=gen, dtype=F64).to(dtype)
        es = torch.randn(len(ys), emb_dim, generator=gen, dtype=F64).to(dtype)
    return fr, fs, yr, ys, er, es


def oracle(fr, fs, yr, ys, p, mode, weights, er, es, w_emb):
    """(loss, [dF], d_emb or None) in float64 on the (rounded) values of the inputs."""
    fr64 = [f.to(F64) for f in fr]
    fs64 = [f.detach().to(F64) for f in fs]
    er64 = None if er is None else er.to(F64)
    es64 = None if es is None else es.detach().to(F64)
    if p < 1:  # autograd: 0·inf = NaN at F == 0; the closed form has the limit 0 there
        loss, dfs, de = ref.attention_match_and_grad(fr64, fs64, yr, ys, p, mode, weights, er64, es64, w_emb)
        return loss, dfs, de
    fs64 = [f.requires_grad_(True) for f in fs64]
    leaves = list(fs64) + ([es64.requires_grad_(True)] if es64 is not None else [])
    loss = ref.attention_match(fr64, fs64, yr, ys, p, mode, weights, er64, es64, w_emb)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True) if leaves else []
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return loss.detach(), grads[:len(fs64)], (grads[-1] if es64 is not None else None)


def check(loss, dfs, de, expected, fs, es, dtype, loss_rtol, grad_tol, name):
    e_loss, e_dfs, e_de = expected
    want_loss_dtype = ref.loss_dtype(fs, es)  # the first synthetic layer's, else the synthetic embedding's
    assert loss.dim() == 0 and loss.dtype == want_loss_dtype, (loss.shape, loss.dtype)
    assert_close(loss, e_loss, atol=1e-30, rtol=loss_rtol, name=f"{name} loss")
    assert len(dfs) == len(fs)
    for l, (d, e, f) in enumerate(zip(dfs, e_dfs, fs)):
        assert d.shape == f.shape and d.dtype == f.dtype and d.is_contiguous(), (l, d.shape, d.dtype, d.stride())
        scale = float(e.abs().max()) if e.numel() else 0.0
        assert_close(d, e, atol=grad_tol * scale + 1e-300, rtol=grad_tol, name=f"{name} dF[{l}]")
    if e_de is not None:
        assert de.shape == es.shape and de.dtype == es.dtype and de.is_contiguous()
        scale = float(e_de.abs().max()) if e_de.numel() else 0.0
        assert_close(de, e_de, atol=grad_tol * scale + 1e-300, rtol=grad_tol, name=f"{name} d_emb")
    else:
        assert de.numel() == 0 and de.dim() == 1 and de.dtype == loss.dtype


def direct(fr, fs, yr, ys, p, mode, weights, er, es, w_emb, with_grad=True):
    k = ref._num_classes(yr, ys)
    return _C.attention_match_forward(fr, fs, yr, ys, k, float(p), mode == "spatial", [float(w) for w in weights],
                                      er, es, float(w_emb), with_grad)


def through_op(fr, fs, yr, ys, p, mode, weights, er, es, w_emb):
    """(loss, grads) of the op under the cpu backend by autograd (dF and, with embeddings, d_emb)."""
    fsg = [f.detach().requires_grad_(True) for f in fs]  # same strides (clone() makes sliced inputs dense)
    esg = None if es is None else es.detach().requires_grad_(True)
    with use_backend("cpu"):
        loss = op(fr, fsg, yr, ys, p, mode, weights, er, esg, w_emb)
    leaves = fsg + ([esg] if esg is not None else [])
    grads = torch.autograd.grad(loss, leaves) if leaves else []
    return loss.detach(), list(grads)


@pytest.mark.parametrize("emb", [True, False], ids=["emb", "no_emb"])
@pytest.mark.parametrize("dtype,loss_rtol,grad_tol", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("mode", ["spatial", "channel"])
@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 1.5, 0.5])
def test_matches_oracle(p, mode, dtype, loss_rtol, grad_tol, emb):
    gen = _gen("main", p, mode, str(dtype), emb)
    fr, fs, yr, ys, er, es = make_case(SHAPES, YR, YS, dtype, gen, emb_dim=6 if emb else 0)
    expected = oracle(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.3)
    loss, dfs, de = direct(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.3)
    check(loss, dfs, de, expected, fs, es, dtype, loss_rtol, grad_tol, "direct")
    # the eps branch: the all-zero maps get a zero gradient (sgn(0) = 0); absent classes too
    assert not dfs[0][4].any() and not dfs[1][2].any()
    assert all(not d[ys == 3].any() for d in dfs)
    if emb:
        assert not de[ys == 3].any()
    # without the gradient: the same loss bits, empty gradients
    loss_ng, dfs_ng, de_ng = direct(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.3, with_grad=False)
    assert torch.equal(loss_ng, loss)
    assert len(dfs_ng) == len(fs)
    assert all(d.dim() == 1 and d.numel() == 0 and d.dtype == f.dtype for d, f in zip(dfs_ng, fs))
    assert de_ng.dim() == 1 and de_ng.numel() == 0 and de_ng.dtype == loss.dtype
    # through the op and autograd: the same bits as the direct call
    if dtype in (F32, F64):
        op_loss, grads = through_op(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.3)
        assert torch.equal(op_loss, loss)
        for g, d in zip(grads, dfs + ([de] if emb else [])):
            assert torch.equal(g, d)


def _layout(f, layout):
    """The same values as f [N, C, H, W] in another memory layout."""
    N, C, H, W = f.shape
    if layout == "channels_last":
        out = f.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # offset, H and W not mergeable, every stride padded
        big = torch.zeros(2 * N + 1, C + 2, H + 3, 2 * W + 1, dtype=f.dtype)
        out = big[1::2, 1:C + 1, 2:H + 2, ::2][:, :, :, :W]
        out.copy_(f)
    elif layout == "transposed":  # H innermost
        out = f.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "cl_sliced":  # channels innermost but padded, from a channels_last window
        big = torch.zeros(N, C + 3, H + 1, W, dtype=f.dtype).contiguous(memory_format=torch.channels_last)
        out = big[:, 2:C + 2, 1:, :]
        out.copy_(f)
    else:
        raise ValueError(layout)
    assert torch.equal(out, f)
    return out


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed", "cl_sliced"])
@pytest.mark.parametrize("dtype,loss_rtol,grad_tol", [DTYPES[0], DTYPES[1], DTYPES[3]], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("mode", ["spatial", "channel"])
@pytest.mark.parametrize("p", [1.0, 1.5])
def test_layouts(p, mode, dtype, loss_rtol, grad_tol, layout):
    """Any strides are read in place; dF comes back contiguous; strided embeddings too."""
    gen = _gen("layout", p, mode, str(dtype), layout)
    fr, fs, yr, ys, er, es = make_case(SHAPES[:3] + [(17, 1, 6)], YR, YS, dtype, gen)
    weights = WEIGHTS
    expected = oracle(fr, fs, yr, ys, p, mode, weights, er, es, 0.3)
    frl = [_layout(f, layout) for f in fr]
    fsl = [_layout(f, layout) for f in fs]
    er_t, es_t = er.t().contiguous().t(), es.t().contiguous().t()  # column-major embeddings
    loss, dfs, de = direct(frl, fsl, yr, ys, p, mode, weights, er_t, es_t, 0.3)
    check(loss, dfs, de, expected, fs, es, dtype, loss_rtol, grad_tol, layout)
    op_loss, grads = through_op(frl, fsl, yr, ys, p, mode, weights, er_t, es_t, 0.3)
    assert torch.equal(op_loss, loss) and all(torch.equal(g, d) for g, d in zip(grads, dfs + [de]))


def test_int32_labels_and_mixed_real_dtype():
    gen = _gen("int32")
    fr, fs, yr, ys, er, es = make_case(SHAPES, YR, YS, F32, gen)
    want = direct(fr, fs, yr, ys, 2.0, "spatial", WEIGHTS, er, es, 0.3)
    got = direct(fr, fs, yr.int(), ys.int(), 2.0, "spatial", WEIGHTS, er, es, 0.3)
    assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    assert torch.equal(got[2], want[2])
    # the real side in another dtype than the synthetic one
    fr16 = [f.to(BF16) for f in fr]
    expected = oracle(fr16, fs, yr, ys, 2.0, "spatial", WEIGHTS, er, es, 0.3)
    loss, dfs, de = direct(fr16, fs, yr.int(), ys.int(), 2.0, "spatial", WEIGHTS, er, es, 0.3)
    check(loss, dfs, de, expected, fs, es, F32, 2e-5, 2e-5, "mixed")


@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
def test_empty_sides_and_layer_lists(dtype):
    gen = _gen("empty", str(dtype))
    shapes = [(4, 3, 5), (2, 2, 2)]
    fr, fs, yr, ys, er, es = make_case(shapes, YR, YS, dtype, gen)
    tol = 2e-5 if dtype == F32 else 1e-10
    for name, (a, b, c, d, e, f) in {
        "no syn": ([x for x in fr], [x[:0] for x in fs], yr, ys[:0], er, es[:0]),
        "no real": ([x[:0] for x in fr], fs, yr[:0], ys, er[:0], es),
        "no syn, no emb": (fr, [x[:0] for x in fs], yr, ys[:0], None, None),
    }.items():
        loss, dfs, de = direct(a, b, c, d, 2.0, "spatial", [1.0, 2.0], e, f, 0.3)
        assert float(loss) == 0.0 and loss.dtype == dtype, name
        assert [x.shape for x in dfs] == [x.shape for x in b] and all(not x.any() for x in dfs), name
        if e is not None:
            assert de.shape == f.shape and de.dtype == f.dtype and not de.any(), name
        with use_backend("cpu"):
            assert float(op(a, b, c, d, 2.0, "spatial", [1.0, 2.0], e, f, 0.3)) == 0.0, name
    # no layers, the embedding term only
    expected = oracle([], [], yr, ys, 1.0, "spatial", [], er, es, 0.3)
    loss, dfs, de = direct([], [], yr, ys, 1.0, "spatial", [], er, es, 0.3)
    assert dfs == []
    check(loss, dfs, de, expected, [], es, dtype, tol, tol, "emb only")
    op_loss, grads = through_op([], [], yr, ys, 1.0, "spatial", [], er, es, 0.3)
    assert torch.equal(op_loss, loss) and torch.equal(grads[0], de)
    # nothing at all
    loss, dfs, de = direct([], [], yr, ys, 1.0, "channel", [], None, None, 0.3)
    assert float(loss) == 0.0 and dfs == [] and de.numel() == 0


def test_deterministic_across_thread_counts():
    """Large enough for the parallel paths (samples, class-sum columns): identical bits for 1, 2, 3 threads."""
    gen = _gen("threads")
    yr = torch.randint(0, 7, (72,), generator=gen)
    ys = torch.randint(0, 7, (21,), generator=gen)
    ys[ys == 6] = 5  # class 6 absent on the synthetic side
    fr, fs, yr, ys, er, es = make_case([(24, 32, 32), (64, 8, 9)], yr.tolist(), ys.tolist(), F32, gen, emb_dim=600)
    fs[0] = fs[0].contiguous(memory_format=torch.channels_last)
    cases = [(p, mode) for p in (1.0, 1.5) for mode in ("spatial", "channel")]
    old = torch.get_num_threads()
    runs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            assert _C.num_threads() == nt
            runs.append([direct(fr, fs, yr, ys, p, mode, [2.0, 1.0], er, es, 0.1) for p, mode in cases])
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for (la, da, ea), (lb, db, eb) in zip(runs[0], other):
            assert torch.equal(la, lb) and torch.equal(ea, eb) and all(torch.equal(a, b) for a, b in zip(da, db))
    for (p, mode), (loss, dfs, de) in zip(cases, runs[0]):
        expected = oracle(fr, fs, yr, ys, p, mode, [2.0, 1.0], er, es, 0.1)
        check(loss, dfs, de, expected, fs, es, F32, 2e-5, 2e-5, f"threads {p} {mode}")


@pytest.mark.parametrize("dtype,loss_rtol,grad_tol", [DTYPES[0], DTYPES[2]], ids=["fp32", "fp16"])
@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 1.5])
def test_baseline_isa(p, dtype, loss_rtol, grad_tol, monkeypatch):
    """The per-sample kernels are compiled for the baseline ISA and with AVX2 + FMA; force the baseline."""
    gen = _gen("base", p, str(dtype))
    fr, fs, yr, ys, er, es = make_case(SHAPES, YR, YS, dtype, gen)
    fs[2] = fs[2].contiguous(memory_format=torch.channels_last)
    monkeypatch.setenv("DDFAST_ATTENTION_MATCH_ISA", "base")
    for mode in ("spatial", "channel"):
        expected = oracle(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.3)
        loss, dfs, de = direct(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.3)
        check(loss, dfs, de, expected, fs, es, dtype, loss_rtol, grad_tol, f"base {mode}")


def _bad_inputs():
    gen = _gen("bad")
    fr, fs, yr, ys, er, es = make_case([(3, 2, 2)], [0, 1, 1], [1, 0], F32, gen)
    ok = dict(real_feats=fr, syn_feats=fs, real_labels=yr, syn_labels=ys, num_classes=2, p=1.0, spatial=True,
              layer_weights=[1.0], real_emb=er, syn_emb=es, emb_weight=1.0, with_grad=True)
    return [
        ("label too large", dict(ok, syn_labels=torch.tensor([1, 2]))),
        ("label negative", dict(ok, real_labels=torch.tensor([0, -1, 1], dtype=torch.int32))),
        ("labels float", dict(ok, syn_labels=ys.float())),
        ("labels length", dict(ok, syn_labels=ys[:1])),
        ("list lengths", dict(ok, real_feats=fr + fr)),
        ("weights length", dict(ok, layer_weights=[1.0, 2.0])),
        ("shape", dict(ok, syn_feats=[fs[0][:, :2]])),
        ("3-D", dict(ok, syn_feats=[fs[0][:, 0]], real_feats=[fr[0][:, 0]])),
        ("int features", dict(ok, syn_feats=[fs[0].int()], real_feats=[fr[0].int()])),
        ("p", dict(ok, p=0.0)),
        ("one emb", dict(ok, syn_emb=None)),
        ("emb width", dict(ok, syn_emb=es[:, :3])),
    ]


@pytest.mark.parametrize("name,kwargs", _bad_inputs(), ids=[name for name, _ in _bad_inputs()])
def test_bad_input(name, kwargs):
    with pytest.raises(ValueError):
        _C.attention_match_forward(**kwargs)


def test_out_of_range_label_message_and_op():
    gen = _gen("bad op")
    fr, fs, yr, ys, _, _ = make_case([(3, 2, 2)], [0, 1, 1], [1, 0], F32, gen)
    with pytest.raises(ValueError, match=r"syn_labels must lie in \[0, 2\).*got 5 at index 1"):
        _C.attention_match_forward(fr, fs, yr, torch.tensor([1, 5]), 2, 1.0, True, [1.0], None, None, 1.0, True)
    with use_backend("cpu"), pytest.raises(ValueError, match="real_labels must lie"):
        op(fr, fs, torch.tensor([0, -1, 1]), ys, 1.0, "spatial")
