"""K1 (fused channel + patch statistics, EMA-SDS matching): every backend vs the float64
reference, gradients, the segment contract, StatMatcher vs the official-style hooks."""
import zlib

import pytest
import torch

from ddfast import StatMatcher, cpu_buffer_cache_mb, models, set_cpu_buffer_cache
from ddfast.backend import use_backend
from ddfast.ops import moment_sums, moments, stat_grad_surrogate
from ddfast.ops import stat_match as sm
from ddfast.reference import stat_match as ref
from ddfast.reference.stat_match_official import OfficialMatcher
from ddfast.testing import assert_close, rel_error

# (B, C, H, W, patch): odd sizes resize to the next multiple of the patch (7 -> 8, 14 -> 16).
SHAPES = [
    (1, 1, 7, 7, 4),
    (2, 3, 14, 14, 4),
    (3, 4, 28, 28, 4),
    (2, 5, 32, 32, 4),
    (2, 3, 32, 32, 16),
    (1, 2, 56, 56, 4),
    (4, 6, 16, 16, None),
    (1, 3, 7, 7, None),
]
# The interpreter runs Triton kernels in Python: keep its shapes small.
TRITON_SHAPES = [(1, 1, 7, 7, 4), (2, 3, 8, 8, 4), (2, 3, 12, 12, 4), (1, 2, 32, 32, 16), (2, 4, 8, 8, None)]
DTYPES = [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)]
LAYOUTS = ["contiguous", "channels_last", "strided"]


def _make(shape, dtype, layout, seed, offset=0.0, scale=1.0):
    b, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    if layout == "strided":  # every other channel of a wider tensor: non-contiguous
        x = torch.randn(b, 2 * c, h, w, generator=gen)[:, ::2]
    else:
        x = torch.randn(b, c, h, w, generator=gen)
    x = (x * scale + offset).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x


def _compare(backend, shape, dtype, tol, layout, seed, offset=0.0, scale=1.0):
    *dims, patch = shape
    x = _make(dims, dtype, layout, seed, offset, scale).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)  # exact copy of the rounded input
    with use_backend(backend):
        out = [o for o in moments(x, patch) if o is not None]
    expected = [o for o in ref.moments(x64, patch) if o is not None]
    for i, (o, e) in enumerate(zip(out, expected)):
        assert o.dtype == torch.float32
        assert_close(o, e, atol=tol * float(e.detach().abs().max()) + 1e-12, rtol=tol, name=f"{backend} statistic {i}")
    gen = torch.Generator().manual_seed(seed + 1)
    cotangents = [torch.randn(e.shape, generator=gen, dtype=torch.float64) for e in expected]
    (dx,) = torch.autograd.grad(out, x, [c.float() for c in cotangents])
    (dx64,) = torch.autograd.grad(expected, x64, cotangents)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    grad_tol = max(tol, 4 * torch.finfo(dtype).eps)
    assert rel_error(dx, dx64) < grad_tol, f"{backend} dx relative error {rel_error(dx, dx64):.3e}"
    assert_close(dx, dx64, atol=grad_tol * float(dx64.abs().max()), rtol=grad_tol, name=f"{backend} dx")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backend_matches_float64_reference(backend, shape, dtype, tol, layout):
    _compare(backend, shape, dtype, tol, layout, seed=zlib.crc32(repr((shape, dtype, layout)).encode()))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype, tol", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_backend_under_interpreter_matches_float64_reference(shape, dtype, tol, layout):
    _compare("triton", shape, dtype, tol, layout, seed=zlib.crc32(repr((shape, dtype, layout)).encode()))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_large_mean_does_not_cancel(backend):
    # Raw Σx² − (Σx)² in fp32 would lose every digit here: mean 1000, spread 0.01.
    shape = (2, 3, 8, 8, 4)
    _compare(backend, shape, torch.float32, 1e-4, "contiguous", seed=5, offset=1000.0, scale=1e-2)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_nan_propagates_to_the_affected_statistics(backend):
    # Documented behaviour: no error; NaN/Inf reach exactly the statistics whose elements hold them.
    x = torch.randn(2, 3, 8, 8)
    x[1, 2, 0, 5] = float("nan")
    with use_backend(backend):
        cm, cv, pm, pv = moments(x, 4)
    assert torch.isnan(cm[2]) and torch.isnan(cv[2]) and torch.isfinite(cm[:2]).all()
    assert torch.isnan(pm[1]) and torch.isnan(pv[1])  # pixel (0, 5) lies in patch row 0, col 1
    assert torch.isfinite(pm[[0, 2, 3]]).all()


