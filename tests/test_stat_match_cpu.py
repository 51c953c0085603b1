"""K1 (fused channel + patch statistics) C++ CPU backend vs a float64 PyTorch formulation."""
import zlib

import pytest
import torch
import torch.nn.functional as F

import ddfast._C as _C


def ref_stats(x, p):
    """float64 reference: (cmean, cm2, pmean, pm2) of x (already holding the values to compare)."""
    xd = x.double()
    B, C, H, W = xd.shape
    cmean = xd.mean(dim=(0, 2, 3))
    cm2 = ((xd - cmean.view(1, C, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    if p == 0:
        e = xd.new_empty(0)
        return cmean, cm2, e, e
    K = (H // p) * (W // p)
    xp = xd.reshape(B, C, H // p, p, W // p, p).permute(2, 4, 0, 1, 3, 5).reshape(K, -1)
    pmean = xp.mean(dim=1)
    pm2 = ((xp - pmean[:, None]) ** 2).sum(dim=1)
    return cmean, cm2, pmean, pm2


def ref_dx(x, cmean, g_cmean, g_cvar, pmean, g_pmean, g_pvar, p, count_c, count_p):
    xd = x.double()
    B, C, H, W = xd.shape
    cm = cmean.double().view(1, C, 1, 1)
    dx = g_cmean.double().view(1, C, 1, 1) / count_c + g_cvar.double().view(1, C, 1, 1) * 2 * (xd - cm) / count_c
    if p > 0:
        def expand(v):  # [K] -> [H, W]
            return v.double().view(H // p, W // p).repeat_interleave(p, 0).repeat_interleave(p, 1)
        dx = dx + expand(g_pmean) / count_p + expand(g_pvar) * 2 * (xd - expand(pmean)) / count_p
    return dx


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


DT = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [  # (B, C, H, W, p)
    (1, 1, 4, 4, 4), (2, 3, 8, 8, 4), (3, 5, 28, 28, 4), (2, 16, 32, 32, 4), (2, 8, 32, 32, 16),
    (1, 4, 64, 64, 16), (2, 8, 56, 56, 4), (2, 3, 32, 32, 0), (4, 16, 8, 8, 0), (1, 1, 4, 4, 0),
    (2, 6, 12, 8, 2), (2, 4, 8, 8, 1), (2, 3, 8, 8, 8),
]


def make(shape, dtype, layout, gen, mean=0.5, spread=1.0):
    B, C, H, W, _ = shape
    if layout == "noncontig":
        x = mean + spread * torch.randn(B, C + 1, H, W + 3, generator=gen, dtype=torch.float64)
        x = x[:, 1:, :, 2:W + 2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = mean + spread * torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("layout", ["nchw", "cl", "noncontig"])
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(shape, dtype, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype), layout)).encode()))
    p = shape[4]
    x = make(shape, dtype, layout, gen)
    cmean, cm2, pmean, pm2 = _C.stat_match_forward(x, p)
    r = ref_stats(x, p)  # x.double() of the rounded input
    for got, want in zip((cmean, cm2, pmean, pm2), r):
        assert got.dtype == torch.float64  # statistics leave the kernel in float64 for every input dtype
        assert got.shape == want.shape
        if want.numel():
            assert rel(got, want) <= 1e-5
    B, C, H, W, _ = shape
    K = pmean.numel()
    g = lambda n: torch.randn(n, generator=gen, dtype=torch.float64)  # noqa: E731
    gcm, gcv, gpm, gpv = g(C), g(C), g(K), g(K)
    count_c, count_p = 3.0 * B * H * W, 2.0 * B * C * max(p, 1) ** 2  # "global" counts != local
    dx = _C.stat_match_backward(x, cmean, gcm, gcv, pmean, gpm, gpv, p, count_c, count_p)
    want = ref_dx(x, cmean, gcm, gcv, pmean, gpm, gpv, p, count_c, count_p)
    assert dx.dtype == dtype and dx.shape == x.shape
    if layout == "cl":
        assert dx.is_contiguous(memory_format=torch.channels_last)
    else:
        assert dx.is_contiguous()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel(dx, want) <= tol
    if dtype in (torch.float16, torch.bfloat16):  # within one rounding of the exact value
        assert ((dx.double() - want).abs() <= want.abs() * 2 * torch.finfo(dtype).eps + 1e-7).all()


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 8, 32, 32, 4), (3, 5, 28, 28, 4), (2, 4, 16, 16, 0)])
def test_large_mean(shape, layout):
    gen = torch.Generator().manual_seed(1)
    x = make(shape, torch.float32, layout, gen, mean=1000.0, spread=1e-2)
    got = _C.stat_match_forward(x, shape[4])
    want = ref_stats(x, shape[4])
    for a, b in zip(got, want):
        if b.numel():
            assert rel(a, b) <= 1e-5
    # backward with large mean: x - mean differences must not cancel
    B, C, H, W, p = shape
    K = got[2].numel()
    gcm, gcv, gpm, gpv = torch.zeros(C), torch.randn(C, generator=gen), torch.zeros(K), torch.randn(K, generator=gen)
    dx = _C.stat_match_backward(x, got[0], gcm, gcv, got[2], gpm, gpv, p, B * H * W, B * C * max(p, 1) ** 2)
    want = ref_dx(x, got[0], gcm, gcv, got[2], gpm, gpv, p, B * H * W, B * C * max(p, 1) ** 2)
    assert rel(dx, want) <= 1e-5


