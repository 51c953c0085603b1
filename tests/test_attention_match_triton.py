"""K2 Triton backend (kernels/attention_match.py): numerics under TRITON_INTERPRET=1 against the float64
autograd oracle (ddfast.reference.attention_match.attention_match + torch.autograd.grad, on inputs
rounded to the tested dtype), through the launcher and through ddfast.ops.attention_match under
use_backend("triton"), and ahead-of-time compilation of the kernel specialisations the launcher picks
for sm_80/sm_90 (no spills).

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
from ddfast.kernels import attention_match as ka  # noqa: E402
from ddfast.ops.attention_match import attention_match as attention_match_op  # noqa: E402
from ddfast.reference import attention_match as ref  # noqa: E402
from ddfast.testing import AotRequest, PtxasReport, aot_compile_many, assert_close  # noqa: E402

F64 = torch.float64
MODES = ("spatial", "channel")
PS = (1.0, 2.0, 4.0, 1.5, 0.5)
# dtype -> relative tolerance of dF / de (one rounding of the fp32 result to the dtype); the loss is
# fp32 from exactly the same (rounded) inputs as the oracle for every dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
LOSS_ATOL, LOSS_RTOL = 1e-7, 1e-5
# Odd layer sizes: C·H·W = 5·3·7, 4·2·2 and a W = 1 layer.
SHAPES = [(5, 3, 7), (4, 2, 2), (3, 5, 1)]
WEIGHTS = [1.0, 2.5, 0.5]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _labels():
    """Ragged, unsorted; class 3 only on the synthetic side, class 4 only on the real side."""
    yr = torch.tensor([2, 0, 0, 1, 2, 2, 4, 0, 1])
    ys = torch.tensor([0, 3, 2, 2, 0, 1, 2])
    return yr, ys


def _case(seed, shapes=SHAPES, yr=None, ys=None, dtype=torch.float32, emb_dim=6, zero_map=True):
    """(real feats, syn feats, yr, ys, er, es): ReLU real features, signed synthetic features, one
    all-zero synthetic map (‖a‖ = 0: F.normalize's eps branch)."""
    gen = _gen(seed)
    if yr is None:
        yr, ys = _labels()
    fr = [torch.randn(len(yr), *s, generator=gen).relu().to(dtype) for s in shapes]
    fs = [torch.randn(len(ys), *s, generator=gen).to(dtype) for s in shapes]
    if zero_map and fs and len(ys) > 1:
        fs[0][1] = 0.0
    er = torch.randn(len(yr), emb_dim, generator=gen).to(dtype) if emb_dim else None
    es = torch.randn(len(ys), emb_dim, generator=gen).to(dtype) if emb_dim else None
    return fr, fs, yr, ys, er, es


def oracle(fr, fs, yr, ys, p, mode, weights, er, es, emb_weight):
    """(loss, [dL/dF^S_l], dL/de^S or None) in float64 by autograd through the reference, on the
    inputs as given (already rounded to their dtype). A zero-weight all-zero dummy layer keeps the
    reference in float64 when there are no layers."""
    fr64 = [f.detach().to(F64) for f in fr]
    fs64 = [f.detach().to(F64).requires_grad_(True) for f in fs]
    weights = list(weights)
    extra_r, extra_s = [], []
    if not fs:
        extra_r, extra_s = [torch.zeros(len(yr), 1, 1, 1, dtype=F64)], [torch.zeros(len(ys), 1, 1, 1, dtype=F64)]
        weights = [0.0]
    has_emb = er is not None and es is not None
    er64 = er.detach().to(F64) if has_emb else None
    es64 = es.detach().to(F64).requires_grad_(True) if has_emb else None
    loss = ref.attention_match(fr64 + extra_r, fs64 + extra_s, yr, ys, p, mode, weights, er64, es64, emb_weight)
    wrt = fs64 + ([es64] if has_emb else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True) if wrt else []
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, wrt)]
    if p < 1:  # autograd gives 0·∞ = NaN at F = 0 for p < 1; the closed form (and the kernel) gives 0
        grads[:len(fs)] = [torch.where(f == 0, 0.0, g) for f, g in zip(fs64, grads)]
    return loss.detach(), grads[:len(fs)], (grads[-1] if has_emb else None)