@pytest.mark.parametrize("size", [(7, 8), (14, 16), (13, 16), (1, 4), (8, 8), (56, 64)])
def test_bilinear_matrix_is_the_official_resize(size):
    x = torch.randn(2, 3, size[0], size[0] + 1, dtype=torch.float64)
    out = (size[1], ref.patch_multiple(size[0] + 1, 4))
    want = torch.nn.functional.interpolate(x, size=out, mode="bilinear")
    got = torch.einsum("Hh,bchw,Ww->bcHW", ref.bilinear_matrix(size[0], out[0]), x, ref.bilinear_matrix(size[0] + 1, out[1]))
    assert rel_error(got, want) < 1e-15


def test_reference_gradcheck_float64():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    for patch in (None, 4):  # 6 -> resized to 8 for patch 4
        with use_backend("reference"):
            assert torch.autograd.gradcheck(lambda t: tuple(o for o in moments(t, patch) if o is not None), (x,))
        assert torch.autograd.gradcheck(lambda t: tuple(o for o in ref.moments(t, patch) if o is not None), (x,))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_segment_sums_and_surrogate_reproduce_full_batch(backend):
    torch.manual_seed(0)
    x = torch.randn(10, 4, 14, 14, dtype=torch.float64)
    target = [torch.randn(4), torch.rand(4), torch.randn(16), torch.rand(16)]

    def loss_of(stats):
        return sum(torch.linalg.vector_norm(s - t.double()) for s, t in zip(stats, target))

    with use_backend(backend):
        full = x.clone().requires_grad_(True)
        loss_of(moments(full, 4)).backward()
        sums = None
        for seg in x.split(3):
            part = moment_sums(seg, 4)
            sums = part if sums is None else sums.merge(part)
        stats = [s.detach().requires_grad_(True) for s in sums.finalize(torch.float64)]
        grads = torch.autograd.grad(loss_of(stats), stats)
        seg_x = x.clone().requires_grad_(True)
        for seg in seg_x.split(3):
            stat_grad_surrogate(seg, sums, grads, 4).backward()
    assert rel_error(seg_x.grad, full.grad) < 1e-12


def test_moments_trace_under_torch_compile():
    x = torch.randn(4, 8, 16, 16, requires_grad=True)
    compiled = torch.compile(lambda t: sum(s.square().sum() for s in moments(t, 4)), fullgraph=True)
    value = compiled(x)
    (dx,) = torch.autograd.grad(value, x)
    x64 = x.detach().double().requires_grad_(True)
    expected = sum(s.square().sum() for s in ref.moments(x64, 4))
    expected.backward()
    assert rel_error(value, expected) < 1e-5 and rel_error(dx, x64.grad) < 1e-5