def test_structured_constant_patches():
    # constant patches with a huge value: patch M2 must be (near) exactly zero, not rounding noise
    x = torch.zeros(4, 8, 16, 16)
    x[:, :, :4, :4] = 1000.0
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        cmean, cm2, pmean, pm2 = _C.stat_match_forward(xx, 4)
        assert pm2[0].item() == 0.0 and pmean[0].item() == 1000.0
        assert (pm2 == 0).all()
        r = ref_stats(xx, 4)
        assert rel(cm2, r[1]) <= 1e-6


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_nan_propagates(layout):
    x = torch.randn(2, 4, 8, 8)
    x[1, 2, 5, 6] = float("nan")  # channel 2, patch k = (5//4)*2 + 6//4 = 3
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    cmean, cm2, pmean, pm2 = _C.stat_match_forward(x, 4)
    assert torch.isnan(cmean[2]) and torch.isnan(cm2[2])
    assert torch.isfinite(cmean[[0, 1, 3]]).all() and torch.isfinite(cm2[[0, 1, 3]]).all()
    assert torch.isnan(pmean[3]) and torch.isnan(pm2[3])
    assert torch.isfinite(pmean[:3]).all() and torch.isfinite(pm2[:3]).all()
    x[0, 0, 0, 0] = float("inf")
    _C.stat_match_forward(x, 4)  # must not crash
    dx = _C.stat_match_backward(x, cmean, torch.ones(4), torch.ones(4), pmean, torch.ones(4), torch.ones(4), 4, 128.0, 128.0)
    assert dx.shape == x.shape


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("size", [(16, 16), (14, 13)], ids=["plain", "resized"])
def test_deterministic_across_thread_counts(layout, size):
    x = torch.randn(8, 32, *size) + 3.0
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    K = 16  # 4x4 patches, after the resize to 16x16 for 14x13
    g = [torch.randn(n, dtype=torch.float64) for n in (32, 32, K, K)]
    old = torch.get_num_threads()
    try:
        runs = []
        for nt in (1, 2, 3, 1):
            torch.set_num_threads(nt)
            f = _C.stat_match_forward(x, 4)
            runs.append(list(f) + [_C.stat_match_backward(x, f[0], g[0], g[1], f[2], g[2], g[3], 4, 1e3, 1e3)])
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert torch.equal(u, v)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 16, 28, 28, 4), (2, 24, 32, 32, 16), (3, 5, 12, 12, 0), (2, 3, 8, 8, 2)])
def test_baseline_isa_matches(shape, dtype, layout, monkeypatch):
    """The kernels are compiled for the baseline ISA and for AVX2; the baseline copy is only
    taken on CPUs without AVX2, so force it here and compare with the float64 reference."""
    gen = torch.Generator().manual_seed(7)
    x = make(shape, dtype, layout, gen, mean=5.0)
    p = shape[4]
    auto = _C.stat_match_forward(x, p)
    monkeypatch.setenv("DDFAST_STAT_MATCH_ISA", "base")
    base = _C.stat_match_forward(x, p)
    for a, b, want in zip(auto, base, ref_stats(x, p)):
        if want.numel():
            assert rel(b, want) <= 1e-5 and rel(a, want) <= 1e-5
    B, C, H, W, _ = shape
    K = auto[2].numel()
    g = [torch.randn(n, generator=gen) for n in (C, C, K, K)]
    dx = _C.stat_match_backward(x, auto[0], g[0], g[1], auto[2], g[2], g[3], p, 1e3, 1e3)
    monkeypatch.delenv("DDFAST_STAT_MATCH_ISA")
    dx_auto = _C.stat_match_backward(x, auto[0], g[0], g[1], auto[2], g[2], g[3], p, 1e3, 1e3)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    want = ref_dx(x, auto[0], g[0], g[1], auto[2], g[2], g[3], p, 1e3, 1e3)
    assert rel(dx, want) <= tol and rel(dx_auto, want) <= tol