def check_grad(actual, expected, dtype, name):
    assert actual.dtype == dtype and actual.shape == expected.shape and actual.is_contiguous(), \
        (name, actual.dtype, tuple(actual.shape), tuple(expected.shape))
    rtol = GRAD_RTOL[dtype]
    target = expected if dtype == torch.float32 else expected.to(dtype).to(F64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual, target, rtol * scale + 1e-30, rtol, name)


def check(fr, fs, yr, ys, p, mode, weights=None, er=None, es=None, emb_weight=0.7, num_classes=None,
          with_grad=True, name=""):
    """The launcher against the oracle; returns (loss, grads, d_emb)."""
    weights = WEIGHTS[:len(fs)] if weights is None else weights
    k = ref._num_classes(yr, ys) if num_classes is None else num_classes
    loss, grads, d_emb = ka.attention_match_forward(fr, fs, yr, ys, k, p, mode == "spatial", weights, er, es,
                                                    emb_weight, with_grad)
    ref_loss, ref_grads, ref_de = oracle(fr, fs, yr, ys, p, mode, weights, er, es, emb_weight)
    assert loss.dtype == torch.float32 and loss.shape == (), (loss.dtype, loss.shape)
    assert_close(loss, ref_loss, LOSS_ATOL, LOSS_RTOL, f"{name} loss")
    assert isinstance(grads, list) and len(grads) == len(fs)
    has_emb = er is not None and es is not None
    if not with_grad:
        assert all(g.ndim == 1 and g.numel() == 0 and g.dtype == f.dtype for g, f in zip(grads, fs))
        assert d_emb.ndim == 1 and d_emb.numel() == 0 and d_emb.dtype == torch.float32
        return loss, grads, d_emb
    for l, (g, rg, f) in enumerate(zip(grads, ref_grads, fs)):
        check_grad(g, rg, f.dtype, f"{name} dF[{l}]")
    if has_emb:
        check_grad(d_emb, ref_de, es.dtype, f"{name} d_emb")
    else:
        assert d_emb.ndim == 1 and d_emb.numel() == 0 and d_emb.dtype == torch.float32
    return loss, grads, d_emb


# ---------------------------------------------------------------------------------------------
# numerics (interpreter)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", PS, ids=lambda p: f"p{p:g}")
def test_launcher_fp32(p, mode):
    """Three odd-sized layers, ragged unsorted labels, a class absent on each side, an all-zero
    synthetic map, with the embedding term; then the forward-only call gives the same loss."""
    fr, fs, yr, ys, er, es = _case(int(10 * p) + (mode == "channel"))
    loss, grads, _ = check(fr, fs, yr, ys, p, mode, er=er, es=es, name=f"p={p} {mode}")
    # the all-zero map gets a zero gradient; class 3 (synthetic only) gets none at all
    assert grads[0][1].eq(0).all()
    assert all(g[ys == 3].eq(0).all() for g in grads)
    if p == 1.5:  # the forward-only call (no kernel B) gives the same loss
        loss_ng, _, _ = check(fr, fs, yr, ys, p, mode, er=er, es=es, with_grad=False, name="no grad")
        assert torch.equal(loss_ng, loss)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("p", [2.0, 1.5], ids=["p2", "p1.5"])
def test_half_inputs(p, dtype, mode):
    fr, fs, yr, ys, er, es = _case(31 + int(p), dtype=dtype)
    check(fr, fs, yr, ys, p, mode, er=er, es=es, name=str(dtype))


def test_mixed_dtypes():
    """fp32 real features with bf16 synthetic features (each read in its own dtype), fp16 embeddings."""
    fr, _, yr, ys, er, es = _case(41)
    _, fs, _, _, _, _ = _case(42, dtype=torch.bfloat16)
    check(fr, fs, yr, ys, 4.0, "spatial", er=er.half(), es=es.half(), name="mixed")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [1.0, 3.0], ids=["p1", "p3"])