@pytest.mark.parametrize("shape", [(8, 32, 32, 32), (32, 64, 14, 14), (100, 128, 7, 7)], ids=str)  # >= 1 MiB: dx from the cache
@pytest.mark.parametrize("cache_mb", [0, 256])
def test_fused_path_allocates_nothing_activation_sized_but_dx(cache_mb, shape):
    # 14 and 7 px need the resize to 16 / 8: its values must stay inside the kernels
    from torch.profiler import ProfilerActivity, profile

    limit, _ = cpu_buffer_cache_mb()
    set_cpu_buffer_cache(cache_mb)
    try:
        x = torch.randn(*shape, requires_grad=True)
        nbytes = x.numel() * x.element_size()
        with use_backend("cpu"), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            stats = moments(x, 4)
            (stats[1].sum() + stats[3].sum()).backward()
        big = [(e.name, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage >= nbytes // 4]
        if cache_mb:
            # dx (1 MiB) comes from ddfast's buffer cache, outside ATen's allocator: nothing else is big
            assert big == [] and x.grad.shape == x.shape
            x.grad = None
            assert cpu_buffer_cache_mb()[1] * 2**20 >= nbytes  # freed dx is kept for reuse
        else:
            # exactly one allocation at least a quarter of x's size: dx itself
            assert len(big) == 1 and big[0][1] == nbytes, big
    finally:
        set_cpu_buffer_cache(limit)


# CPU resize path: planes go through the kernels in blocks of 8 (float accumulation) / 4 (float64),
# one plane per SIMD lane, group remainders of < 4 planes through the per-plane kernels. A plane's
# results must not depend on which planes share its block or on the path that took it.
RESIZE_BLOCK_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _cpu_ext():
    from ddfast.backend import cpu_extension

    ext = cpu_extension()
    # `make test` builds ddfast._C; a missing extension is a broken setup, not a reason to skip the cpu backend
    assert ext is not None, "ddfast._C is not built (run `make setup`)"
    return ext


def _bits(t):
    return t.contiguous().view(torch.int64 if t.element_size() == 8 else torch.int16 if t.element_size() == 2 else torch.int32)


@pytest.mark.parametrize("isa", ["auto", "base"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", RESIZE_BLOCK_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 13, 7, 7, 4), (2, 11, 14, 13, 4), (2, 9, 6, 10, 8)], ids=str)
def test_cpu_resize_plane_results_do_not_depend_on_block_position(shape, dtype, layout, isa, monkeypatch):
    ext = _cpu_ext()
    if isa == "base":
        monkeypatch.setenv("DDFAST_STAT_MATCH_ISA", "base")
    *dims, p = shape
    B, C, H, W = dims
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    x = (torch.randn(*dims, generator=gen, dtype=torch.float64) * 2 + 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    cm, cm2, pm, _ = ext.stat_match_forward(x, p)
    gcm, gcv = torch.randn(C, generator=gen, dtype=torch.float64), torch.randn(C, generator=gen, dtype=torch.float64)
    gpm, gpv = torch.randn(pm.numel(), generator=gen, dtype=torch.float64), torch.randn(pm.numel(), generator=gen, dtype=torch.float64)
    counts = (float(B * H * W), float(B * C * p * p))
    dx = ext.stat_match_backward(x, cm, gcm, gcv, pm, gpm, gpv, p, *counts)
    # Channel windows shift every plane to other lanes / blocks / the per-plane path (1-3 planes).
    for c0, c1 in [(1, C), (3, C - 1), (C - 2, C), (2, 3), (0, 5)]:
        xs = x[:, c0:c1]
        xs = xs.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else xs.contiguous()
        scm, scm2, _, _ = ext.stat_match_forward(xs, p)  # channel statistics are per-plane results merged over b
        assert torch.equal(_bits(scm), _bits(cm[c0:c1])) and torch.equal(_bits(scm2), _bits(cm2[c0:c1])), (c0, c1)
        sdx = ext.stat_match_backward(xs, cm[c0:c1], gcm[c0:c1], gcv[c0:c1], pm, gpm, gpv, p, *counts)
        assert torch.equal(_bits(sdx), _bits(dx[:, c0:c1])), (c0, c1)
    # Every plane a copy of one: block lanes and the per-plane path must give the same tile means.
    one = x[:1, :1].contiguous()
    _, _, pm1, _ = ext.stat_match_forward(one, p)
    for n in (2, 4, 8, 16):  # powers of 2: the final merge's n * mean / n is exact
        _, _, pmn, _ = ext.stat_match_forward(one.expand(1, n, H, W).contiguous(), p)
        assert torch.equal(_bits(pmn), _bits(pm1)), n


# ----------------------------------------------------------------------------- StatMatcher


def _bn_model(dtype=torch.float32):
    torch.manual_seed(0)
    net = models.create("resnet18", 3, 10, 16, width=8).to(dtype)
    net.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            net(torch.randn(16, 3, 16, 16, dtype=dtype) * 2 + 1)
    return net.eval()


# (backbone, width) at 28 px: 28/14/7 px maps, so resized patch statistics are exercised.
OFFICIAL_BACKBONES = [("resnet18", 8), ("mobilenetv2", 8), ("shufflenetv2", 12), ("wrn-16-2", 4), ("convnet", 16)]
# (alpha, drop_rate, match_conv): G-VBSM and SRe2L (BN only, plain L2: alpha 0)
SETTINGS = {"gvbsm": (0.8, 0.4, True), "sre2l": (0.0, 0.0, False)}


def _trained_like(name, width, dtype=torch.float64, size=28):
    torch.manual_seed(0)
    net = models.create(name, 1, 10, size, width=width).to(dtype)
    net.train()
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(2):
            net(torch.randn(16, 1, size, size, dtype=dtype) * 2 + 1)
    return net.eval()


# SRe2L matches BN only: the BN-free convnet is not an SRe2L backbone (resolve_config rejects it)
OFFICIAL_CASES = [(n, w, s) for n, w in OFFICIAL_BACKBONES for s in sorted(SETTINGS) if not (n == "convnet" and s == "sre2l")]


@pytest.mark.parametrize("name, width, setting", OFFICIAL_CASES, ids=[f"{n}-{s}" for n, _, s in OFFICIAL_CASES])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_matcher_equals_official_hooks(backend, name, width, setting):
    alpha, drop_rate, match_conv = SETTINGS[setting]
    net = _trained_like(name, width)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    stats = None
    with use_backend(backend):
        matcher = StatMatcher(net, alpha=alpha, drop_rate=drop_rate, match_bn=has_bn, match_conv=match_conv)
        if match_conv:
            stats = matcher.collect_conv_stats([torch.randn(12, 1, 28, 28, dtype=torch.float64) for _ in range(2)])
    official = OfficialMatcher(net, alpha=alpha, drop_rate=drop_rate, match_bn=has_bn, match_conv=match_conv, conv_stats=stats)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    drops = 0
    for it in range(4):  # EMA state and drops evolve identically
        dropped = matcher.draw(torch.Generator().manual_seed(it))
        assert official.draw(torch.Generator().manual_seed(it)) == dropped
        drops += len(dropped)
        x = x.detach().requires_grad_(True)
        with use_backend(backend):  # both hook sets run in the same forward pass
            net(x)
            ours = matcher.loss()
            theirs = official.loss()
            if not ours.requires_grad:  # a BN-free net with every conv layer dropped
                assert float(ours) == 0.0 == float(theirs) and len(dropped) == len(matcher.layers)
                continue
            (ours_grad,) = torch.autograd.grad(ours, x, retain_graph=True)
        (their_grad,) = torch.autograd.grad(theirs, x)
        assert rel_error(ours, theirs) < 1e-8, f"iteration {it}: loss {float(ours)} vs official {float(theirs)}"
        assert rel_error(ours_grad, their_grad) < 1e-8, f"iteration {it}: input gradient {rel_error(ours_grad, their_grad):.2e}"
        x = x - 0.1 * their_grad / their_grad.norm()
    assert drop_rate == 0 or drops > 0, "the draws dropped no conv layer: the test would not cover drops"
    matcher.remove()
    official.remove()


def test_first_multiplier_weights_the_head_of_one_list():
    net = _trained_like("resnet18", 8)
    names = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
    matcher = StatMatcher(net, first_multiplier=10.0)
    assert [layer.name for layer in matcher.layers] == names
    assert [layer.weight for layer in matcher.layers] == [10.0] + [1.0] * (len(names) - 1)
    assert isinstance(net.get_submodule(names[0]), torch.nn.Conv2d)  # the stem conv, not the first BN
    bn_only = StatMatcher(net, match_conv=False)
    assert bn_only.layers[0].weight == 10.0 and isinstance(bn_only.layers[0].module, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_compat_collection_equals_official_collection(backend):
    net = _trained_like("mobilenetv2", 8)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 1, 28, 28, generator=gen, dtype=torch.float64) + i for i, n in enumerate((16, 16, 5))]
    with use_backend(backend):
        matcher = StatMatcher(net)
        ours = matcher.collect_conv_stats(batches, exact=False)
    matcher.remove()
    theirs = OfficialMatcher(net).collect_conv_stats(batches, data_number=sum(len(b) for b in batches))
    assert ours.keys() == theirs.keys()
    for name in ours:
        for i, (got, want) in enumerate(zip(ours[name], theirs[name])):
            assert rel_error(got.double(), want) < 1e-6, f"{name} statistic {i}"


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_matcher_segments_reproduce_full_batch(dtype, tol):
    net = _bn_model(dtype)
    data = [torch.randn(20, 3, 16, 16, dtype=dtype) for _ in range(2)]
    full = StatMatcher(net, drop_rate=0.5)
    stats = full.collect_conv_stats(data)
    seg = StatMatcher(net, drop_rate=0.5, conv_stats=stats)
    x = torch.randn(12, 3, 16, 16, dtype=dtype)
    for it in range(4):
        seg.mode, full.mode = "off", "full"
        dropped = full.draw(torch.Generator().manual_seed(it))
        assert seg.draw(torch.Generator().manual_seed(it)) == dropped
        xa = x.clone().requires_grad_(True)
        net(xa)
        loss_full = full.loss()
        loss_full.backward()
        full.mode = "off"
        with seg.accumulating():
            for part in x.split(5):
                net(part)
        loss_seg = seg.finish_accumulation()
        xb = x.clone().requires_grad_(True)
        with seg.injecting():
            for part in xb.split(5):
                net(part)
                seg.surrogate_loss().backward()
        assert rel_error(loss_seg, loss_full) < max(tol, 1e-6)
        assert rel_error(xb.grad, xa.grad) < tol
        x = x - 0.05 * xa.grad


def test_collect_exact_vs_official_averaging(tmp_path):
    net = _bn_model(torch.float64)
    data = [torch.randn(n, 3, 16, 16, dtype=torch.float64) + i for i, n in enumerate((5, 9, 2))]
    matcher = StatMatcher(net)
    first_conv = matcher.conv_layers[0].name
    exact = matcher.collect_conv_stats(data, exact=True)[first_conv]
    whole = ref.moments(torch.cat(data), 4)
    for got, want in zip(exact, whole):
        assert rel_error(got, want) < 1e-6
    compat = matcher.collect_conv_stats(data, exact=False)[first_conv]
    per_batch = [ref.moments(d, 4) for d in data]
    for i, got in enumerate(compat):  # the official weights: batch size / total
        assert rel_error(got, sum(len(d) * p[i] for d, p in zip(data, per_batch)) / 16) < 1e-6
    assert rel_error(compat[1], exact[1]) > 1e-3  # averaging per-batch variances drops the between-batch part

    path = tmp_path / "stats.pt"
    matcher.save_conv_stats(path)
    again = StatMatcher(net)
    loaded = again.load_conv_stats(path)
    assert torch.equal(loaded[first_conv].channel_var, matcher.conv_targets[first_conv].channel_var)
    other = _bn_model(torch.float64)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="different model"):
        StatMatcher(other).load_conv_stats(path)


def test_matcher_errors():
    net = _bn_model()
    with pytest.raises(ValueError, match="alpha"):
        StatMatcher(net, alpha=1.0)
    with pytest.raises(ValueError, match="layer_weights names no matched layer"):
        StatMatcher(net, layer_weights={"nope": 2.0})
    matcher = StatMatcher(net)
    with pytest.raises(RuntimeError, match="no global statistics for conv layer"):
        net(torch.randn(2, 3, 16, 16))
    matcher.remove()
    sre2l = StatMatcher(net, match_conv=False, alpha=0.0)  # SRe2L: BN only, no conv statistics needed
    net(torch.randn(2, 3, 16, 16))
    assert float(sre2l.loss()) > 0


def test_matcher_with_every_layer_dropped_gives_zero_loss():
    # A BN-free ConvNet (3 conv layers) drops all of them with probability dr³ per iteration.
    torch.manual_seed(0)
    net = models.create("convnet", 1, 10, 16, width=8).eval()
    matcher = StatMatcher(net, drop_rate=0.5)
    matcher.collect_conv_stats([torch.randn(10, 1, 16, 16)])
    for layer in matcher.conv_layers:
        layer.dropped = True
    x = torch.randn(6, 1, 16, 16, requires_grad=True)
    net(x)
    assert float(matcher.loss()) == 0.0
    with matcher.accumulating():
        net(x.detach())
    assert float(matcher.finish_accumulation()) == 0.0
    with matcher.injecting():
        net(x)
        assert float(matcher.surrogate_loss()) == 0.0
    matcher.draw(torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="no matched layer ran"):
        StatMatcher(models.create("convnet", 1, 10, 16, width=8), drop_rate=0.5).loss()


@pytest.mark.parametrize("patch", [0, 4, 5])
def test_eager_path_equals_the_registered_custom_op(patch):
    """moments() skips torch.library's dispatch in eager mode; the values and gradients must be the custom op's."""
    x = torch.randn(3, 6, 10, 9, dtype=torch.float32)
    weights = [torch.randn(n, dtype=torch.float64) for n in (6, 6, sm._num_patches(x, patch), sm._num_patches(x, patch))]
    grads = []
    for op in (sm.stat_match_forward, sm._EagerStatMatch.apply):
        xi = x.clone().requires_grad_(True)
        out = op(xi, patch)
        sum((o * w).sum() for o, w in zip(out, weights)).backward()
        grads.append((out, xi.grad))
    (out_op, dx_op), (out_eager, dx_eager) = grads
    assert all(torch.equal(a, b) for a, b in zip(out_op, out_eager)) and torch.equal(dx_op, dx_eager)