def test_errors():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="4-D"):
        _C.stat_match_forward(torch.randn(3, 8, 8), 4)
    with pytest.raises(RuntimeError, match="float"):
        _C.stat_match_forward(torch.ones(2, 3, 8, 8, dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="patch must be >= 0"):
        _C.stat_match_forward(x, -1)
    c, k = torch.zeros(3), torch.zeros(4)
    with pytest.raises(RuntimeError, match="g_cvar must have 3 entries"):
        _C.stat_match_backward(x, c, c, torch.zeros(2), k, k, k, 4, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="pmean must have 4 entries"):
        _C.stat_match_backward(x, c, c, c, torch.zeros(5), k, k, 4, 1.0, 1.0)
    x86 = torch.randn(2, 3, 8, 6)  # W resized to 8: K = 2 * 2, not (8 // 4) * (6 // 4)
    with pytest.raises(RuntimeError, match="pmean must have 4 entries"):
        _C.stat_match_backward(x86, c, c, c, torch.zeros(2), k, k, 4, 1.0, 1.0)
    e = torch.zeros(0)
    dx = _C.stat_match_backward(x, c, c, c, e, e, e, 0, 1.0, 0.0)  # patch 0: patch vectors unused
    assert dx.shape == x.shape


# ---- patch not dividing H or W: patch statistics of the bilinear resize (F.interpolate) --------
RESIZE_SHAPES = [  # (B, C, H, W, p)
    (1, 3, 7, 7, 4), (2, 3, 14, 13, 4), (2, 4, 1, 7, 4), (3, 5, 14, 14, 4), (2, 6, 9, 16, 4),
    (2, 3, 12, 10, 8), (2, 4, 6, 5, 2), (1, 2, 5, 5, 3), (2, 3, 14, 14, 16),
]


def resized(xd, p):
    """x' as F.interpolate computes it (float64); x itself along a dimension that needs no resize."""
    H, W = xd.shape[-2:]
    size = (-(-H // p) * p, -(-W // p) * p)
    return F.interpolate(xd, size=size, mode="bilinear", align_corners=False)


def ref_stats_resize(x, p):
    xd = x.double()
    cmean, cm2, _, _ = ref_stats(xd, 0)
    _, _, pmean, pm2 = ref_stats(resized(xd, p), p)
    return cmean, cm2, pmean, pm2


def ref_dx_resize(x, cmean, g_cmean, g_cvar, pmean, g_pmean, g_pvar, p, count_c, count_p):
    """Channel term on x; patch term on x' pulled back through F.interpolate's own backward."""
    xd = x.double().requires_grad_(True)
    xr = resized(xd, p)
    dxr = ref_dx(xr.detach(), pmean.new_zeros(xr.shape[1]), pmean.new_zeros(xr.shape[1]),
                 pmean.new_zeros(xr.shape[1]), pmean, g_pmean, g_pvar, p, 1.0, count_p)
    (back,) = torch.autograd.grad(xr, xd, dxr)
    return ref_dx(x, cmean, g_cmean, g_cvar, None, None, None, 0, count_c, 1.0) + back


def run_resize(x, p, gen, count_scale=(3.0, 2.0)):
    got = _C.stat_match_forward(x, p)
    B, C, H, W = x.shape
    K = got[2].numel()
    g = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (C, C, K, K)]
    counts = (count_scale[0] * B * H * W, count_scale[1] * B * C * p * p)  # "global" counts != local
    dx = _C.stat_match_backward(x, got[0], g[0], g[1], got[2], g[2], g[3], p, *counts)
    return got, dx, (got[0], g[0], g[1], got[2], g[2], g[3], p, *counts)


@pytest.mark.parametrize("layout", ["nchw", "cl", "noncontig"])
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("shape", RESIZE_SHAPES)
def test_resize_forward_backward(shape, dtype, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("resize", shape, str(dtype), layout)).encode()))
    p = shape[4]
    x = make(shape, dtype, layout, gen)
    got, dx, args = run_resize(x, p, gen)
    B, C, H, W, _ = shape
    K = (-(-H // p)) * (-(-W // p))
    for a, want in zip(got, ref_stats_resize(x, p)):
        assert a.dtype == torch.float64 and a.shape == want.shape
        assert rel(a, want) <= (1e-12 if dtype == torch.float64 else 1e-5)
    assert got[2].shape == (K,)
    want = ref_dx_resize(x, *args)
    assert dx.dtype == dtype and dx.shape == x.shape
    if layout == "cl":
        assert dx.is_contiguous(memory_format=torch.channels_last)
    else:
        assert dx.is_contiguous()
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel(dx, want) <= tol


@pytest.mark.parametrize("shape", [(3, 5, 14, 13, 4), (2, 16, 7, 7, 4)])
def test_resize_layouts_and_batch_position_agree(shape):
    """Planes are the units in both layouts: NCHW and channels_last give the same statistics bit for
    bit, and a sample's dx does not depend on where it sits in the batch (the --segment contract)."""
    gen = torch.Generator().manual_seed(3)
    p = shape[4]
    x = make(shape, torch.float32, "nchw", gen, mean=2.0)
    got, dx, args = run_resize(x, p, gen)
    xc = x.contiguous(memory_format=torch.channels_last)
    for a, b in zip(got, _C.stat_match_forward(xc, p)):
        assert torch.equal(a, b)
    assert torch.equal(_C.stat_match_backward(xc, *args), dx)
    seg = _C.stat_match_backward(x[1:2].clone(), *args)  # same vectors and global counts
    assert torch.equal(seg, dx[1:2])


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 8, 7, 7, 4), (2, 9, 12, 7, 4), (2, 3, 6, 5, 2), (1, 5, 40, 36, 32),
                                   (2, 3, 17, 16, 16), (3, 4, 9, 9, 8)], ids=str)