def test_strided_layouts_and_int32_labels(p, mode):
    """channels_last features, cropped/strided slices of bigger tensors, expanded (stride-0) samples,
    int32 labels with stride 2."""
    gen = _gen(51)
    yr, ys = _labels()
    shapes = [(6, 3, 5), (5, 4, 3)]
    fr = [torch.randn(len(yr), *s, generator=gen).relu().to(memory_format=torch.channels_last) for s in shapes]
    fs = [torch.randn(len(ys), *s, generator=gen).to(memory_format=torch.channels_last) for s in shapes]
    assert not fs[0].is_contiguous() and ka._is_channels_last(fs[0])
    yr32 = torch.stack([yr, yr], 1).flatten().to(torch.int32)[::2]
    ys32 = torch.stack([ys, ys], 1).flatten().to(torch.int32)[::2]
    assert yr32.stride(0) == 2 and yr32.dtype == torch.int32
    er = torch.randn(len(yr), 2 * 5, generator=gen)[:, ::2]  # strided embeddings
    es = torch.randn(len(ys), 2 * 5, generator=gen)[:, 1::2]
    check(fr, fs, yr32, ys32, p, mode, er=er, es=es, name="channels_last")

    # crops: every stride differs from the contiguous one
    big_r = torch.randn(2 * len(yr), 9, 6, 8, generator=gen).relu()
    big_s = torch.randn(len(ys) + 2, 9, 6, 8, generator=gen)
    fr = [big_r[::2, 1:7, 1:4, 2:7], big_r[1::2, ::2, 2:, 1::3]]
    fs = [big_s[2:, 2:8, :3, 3:], big_s[1:-1, ::2, 1:5, ::3]]
    assert all(not f.is_contiguous() for f in fr + fs)
    check(fr, fs, yr32, ys32, p, mode, weights=[3.0, 0.25], name="crop")

    # expanded samples (stride 0 along N) and a permuted (W, H swapped) view
    base = torch.randn(1, 4, 3, 5, generator=gen)
    fs = [base.expand(len(ys), 4, 3, 5), torch.randn(len(ys), 4, 5, 3, generator=gen).transpose(2, 3)]
    fr = [torch.randn(len(yr), 4, 3, 5, generator=gen).relu(), torch.randn(len(yr), 4, 3, 5, generator=gen)]
    assert fs[0].stride(0) == 0
    check(fr, fs, yr, ys, p, mode, weights=[1.0, 2.0], name="expanded")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [1.0, 2.0], ids=["p1", "p2"])
def test_eps_branch_tiny_map(p, mode):
    """A synthetic map with 0 < ‖a‖ < 1e-12 (F.normalize's clamp): â = a/eps, v = u/eps (large,
    nonzero gradient), next to an all-zero map (zero gradient)."""
    fr, fs, yr, ys, _, _ = _case(61, emb_dim=0)
    fs[0][2] = 0.0
    fs[0][2, 1, 0, :3] = torch.tensor([1e-14, -3e-14, 2e-14])
    a_tiny = ka.attention_map(fs[0], p, mode == "spatial")[2]
    assert 0 < float(a_tiny.max()) < 1e-12
    _, grads, _ = check(fr, fs, yr, ys, p, mode, name="tiny map")
    assert grads[0][2].abs().max() > 0 and grads[0][1].eq(0).all()


def test_zero_layers_embedding_only():
    _, _, yr, ys, er, es = _case(71, shapes=[])
    check([], [], yr, ys, 2.0, "spatial", weights=[], er=er, es=es, emb_weight=1.3, name="emb only")
    check([], [], yr, ys, 2.0, "channel", weights=[], er=er.bfloat16(), es=es.bfloat16(), name="emb only bf16")
    loss, grads, d_emb = check([], [], yr, ys, 2.0, "spatial", weights=[], name="nothing")
    assert float(loss) == 0.0 and grads == [] and d_emb.numel() == 0


