"""K1 benchmark: one layer's statistic-matching loss (channel + patch, EMA-SDS), forward+backward.

Providers, side by side in one run: ``ddfast`` (fused op, default backend for the device),
``official`` (the G-VBSM hook math: permute+contiguous+var per statistic), ``torch_compile``
(torch.compile of the reference). Also: bytes moved vs the floor (x read twice, dx written once)
and achieved GB/s against the measured copy bandwidth. The 14/7 px shapes need the official
bilinear resize to a multiple of the patch for their patch statistics: ddfast forms the resized
values inside the kernels, the official hook calls ``F.interpolate``.
"""
import pytest
import torch

from bench import copy_bandwidth_gbs, peak_mem_mb, record, time_ms
from ddfast.ops import moments
from ddfast.reference import stat_match as ref
from ddfast.reference.stat_match_official import ConvFeatureHook

SHAPES = [(100, 128, 32, 32), (100, 128, 16, 16), (100, 64, 28, 28), (40, 64, 56, 56),
          (100, 64, 14, 14), (100, 128, 7, 7), (100, 144, 7, 7)]
RESIZED = [s for s in SHAPES if s[2] % 4 or s[3] % 4]
PATCH = 4
ALPHA = 0.8
_rows: dict = {}


def _targets(x):
    with torch.no_grad():
        return [t + 0.1 for t in ref.moments(x.float(), PATCH)]


def _ddfast_step(x, targets, ema):
    stats = moments(x, PATCH)
    loss = 0.0
    for i, (s, g) in enumerate(zip(stats, targets)):
        ema[i] = ref.ema_update(ema[i], s, ALPHA)
        loss = loss + ref.sds_norm(g, ema[i], s)
    loss.backward()
    return loss


def _reference_loss(x, targets, ema):
    stats = ref.moments(x, PATCH)
    return sum(ref.sds_norm(g, e, s) for s, g, e in zip(stats, targets, ema))


class _Layer(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_stat_match_fwd_bwd(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape).requires_grad_(True)
    targets = _targets(x)
    shape_str = "[" + ",".join(map(str, shape)) + "]"
    results = {}

    ema = [None] * 4
    results["ddfast"] = lambda: _ddfast_step(x, targets, ema)

    layer = torch.nn.Conv2d(shape[1], 1, 1)  # the official hook watches a conv's input
    hook = ConvFeatureHook(layer, tuple(targets), training_momentum=ALPHA, patch_size=PATCH)

    def official():
        hook.post_hook_fn(layer, (x,), None)
        hook.r_feature.backward()
        return hook.r_feature

    results["official"] = official

    ema_c = [t.detach().clone() for t in targets]
    compiled = torch.compile(_reference_loss)

    def compiled_step():
        loss = compiled(x, targets, ema_c)
        loss.backward()
        return loss

    results["torch_compile"] = compiled_step

    timings = {}
    for provider, fn in results.items():
        def step(fn=fn):
            x.grad = None
            return fn()

        timings[provider] = time_ms(step, warmup=3, reps=15)
        record("stat_match", provider, "fwd_bwd", shape_str, "time", "ms", timings[provider])
        x.grad = None
        mem = peak_mem_mb(step)
        record("stat_match", provider, "fwd_bwd", shape_str, "peak_mem", "MB", (mem, mem, mem))
        timings[provider + "_mem"] = mem
    hook.close()

    nbytes = x.numel() * x.element_size()
    floor = 3 * nbytes  # forward reads x, backward reads x and writes dx
    achieved = floor / (timings["ddfast"][0] * 1e-3) / 1e9
    copy = copy_bandwidth_gbs(nbytes)
    record("stat_match", "ddfast", "fwd_bwd", shape_str, "bandwidth", "GB/s", (achieved, achieved, achieved))
    vs_official = timings["official"][0] / timings["ddfast"][0]
    vs_compile = timings["torch_compile"][0] / timings["ddfast"][0]
    print(
        f"\nstat_match {shape_str}: ddfast {timings['ddfast'][0]:.2f} ms ({timings['ddfast_mem']:.0f} MB), "
        f"official {timings['official'][0]:.2f} ms ({timings['official_mem']:.0f} MB), "
        f"torch.compile {timings['torch_compile'][0]:.2f} ms ({timings['torch_compile_mem']:.0f} MB) | "
        f"speed-up {vs_official:.1f}x vs official, {vs_compile:.1f}x vs compile | "
        f"{achieved:.1f} GB/s on the {floor / 1e6:.0f} MB floor = {achieved / copy:.0%} of copy ({copy:.1f} GB/s)"
    )
    assert vs_official > 1.0, "the fused path should never be slower than the official hook math"
    if shape in RESIZED:  # the bar for the resize-fused shapes
        assert vs_official >= 5.0, f"only {vs_official:.1f}x the official hook on a resized shape"
        assert vs_compile >= 2.0, f"only {vs_compile:.1f}x torch.compile on a resized shape"