def test_resize_tiles_far_from_the_plane_mean(shape, dtype, layout):
    """The block kernel takes each x' tile's statistics in one pass shifted by the tile's first value:
    tiles whose means sit far apart (a staircase over the x' tiles, on a large mean) with a small spread
    within most tiles, for every tile size it is built for, H resized or not."""
    B, C, H, W, p = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("stairs", shape, str(dtype), layout)).encode()))

    def cell(n):  # x' tile row / column an input row / column mostly feeds
        return ((torch.arange(n, dtype=torch.float64) + 0.5) * (-(-n // p) * p) / n // p)

    stairs = 50.0 * cell(H).view(H, 1) - 30.0 * cell(W)
    x = 1000.0 + stairs + 1e-2 * torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    x = x.to(dtype)
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    got, dx, args = run_resize(x, p, gen)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, want in zip(got, ref_stats_resize(x, p)):
        assert rel(a, want) <= tol
    assert rel(dx, ref_dx_resize(x, *args)) <= tol


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 8, 7, 7, 4), (3, 5, 14, 13, 4)])
def test_resize_large_mean(shape, layout):
    gen = torch.Generator().manual_seed(11)
    p = shape[4]
    x = make(shape, torch.float32, layout, gen, mean=1000.0, spread=1e-2)
    got, dx, args = run_resize(x, p, gen)
    for a, want in zip(got, ref_stats_resize(x, p)):
        assert rel(a, want) <= 1e-5
    assert rel(dx, ref_dx_resize(x, *args)) <= 1e-5


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_resize_nan_reaches_the_patches_its_taps_feed(layout):
    x = torch.randn(2, 4, 7, 7)
    x[1, 2, 1, 5] = float("nan")
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    cmean, cm2, pmean, pm2 = _C.stat_match_forward(x, 4)
    want = ref_stats_resize(x, 4)  # F.interpolate: NaN in every x' pixel with a tap on it
    assert torch.isnan(cmean[2]) and torch.isnan(cm2[2]) and torch.isfinite(cmean[[0, 1, 3]]).all()
    assert torch.equal(torch.isnan(pmean), torch.isnan(want[2])) and torch.equal(torch.isnan(pm2), torch.isnan(want[3]))
    assert torch.isnan(pmean).any() and not torch.isnan(pmean).all()
    ok = torch.isfinite(want[2])
    assert rel(pmean[ok], want[2][ok]) <= 1e-5 and rel(pm2[ok], want[3][ok]) <= 1e-5
    dx = _C.stat_match_backward(x, cmean, torch.ones(4), torch.ones(4), pmean, torch.ones(4), torch.ones(4), 4, 98.0, 128.0)
    assert dx.shape == x.shape


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 16, 14, 14, 4), (2, 5, 7, 7, 4), (2, 3, 12, 10, 8)])
def test_resize_baseline_isa_matches(shape, dtype, layout, monkeypatch):
    gen = torch.Generator().manual_seed(7)
    p = shape[4]
    x = make(shape, dtype, layout, gen, mean=5.0)
    got, dx_auto, args = run_resize(x, p, gen)
    monkeypatch.setenv("DDFAST_STAT_MATCH_ISA", "base")
    base = _C.stat_match_forward(x, p)
    dx_base = _C.stat_match_backward(x, *args)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for a, b, want in zip(got, base, ref_stats_resize(x, p)):
        assert rel(a, want) <= max(tol, 1e-5) and rel(b, want) <= max(tol, 1e-5)
    want = ref_dx_resize(x, *args)
    assert rel(dx_auto, want) <= tol and rel(dx_base, want) <= tol