@pytest.mark.parametrize("mode", MODES)
def test_empty_sides_and_absent_classes(mode):
    yr, ys = _labels()
    # N_S = 0 (loss 0, empty gradients), with and without the embedding term
    fr, fs, _, ys0, er, es = _case(81, yr=yr, ys=ys[:0])
    loss, grads, d_emb = check(fr, fs, yr, ys0, 4.0, mode, er=er, es=es, name="N_S=0")
    assert float(loss) == 0.0 and all(g.shape == f.shape for g, f in zip(grads, fs)) and d_emb.shape == es.shape
    check(fr, fs, yr, ys0, 4.0, mode, with_grad=False, name="N_S=0 no grad")
    # N_R = 0: no class is on both sides, every gradient is 0
    fr, fs, yr0, _, er, es = _case(82, yr=yr[:0], ys=ys)
    loss, grads, d_emb = check(fr, fs, yr0, ys, 1.5, mode, er=er, es=es, name="N_R=0")
    assert float(loss) == 0.0 and all(g.eq(0).all() for g in grads) and d_emb.eq(0).all()
    # both sides empty, no classes at all
    fr, fs, _, _, _, _ = _case(83, yr=yr[:0], ys=ys[:0], emb_dim=0)
    loss, grads, _ = check(fr, fs, yr[:0], ys[:0], 2.0, mode, name="both empty")
    assert float(loss) == 0.0
    # disjoint classes, more classes than labels use, no embeddings
    fr, fs, yr2, ys2, _, _ = _case(84, yr=torch.tensor([0, 0, 2]), ys=torch.tensor([1, 3, 3, 1]), emb_dim=0)
    loss, grads, _ = check(fr, fs, yr2, ys2, 2.0, mode, num_classes=7, name="disjoint")
    assert float(loss) == 0.0 and all(g.eq(0).all() for g in grads)
    # one class on both sides, a single synthetic sample, extra unused classes
    fr, fs, yr3, ys3, er, es = _case(85, yr=torch.tensor([5, 5, 5]), ys=torch.tensor([5]), zero_map=False)
    check(fr, fs, yr3, ys3, 1.0, mode, er=er, es=es, num_classes=9, name="one class")


@pytest.mark.parametrize("mode,layout,p", [("spatial", "nchw", 1.5), ("channel", "nchw", 2.0),
                                           ("spatial", "channels_last", 2.0), ("channel", "channels_last", 1.5)])
def test_multi_block_tiles(monkeypatch, mode, layout, p):
    """Tiny tiles force several map blocks per sample, several reduced-axis steps (channel mode:
    BLOCK_H × BLOCK_W position tiles with ragged edges) and several row chunks per class mean."""
    monkeypatch.setattr(ka, "TILE", 16)
    monkeypatch.setattr(ka, "MAX_RUN", 4)
    monkeypatch.setattr(ka, "MAX_RUN_CL", 4)
    assert ka.blocks(True, 5, 3, 6) == (4, 4, 1) and ka.blocks(False, 5, 3, 6) == (4, 4, 4)
    assert ka.blocks(True, 5, 3, 6, True) == (4, 4, 1) and ka.blocks(False, 5, 3, 6, True) == (4, 4, 4)
    assert ka.class_blocks(7, 18) == (4, 4)
    gen = _gen(91)
    yr = torch.tensor([1, 0, 1, 1, 2, 1, 1])  # class 1: 5 samples on each side (two row chunks of 4)
    ys = torch.tensor([1, 2, 1, 0, 1, 1, 1])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    fr = [torch.randn(len(yr), 5, 3, 6, generator=gen).relu().to(memory_format=fmt)]
    fs = [torch.randn(len(ys), 5, 3, 6, generator=gen).to(memory_format=fmt)]
    assert ka._is_channels_last(fs[0]) == (layout == "channels_last")
    er, es = torch.randn(len(yr), 9, generator=gen), torch.randn(len(ys), 9, generator=gen)
    check(fr, fs, yr, ys, p, mode, weights=[1.5], er=er, es=es, name=f"tiles p={p}")


def test_deterministic():
    fr, fs, yr, ys, er, es = _case(101)
    a = ka.attention_match_forward(fr, fs, yr, ys, 5, 1.5, True, WEIGHTS, er, es, 1.0, True)
    b = ka.attention_match_forward(fr, fs, yr, ys, 5, 1.5, True, WEIGHTS, er, es, 1.0, True)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and torch.equal(a[2], b[2])


