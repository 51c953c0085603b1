"""K1 Triton backend (kernels/stat_match.py): numerics under TRITON_INTERPRET=1 against float64
PyTorch formulations written here, and ahead-of-time compilation of every kernel for sm_80/sm_90.

The AOT checks go through ddfast.testing.aot_compile_many, which compiles in a child process without
the interpreter (see its docstring for why). `pytest -s -k aot` prints the register table.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddfast.kernels import stat_match as sm
from ddfast.testing import AotRequest, PtxasReport, aot_compile_many

# ---------------------------------------------------------------------------------------------
# float64 references
# ---------------------------------------------------------------------------------------------


def _resized_size(size: int, p: int) -> int:
    return -(-size // p) * p


def ref_resize(xd: torch.Tensor, p: int) -> torch.Tensor:
    """x' of the kernels: F.interpolate's bilinear resize to the next patch multiple (x if none)."""
    H, W = xd.shape[-2:]
    size = (_resized_size(H, p), _resized_size(W, p))
    return xd if size == (H, W) else F.interpolate(xd, size=size, mode="bilinear", align_corners=False)


def ref_stats(x: torch.Tensor, p: int):
    """(cmean, cM2, pmean, pM2) in float64: channel pair of x (as the kernel sees it), patch pair of x'."""
    xd = x.detach().to(torch.float64)
    cmean = xd.mean(dim=(0, 2, 3))
    cm2 = ((xd - cmean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
    if p == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return cmean, cm2, empty, empty
    xr = ref_resize(xd, p)
    B, C, H, W = xr.shape
    t = xr.reshape(B, C, H // p, p, W // p, p).permute(2, 4, 0, 1, 3, 5).reshape((H // p) * (W // p), -1)
    pmean = t.mean(dim=1)
    pm2 = ((t - pmean[:, None]) ** 2).sum(dim=1)
    return cmean, cm2, pmean, pm2


def ref_backward(x, cmean, g_cmean, g_cvar, pmean, g_pmean, g_pvar, p, count_c, count_p):
    """dx of DESIGN §4 K1 in float64 from the same (float32) inputs the kernel gets; the resize's
    adjoint is F.interpolate's autograd."""
    xd = x.detach().to(torch.float64).requires_grad_(p > 0)
    v = lambda t: t.to(torch.float64)[None, :, None, None]  # noqa: E731
    dx = v(g_cmean) / count_c + v(g_cvar) * 2 * (xd.detach() - v(cmean)) / count_c
    if p > 0:
        xr = ref_resize(xd, p)
        H, W = xr.shape[-2:]

        def per_pixel(t):  # [K] -> [1, 1, H', W']
            t = t.to(torch.float64).reshape(H // p, W // p)
            return t.repeat_interleave(p, 0).repeat_interleave(p, 1)[None, None]
        g = per_pixel(g_pmean) / count_p + per_pixel(g_pvar) * 2 * (xr.detach() - per_pixel(pmean)) / count_p
        dx = dx + (g if xr is xd else torch.autograd.grad(xr, xd, g)[0])
    return dx


def check_stats(x: torch.Tensor, p: int, rtol: float = 1e-5) -> None:
    out = sm.stat_match_forward(x, p)
    ref = ref_stats(x, p)
    names = ("cmean", "cm2", "pmean", "pm2")
    for name, o, r in zip(names, out, ref):
        assert o.dtype == torch.float32 and o.device == x.device, name
        assert o.shape == r.shape, f"{name}: {tuple(o.shape)} vs {tuple(r.shape)}"
        if r.numel():
            scale = float(r.abs().max())
            _assert_close(o, r, atol=rtol * scale, rtol=rtol, name=name)


def _assert_close(actual, expected, atol, rtol, name):
    from ddfast.testing import assert_close

    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)


def _randn(shape, dtype=torch.float32, seed=0, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    return (mean + std * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Forward numerics (interpreter)
# ---------------------------------------------------------------------------------------------

FWD_CASES = [
    ((1, 1, 4, 4), 4),
    ((2, 3, 8, 8), 4),
    ((3, 3, 12, 12), 4),  # K = 9, KW = 3
    ((2, 4, 32, 32), 4),  # K = 64
    ((2, 3, 16, 16), 16),  # one patch
    ((2, 2, 32, 32), 16),
    ((2, 2, 8, 12), 2),  # H != W
    ((2, 2, 6, 6), 3),  # p² = 9 padded to 16
    ((2, 4, 16, 16), 0),
    ((1, 3, 10, 6), 0),  # odd plane
]


@pytest.mark.parametrize("shape,p", FWD_CASES, ids=[f"{'x'.join(map(str, s))}-p{p}" for s, p in FWD_CASES])
def test_forward_fp32(shape, p):
    check_stats(_randn(shape, seed=sum(shape) + p, mean=0.5), p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,p", [((2, 3, 8, 8), 4), ((2, 3, 32, 32), 16), ((2, 3, 12, 12), 0)])
def test_forward_half_inputs(dtype, shape, p):
    # reference: float64 statistics of the rounded input; accumulation is fp32 in the kernel
    check_stats(_randn(shape, dtype=dtype, seed=1, mean=1.0), p)


@pytest.mark.parametrize("p", [4, 0])
def test_forward_channels_last(p):
    x = _randn((2, 6, 16, 16), seed=2).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    check_stats(x, p)


@pytest.mark.parametrize("p", [4, 0])
def test_forward_strided_views(p):
    base = _randn((2, 8, 12, 16), seed=3, mean=-2.0)
    check_stats(base[:, ::2], p)  # channel slice (non-contiguous, no copy)
    check_stats(base.transpose(2, 3)[:, 1:5, :, 4:8], p)  # spatial transpose + crop: H=16, W=4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [4, 0])
def test_forward_large_mean(p, dtype):
    x = _randn((2, 4, 16, 16), seed=4, mean=1000.0, std=1e-2)
    if dtype is torch.bfloat16:  # bf16 has no resolution at 1000 ± 0.01: use ± 1 there
        x = _randn((2, 4, 16, 16), seed=4, mean=1000.0, std=2.0).to(dtype)
    cmean, cm2, pmean, pm2 = sm.stat_match_forward(x, p)
    rc = ref_stats(x, p)
    from ddfast.testing import rel_error

    assert rel_error(cm2, rc[1]) < 1e-5, rel_error(cm2, rc[1])
    assert rel_error(cmean, rc[0]) < 1e-7
    if p:
        assert rel_error(pm2, rc[3]) < 1e-5, rel_error(pm2, rc[3])
        assert rel_error(pmean, rc[2]) < 1e-7


def test_forward_grouping_chunking_and_multi_chunk_merge(monkeypatch):
    """Batch groups of 2 with a partial last group, p² split into several pixel chunks, plane
    tiles and several stage-2 row chunks: the paths the small shapes above do not reach."""
    monkeypatch.setattr(sm, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(sm, "MAX_GROUP", 2)
    monkeypatch.setattr(sm, "TILE", 16)
    monkeypatch.setattr(sm, "MERGE_BLOCK_R", 2)
    x = _randn((3, 2, 16, 16), seed=5, mean=3.0)
    assert sm.batch_group(3, 2, 4) == 2 and sm.patch_blocks(8, 4) == (1, 16)
    check_stats(x, 8)  # BLOCK_J = 16 < p² = 64: 4 chunks; BLOCK_K = 1; 3 batch items in groups of 2
    check_stats(x[:, :, :6, :8], 0)  # 3 × 1 tiles of 2 × 8 per plane (the last one half masked)


def test_forward_nan_propagates():
    x = _randn((2, 3, 8, 8), seed=6)
    x[1, 2, 5, 6] = float("nan")
    cmean, cm2, pmean, pm2 = sm.stat_match_forward(x, 4)
    k = (5 // 4) * 2 + 6 // 4
    assert cmean[2].isnan() and cm2[2].isnan() and pmean[k].isnan() and pm2[k].isnan()
    rc = ref_stats(x, 4)
    keep_c = torch.tensor([0, 1])
    keep_k = torch.tensor([i for i in range(4) if i != k])
    _assert_close(cmean[keep_c], rc[0][keep_c], 1e-6, 1e-5, "cmean")
    _assert_close(cm2[keep_c], rc[1][keep_c], 1e-5, 1e-5, "cm2")
    _assert_close(pmean[keep_k], rc[2][keep_k], 1e-6, 1e-5, "pmean")
    _assert_close(pm2[keep_k], rc[3][keep_k], 1e-5, 1e-5, "pm2")
    # NaN also in the shift element x[0, 0, 0, 0]: channel 0 and patch 0 only
    x = _randn((2, 3, 8, 8), seed=6)
    x[0, 0, 0, 0] = float("nan")
    cmean, cm2, pmean, pm2 = sm.stat_match_forward(x, 4)
    assert cmean.isnan().tolist() == [True, False, False]
    assert pmean.isnan().tolist() == [True, False, False, False]
    assert pm2.isnan().tolist() == [True, False, False, False]


def test_forward_chan_merge_of_segments():
    """M2 outputs merge across batch segments (what --segment relies on)."""
    x = _randn((4, 3, 8, 8), seed=7, mean=5.0)
    full = sm.stat_match_forward(x, 4)
    a, b = sm.stat_match_forward(x[:1], 4), sm.stat_match_forward(x[1:], 4)

    def merge(ma, qa, na, mb, qb, nb):
        n = na + nb
        d = mb.double() - ma.double()
        return ma.double() + d * nb / n, qa.double() + qb.double() + d * d * na * nb / n

    cm, cq = merge(a[0], a[1], 1 * 64, b[0], b[1], 3 * 64)
    pm, pq = merge(a[2], a[3], 1 * 3 * 16, b[2], b[3], 3 * 3 * 16)
    ref = ref_stats(x, 4)
    for o, r, name in ((cm, ref[0], "cmean"), (cq, ref[1], "cm2"), (pm, ref[2], "pmean"), (pq, ref[3], "pm2")):
        _assert_close(o, r, 1e-5 * float(r.abs().max()), 1e-5, name)
    _assert_close(full[1], ref[1], 1e-5 * float(ref[1].abs().max()), 1e-5, "full cm2")


def test_forward_rejects_bad_input():
    with pytest.raises(TypeError):
        sm.stat_match_forward(torch.zeros(1, 1, 4, 4, dtype=torch.float64), 4)
    with pytest.raises(ValueError):
        sm.stat_match_forward(torch.zeros(1, 4, 4), 0)
    cmean, cm2, pmean, pm2 = sm.stat_match_forward(torch.zeros(0, 2, 4, 4), 4)
    assert cmean.shape == (2,) and pmean.shape == (1,) and cm2.eq(0).all()
    cmean, cm2, pmean, pm2 = sm.stat_match_forward(torch.zeros(0, 2, 6, 4), 4)  # resized to 8 × 4
    assert pmean.shape == (2,)


# ---------------------------------------------------------------------------------------------
# Bilinear resize to the next patch multiple (interpreter)
# ---------------------------------------------------------------------------------------------

RESIZE_CASES = [
    ((1, 1, 7, 7), 4),  # -> 8 × 8
    ((2, 3, 7, 7), 4),
    ((2, 3, 14, 13), 4),  # -> 16 × 16, H != W
    ((1, 3, 5, 9), 4),  # -> 8 × 12
    ((1, 3, 1, 3), 4),  # one source row and three columns -> 4 × 4
    ((2, 2, 6, 8), 4),  # only H resized (W maps by identity)
    ((1, 2, 14, 14), 16),  # one patch of 16 × 16
    ((2, 2, 8, 7), 3),  # p² = 9 padded to 16 -> 9 × 9
]
_RESIZE_IDS = [f"{'x'.join(map(str, s))}-p{p}" for s, p in RESIZE_CASES]


@pytest.mark.parametrize("shape,p", RESIZE_CASES, ids=_RESIZE_IDS)
def test_resize_forward_fp32(shape, p):
    check_stats(_randn(shape, seed=sum(shape) + p, mean=0.5), p)


@pytest.mark.parametrize("shape,p", RESIZE_CASES, ids=_RESIZE_IDS)
def test_resize_backward_fp32(shape, p):
    check_backward(_randn(shape, seed=sum(shape) + p, mean=0.3), p, seed=p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_resize_half_inputs(dtype):
    x = _randn((2, 3, 7, 7), dtype=dtype, seed=21, mean=1.0)
    check_stats(x, 4)
    check_backward(x, 4)


def test_resize_layouts():
    x = _randn((2, 4, 7, 7), seed=22).to(memory_format=torch.channels_last)
    assert not x.is_contiguous()
    check_stats(x, 4)
    check_backward(x, 4)
    base = _randn((2, 6, 13, 10), seed=23, mean=-2.0)
    for view in (base[:, ::2], base.transpose(2, 3)[:, 1:4, :, 2:9]):  # channel slice; transpose + crop
        check_stats(view, 4)
        check_backward(view, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resize_large_mean(dtype):
    from ddfast.testing import rel_error

    x = _randn((2, 3, 7, 7), seed=24, mean=1000.0, std=1e-2)
    if dtype is torch.bfloat16:
        x = _randn((2, 3, 7, 7), seed=24, mean=1000.0, std=2.0).to(dtype)
    cmean, cm2, pmean, pm2 = sm.stat_match_forward(x, 4)
    rc = ref_stats(x, 4)
    for name, o, r, tol in (("cmean", cmean, rc[0], 1e-7), ("cm2", cm2, rc[1], 1e-5),
                            ("pmean", pmean, rc[2], 1e-7), ("pm2", pm2, rc[3], 1e-5)):
        assert rel_error(o, r) < tol, (name, rel_error(o, r))
    if dtype is torch.float32:
        check_backward(x, 4, rtol=1e-5)


def test_resize_tiling_and_grouping(monkeypatch):
    """Several x' patch blocks and dx tiles per plane, batch groups with a partial last group and
    several stage-2 row chunks: the paths the small shapes above do not reach."""
    monkeypatch.setattr(sm, "TARGET_PROGRAMS", 1)
    monkeypatch.setattr(sm, "MAX_GROUP", 2)
    monkeypatch.setattr(sm, "RESIZE_TILE", 16)
    monkeypatch.setattr(sm, "MERGE_BLOCK_R", 2)
    assert sm.resize_blocks(10, 9, 4) == (8, 2, 8)  # 2 × 5 dx tiles, 8 x' columns per tile
    x = _randn((3, 1, 10, 9), seed=25, mean=3.0)
    check_stats(x, 4)  # -> 12 × 12: one patch per block
    check_stats(x, 8)  # -> 16 × 16: BLOCK_J = 16 < p² = 64, 4 chunks
    check_backward(x, 4)


def _taps_of(size: int, p: int, src: int) -> set[int]:
    """x' indices whose bilinear taps give source index src a nonzero weight."""
    from ddfast.reference.stat_match import bilinear_matrix

    return set(bilinear_matrix(size, _resized_size(size, p))[:, src].nonzero().flatten().tolist())


def test_resize_nan_propagates():
    """A NaN reaches its channel and exactly the patches of x' pixels that take it with a nonzero
    weight; dx is NaN at the pixel and finite on the other planes."""
    x = _randn((2, 3, 7, 7), seed=26)
    x[1, 2, 5, 6] = float("nan")
    cmean, cm2, pmean, pm2 = sm.stat_match_forward(x, 4)
    nan_k = sorted({(r // 4) * 2 + q // 4 for r in _taps_of(7, 4, 5) for q in _taps_of(7, 4, 6)})
    assert nan_k == [3]
    assert cmean.isnan().tolist() == [False, False, True] and cm2.isnan().tolist() == [False, False, True]
    assert pmean.isnan().nonzero().flatten().tolist() == nan_k == pm2.isnan().nonzero().flatten().tolist()
    rc = ref_stats(x.nan_to_num(0.0), 4)  # the statistics without the NaN pixel do not depend on it
    _assert_close(cm2[:2], rc[1][:2], 1e-5, 1e-5, "cm2")
    _assert_close(pmean[:3], rc[2][:3], 1e-6, 1e-5, "pmean")
    _assert_close(pm2[:3], rc[3][:3], 1e-5, 1e-5, "pm2")

    ref = ref_stats(x.nan_to_num(0.0), 4)
    ones3, ones4 = torch.ones(3), torch.ones(4)
    args = (ref[0].float(), ones3, ones3, ref[2].float(), ones4, ones4, 4, 98.0, 96.0)
    dx = sm.stat_match_backward(x, *args)
    assert dx[1, 2, 5, 6].isnan() and not dx[:, :2].isnan().any() and not dx[0].isnan().any()
    expected = ref_backward(x.nan_to_num(0.0), *args)
    _assert_close(dx[:, :2], expected[:, :2], 1e-6, 1e-5, "dx")


# ---------------------------------------------------------------------------------------------
# Backward numerics (interpreter)
# ---------------------------------------------------------------------------------------------


def check_backward(x: torch.Tensor, p: int, seed: int = 0, rtol: float = 1e-5, none_grads=False) -> None:
    B, C, H, W = x.shape
    K = (_resized_size(H, p) // p) * (_resized_size(W, p) // p) if p else 0
    g = torch.Generator().manual_seed(seed)
    ref = ref_stats(x, p)
    cmean, pmean = ref[0].float(), ref[2].float()
    g_cmean, g_cvar = torch.randn(C, generator=g), torch.randn(C, generator=g)
    g_pmean, g_pvar = torch.randn(K, generator=g), torch.randn(K, generator=g)
    if none_grads:
        g_cmean, g_pvar = None, None
    count_c, count_p = float(3 * B * H * W), float(2 * B * C * p * p)  # "global" counts
    dx = sm.stat_match_backward(x, cmean, g_cmean, g_cvar, pmean, g_pmean, g_pvar, p, count_c, count_p)
    z = lambda t, n: torch.zeros(n) if t is None else t  # noqa: E731
    expected = ref_backward(x, cmean, z(g_cmean, C), g_cvar, pmean, g_pmean, z(g_pvar, K), p, count_c, count_p)
    assert dx.dtype == x.dtype and dx.shape == x.shape and dx.stride() == torch.empty_like(x).stride()
    if x.dtype != torch.float32:  # one rounding of the fp32 result to the half type
        expected = expected.to(x.dtype).double()
        rtol = 1e-2 if x.dtype == torch.bfloat16 else 1e-3
    _assert_close(dx, expected, atol=rtol * float(expected.abs().max()), rtol=rtol, name="dx")


@pytest.mark.parametrize(
    "shape,p", [((2, 3, 8, 8), 4), ((1, 1, 4, 4), 4), ((2, 2, 32, 32), 16), ((2, 3, 12, 12), 0), ((1, 2, 6, 10), 0)]
)
def test_backward_fp32(shape, p):
    check_backward(_randn(shape, seed=8, mean=0.3), p)


@pytest.mark.parametrize("p", [4, 0])
def test_backward_layouts_and_half(p):
    x = _randn((2, 4, 8, 8), seed=9).to(memory_format=torch.channels_last)
    check_backward(x, p)
    check_backward(x.to(torch.bfloat16), p)
    check_backward(_randn((2, 8, 8, 8), seed=10)[:, ::2].to(torch.float16), p)  # strided -> contiguous dx


def test_backward_large_mean_and_none_grads():
    check_backward(_randn((2, 3, 8, 8), seed=11, mean=1000.0, std=1e-2), 4, rtol=1e-5)
    check_backward(_randn((2, 3, 8, 8), seed=12), 4, none_grads=True)


def test_backward_chunked_patch(monkeypatch):
    monkeypatch.setattr(sm, "TILE", 16)
    check_backward(_randn((2, 2, 16, 16), seed=13), 8)  # BLOCK_J = 16 < 64
    check_backward(_randn((2, 2, 5, 7), seed=14), 0)


def test_backward_nan_propagates():
    x = _randn((1, 2, 8, 8), seed=15)
    x[0, 1, 2, 3] = float("nan")
    ref = ref_stats(x, 4)
    ones2, ones4 = torch.ones(2), torch.ones(4)
    dx = sm.stat_match_backward(x, ref[0].float(), ones2, ones2, ref[2].float(), ones4, ones4, 4, 64.0, 32.0)
    assert dx.isnan().sum() > 0 and dx[0, 1, 2, 3].isnan()


# ---------------------------------------------------------------------------------------------
# AOT compilation for sm_80 / sm_90
# ---------------------------------------------------------------------------------------------

# shapes the launchers see in practice: (B, C, H, W, p)
AOT_SHAPES = [(100, 128, 32, 32, 4), (40, 64, 56, 56, 4), (8, 512, 112, 112, 16),
              (100, 128, 32, 32, 0), (40, 64, 56, 56, 0), (8, 512, 112, 112, 0)]
# resize shapes (H, W, p): x' = 8 × 8, 16 × 16, 32 × 32, 64 × 64, 16 × 16 from 1 × 3 (p > H)
AOT_RESIZE_SHAPES = [(7, 7, 4), (14, 14, 4), (28, 28, 4), (56, 56, 16), (1, 3, 16)]
AOT_ARCHS = (80, 90)
AOT_XTYPES = ("*fp32", "*bf16")
_I = "i32"


def aot_configs() -> dict[str, tuple[str, dict, dict]]:
    """label -> (kernel name, signature, constexprs), for the block sizes the launchers pick."""
    configs = {}
    for xt in AOT_XTYPES:
        for B, C, H, W, p in AOT_SHAPES:
            if p:
                K = (H // p) * (W // p)
                bk, bj = sm.patch_blocks(p, K)
                ce = {"P": p, "BLOCK_K": bk, "BLOCK_J": bj}
                fwd_sig = dict(x_ptr=xt, part_c_ptr="*fp32", part_p_ptr="*fp32", B=_I, C=_I, K=_I, KW=_I, G=_I,
                               stride_b=_I, stride_c=_I, stride_h=_I, stride_w=_I, part_c_plane=_I,
                               part_p_plane=_I, P="constexpr", BLOCK_K="constexpr", BLOCK_J="constexpr")
                bwd_sig = dict(x_ptr=xt, dx_ptr=xt, cmean_ptr="*fp32", g_cmean_ptr="*fp32", g_cvar_ptr="*fp32",
                               pmean_ptr="*fp32", g_pmean_ptr="*fp32", g_pvar_ptr="*fp32", C=_I, K=_I, KW=_I,
                               sx_b=_I, sx_c=_I, sx_h=_I, sx_w=_I, sd_b=_I, sd_c=_I, sd_h=_I, sd_w=_I,
                               inv_count_c="fp32", inv_count_p="fp32",
                               P="constexpr", BLOCK_K="constexpr", BLOCK_J="constexpr")
                tag = f"P{p}_K{bk}_J{bj}"
                configs[f"_stat_fwd_patch_kernel[{xt[1:]},{tag}]"] = ("_stat_fwd_patch_kernel", fwd_sig, ce)
                configs[f"_stat_bwd_patch_kernel[{xt[1:]},{tag}]"] = ("_stat_bwd_patch_kernel", bwd_sig, ce)
            else:
                bh, bw = sm.plane_blocks(H, W)
                ce = {"BLOCK_H": bh, "BLOCK_W": bw}
                fwd_sig = dict(x_ptr=xt, part_c_ptr="*fp32", B=_I, C=_I, H=_I, W=_I, G=_I, stride_b=_I,
                               stride_c=_I, stride_h=_I, stride_w=_I, part_c_plane=_I,
                               BLOCK_H="constexpr", BLOCK_W="constexpr")
                bwd_sig = dict(x_ptr=xt, dx_ptr=xt, cmean_ptr="*fp32", g_cmean_ptr="*fp32", g_cvar_ptr="*fp32",
                               C=_I, H=_I, W=_I, sx_b=_I, sx_c=_I, sx_h=_I, sx_w=_I, sd_b=_I, sd_c=_I, sd_h=_I,
                               sd_w=_I, inv_count_c="fp32", BLOCK_H="constexpr", BLOCK_W="constexpr")
                tag = f"H{bh}_W{bw}"
                configs[f"_stat_fwd_channel_kernel[{xt[1:]},{tag}]"] = ("_stat_fwd_channel_kernel", fwd_sig, ce)
                configs[f"_stat_bwd_channel_kernel[{xt[1:]},{tag}]"] = ("_stat_bwd_channel_kernel", bwd_sig, ce)
            merge_ce = {"HAS_PATCH": p > 0, "BLOCK_R": sm.MERGE_BLOCK_R, "BLOCK_N": sm.MERGE_BLOCK_N}
            merge_sig = dict(x_ptr=xt, part_c_ptr="*fp32", cmean_ptr="*fp32", cm2_ptr="*fp32",
                             part_p_ptr="*fp32", pmean_ptr="*fp32", pm2_ptr="*fp32",
                             rows_c=_I, C=_I, part_c_plane=_I, stride_c=_I, n_c_progs=_I,
                             rows_p=_I, K=_I, part_p_plane=_I, KW=_I, patch_stride_h=_I, patch_stride_w=_I,
                             HAS_PATCH="constexpr", BLOCK_R="constexpr", BLOCK_N="constexpr")
            configs[f"_stat_merge_kernel[{xt[1:]},patch={p > 0}]"] = ("_stat_merge_kernel", merge_sig, merge_ce)
        for H, W, p in AOT_RESIZE_SHAPES:
            K = (sm.resized_size(H, p) // p) * (sm.resized_size(W, p) // p)
            bk, bj = sm.patch_blocks(p, K, sm.RESIZE_TILE)
            fwd_sig = dict(x_ptr=xt, part_c_ptr="*fp32", part_p_ptr="*fp32", B=_I, C=_I, H=_I, W=_I, HR=_I, WR=_I,
                           K=_I, KW=_I, QH=_I, QW=_I, G=_I, stride_b=_I, stride_c=_I, stride_h=_I, stride_w=_I,
                           part_c_plane=_I, part_p_plane=_I, P="constexpr", BLOCK_K="constexpr", BLOCK_J="constexpr")
            configs[f"_stat_fwd_resize_kernel[{xt[1:]},P{p}_K{bk}_J{bj}]"] = (
                "_stat_fwd_resize_kernel", fwd_sig, {"P": p, "BLOCK_K": bk, "BLOCK_J": bj})
            bh, bw, bj = sm.resize_blocks(H, W, p)
            bwd_sig = dict(x_ptr=xt, dx_ptr=xt, cmean_ptr="*fp32", g_cmean_ptr="*fp32", g_cvar_ptr="*fp32",
                           pmean_ptr="*fp32", g_pmean_ptr="*fp32", g_pvar_ptr="*fp32", C=_I, H=_I, W=_I, HR=_I,
                           WR=_I, KW=_I, sx_b=_I, sx_c=_I, sx_h=_I, sx_w=_I, sd_b=_I, sd_c=_I, sd_h=_I, sd_w=_I,
                           inv_count_c="fp32", inv_count_p="fp32", P="constexpr", BLOCK_H="constexpr",
                           BLOCK_W="constexpr", BLOCK_J="constexpr")
            configs[f"_stat_bwd_resize_kernel[{xt[1:]},P{p}_H{bh}_W{bw}_J{bj}]"] = (
                "_stat_bwd_resize_kernel", bwd_sig, {"P": p, "BLOCK_H": bh, "BLOCK_W": bw, "BLOCK_J": bj})
    return configs


AOT_LABELS = [f"{label}@sm{arch}" for label in aot_configs() for arch in AOT_ARCHS]


@pytest.fixture(scope="module")
def aot_results() -> dict[str, PtxasReport]:
    configs = aot_configs()
    requests = [
        AotRequest(getattr(sm, name), sig, ce, arch, sm.NUM_WARPS)
        for name, sig, ce in configs.values()
        for arch in AOT_ARCHS
    ]
    return dict(zip(AOT_LABELS, aot_compile_many(requests)))


@pytest.mark.parametrize("label", AOT_LABELS)
def test_aot_compiles_without_spills(aot_results, label):
    report = aot_results[label]
    print(f"\n{label}: {report.registers} registers, {report.spills} spill bytes, {report.stack_bytes} stack bytes")
    assert report.spills == 0
    assert report.registers <= 128