def test_launcher_rejects_bad_input():
    fr, fs, yr, ys, er, es = _case(111)
    args = (yr, ys, 5, 2.0, True)
    with pytest.raises(TypeError):
        ka.attention_match_forward([f.double() for f in fr], fs, *args, WEIGHTS, None, None, 1.0, True)
    with pytest.raises(ValueError, match="differ in length"):
        ka.attention_match_forward(fr[:1], fs, *args, WEIGHTS, None, None, 1.0, True)
    with pytest.raises(ValueError, match="layer_weights"):
        ka.attention_match_forward(fr, fs, *args, WEIGHTS[:1], None, None, 1.0, True)
    with pytest.raises(ValueError, match="equal C, H, W"):
        ka.attention_match_forward([fr[0][:, :2]] + fr[1:], fs, *args, WEIGHTS, None, None, 1.0, True)
    with pytest.raises(ValueError, match="p must be"):
        ka.attention_match_forward(fr, fs, yr, ys, 5, 0.0, True, WEIGHTS, None, None, 1.0, True)
    with pytest.raises(ValueError, match="labels"):
        ka.attention_match_forward(fr, fs, yr.float(), ys, 5, 2.0, True, WEIGHTS, None, None, 1.0, True)
    # int32 offsets inside one sample: a span >= 2^31 elements is refused before anything runs
    huge = torch.empty_strided((2, 4, 8, 8), (2**32, 2**30, 8, 1), device="meta")
    two = torch.zeros(2, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match="2\\^31"):
        ka.attention_match_forward([huge], [huge], two, two, 1, 2.0, True, [1.0], None, None, 1.0, True)


# ---------------------------------------------------------------------------------------------
# through the op (ddfast.ops.attention_match) with the triton backend
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", MODES)
def test_op_under_triton_backend(monkeypatch, mode, dtype):
    calls = []
    launcher = ka.attention_match_forward

    def spy(*args):
        calls.append(args[-1])  # with_grad
        return launcher(*args)

    monkeypatch.setattr(ka, "attention_match_forward", spy)
    fr, fs, yr, ys, er, es = _case(121 + (mode == "channel"), dtype=dtype)
    ys = ys.to(torch.int32)
    p = 4.0 if mode == "spatial" else 1.5
    ref_loss, ref_grads, ref_de = oracle(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.5)
    with use_backend("triton"):
        fs_g = [f.clone().requires_grad_(True) for f in fs]
        es_g = es.clone().requires_grad_(True)
        loss = attention_match_op(fr, fs_g, yr, ys, p, mode, WEIGHTS, er, es_g, 0.5)
        (3.0 * loss).backward()
        with torch.no_grad():
            loss_ng = attention_match_op(fr, fs, yr, ys, p, mode, WEIGHTS, er, es, 0.5)
    assert calls == [True, False]
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss.detach(), ref_loss, LOSS_ATOL, LOSS_RTOL, "op loss")
    assert_close(loss_ng, ref_loss, LOSS_ATOL, LOSS_RTOL, "op no grad")
    for l, (f, rg) in enumerate(zip(fs_g, ref_grads)):
        assert f.grad.dtype == dtype and f.grad.shape == f.shape
        check_grad(f.grad / 3.0, rg, dtype, f"op dF[{l}]")
    check_grad(es_g.grad / 3.0, ref_de, dtype, "op d_emb")


# ---------------------------------------------------------------------------------------------
# AOT compilation for sm_80 / sm_90
# ---------------------------------------------------------------------------------------------
AOT_ARCHS = (80, 90)
_I = "i32"
_P_NAMES = {1: "p1", 2: "p2", 4: "p4", 0: "pgen"}


def _map_signature(xt: str) -> dict[str, str]:
    return dict(x_ptr=xt, a_ptr="*fp32", C=_I, H=_I, W=_I, M=_I, n_mblocks=_I, s_n=_I, s_c=_I, s_h=_I, s_w=_I,
                p="fp32", SPATIAL="constexpr", P_MODE="constexpr", BLOCK_M="constexpr", BLOCK_R="constexpr",
                BLOCK_W="constexpr")


def _grad_signature(xt: str) -> dict[str, str]:
    return dict(x_ptr=xt, v_ptr="*fp32", dx_ptr=xt, C=_I, H=_I, W=_I, M=_I, n_mblocks=_I,
                s_n=_I, s_c=_I, s_h=_I, s_w=_I, d_n=_I, d_c=_I, d_h=_I, d_w=_I,
                p="fp32", SPATIAL="constexpr", P_MODE="constexpr", BLOCK_M="constexpr", BLOCK_R="constexpr",
                BLOCK_W="constexpr")


def _feature_config(kernel: str, xt: str, spatial: bool, pm: int, shape: tuple[int, int, int],
                    channels_last: bool, ones: dict[str, int]) -> tuple[str, str, dict, dict, int]:
    """(label, kernel name, signature, constexprs, num_warps) of kernel A or B as the launcher launches
    it on a [N, *shape] layer. Triton's JIT turns integer arguments equal to 1 into constexprs: a unit
    stride (W-stride of NCHW features, C-stride of channels_last ones, dF's W-stride) and whatever
    else is 1 for that shape are given as such in ``ones``."""
    bm, br, bw = ka.blocks(spatial, *shape, channels_last)
    name = "_attention_map_kernel" if kernel == "map" else "_attention_grad_kernel"
    sig = _map_signature(xt) if kernel == "map" else _grad_signature(xt)
    if kernel == "map":
        ones = {k: v for k, v in ones.items() if not k.startswith("d_")}
    sig.update({arg: "constexpr" for arg in ones})
    ce = dict(ones, SPATIAL=spatial, P_MODE=pm, BLOCK_M=bm, BLOCK_R=br, BLOCK_W=bw)
    c, h, w = shape
    tag = (f"{xt[1:]},{'spatial' if spatial else 'channel'},{_P_NAMES[pm]},{c}x{h}x{w}"
           f"{',cl' if channels_last else ''},M{bm}xR{br}" + (f"xW{bw}" if not spatial else "")
           + (f",{'+'.join(sorted(ones))}=1" if ones else ""))
    return f"{name}[{tag}]", name, sig, ce, ka.NUM_WARPS


def aot_configs() -> dict[str, tuple[str, dict, dict, int]]:
    """label -> (kernel name, signature, constexprs, num_warps) for what the launcher picks, on the
    widest tiles (NCHW 128×32×32, the D2M/DataDAM FMNIST layer 1) unless stated:

    * kernels A and B × every P_MODE (1, 2, 4, general) × both modes, fp32 features;
    * kernels A and B × both modes × fp16 / bf16 features, general p (the register-heaviest path;
      the fast paths differ from it only in the arithmetic, the dtypes only in the loads/stores);
    * channels_last tiles (C-stride 1), fp32 and bf16, general p;
    * small odd layers (5×3×7: generic strides) and integer arguments equal to 1 (C = H = 1, one map
      block): the kernels must compile that way;
    * the class-mean kernel (wide and narrow inputs, M = 1)."""
    configs: dict[str, tuple[str, dict, dict, int]] = {}
    cases = []
    nchw_ones = dict(s_w=1, d_w=1)
    for kernel in ("map", "grad"):
        for spatial in (True, False):
            for pm in (1, 2, 4, 0):
                cases.append((kernel, "*fp32", spatial, pm, (128, 32, 32), False, nchw_ones))
            for xt in ("*fp16", "*bf16"):
                cases.append((kernel, xt, spatial, 0, (128, 32, 32), False, nchw_ones))
            for xt in ("*fp32", "*bf16"):
                cases.append((kernel, xt, spatial, 0, (128, 32, 32), True, dict(s_c=1, d_w=1)))
            cases.append((kernel, "*fp32", spatial, 0, (5, 3, 7), False, {}))
            # C = 1, H = 1, W = 5: one map block; M = C = 1 in channel mode
            ones = dict(C=1, H=1, s_w=1, d_w=1, n_mblocks=1, **({} if spatial else dict(M=1)))
            cases.append((kernel, "*fp32", spatial, 4, (1, 1, 5), False, ones))
    for case in cases:
        label, name, sig, ce, warps = _feature_config(*case)
        configs[label] = (name, sig, ce, warps)
    cm_sig = dict(x_ptr="*fp32", perm_ptr="*i32", seg_ptr="*i32", out_ptr="*fp32", M=_I, n_mblocks=_I,
                  BLOCK_I="constexpr", BLOCK_M="constexpr")
    for rows, cols in ((640, 1024), (128, 6)):
        bi, bm = ka.class_blocks(rows, cols)
        configs[f"_class_mean_kernel[{rows}x{cols},I{bi}xM{bm}]"] = (
            "_class_mean_kernel", cm_sig, dict(BLOCK_I=bi, BLOCK_M=bm), ka.NUM_WARPS)
    ones_sig = dict(cm_sig, M="constexpr", n_mblocks="constexpr")
    bi, bm = ka.class_blocks(128, 1)
    configs[f"_class_mean_kernel[128x1,I{bi}xM{bm},M+n_mblocks=1]"] = (
        "_class_mean_kernel", ones_sig, dict(M=1, n_mblocks=1, BLOCK_I=bi, BLOCK_M=bm), ka.NUM_WARPS)
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
