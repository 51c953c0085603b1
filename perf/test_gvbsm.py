"""G-VBSM recover iterations, measured side by side in one run.

* speed: seconds per recover iteration over the default backbone pool with ddfast's fused kernels
  vs ``--impl official`` (official-style hooks + official densification loop), and the split
  of that time: network forward/backward (the same iterations with no matching and no
  densification), densification (its op's forward+backward on the recover batch, timed directly)
  and statistic matching (the rest);
* memory: peak extra memory of one recover iteration of ResNet-18 (width 64, batch 100) with
  ``--segment 25`` vs the whole batch.

Weights are freshly initialised (time and memory do not depend on them) and the conv targets are
statistics of random images, so no teacher training is needed; shapes are Fashion-MNIST's.
"""
from __future__ import annotations

import time

import pytest
import torch

from bench import peak_mem_mb, record, time_ms
from ddfast import models
from ddfast.backend import use_backend
from ddfast.distill import build_parser
from ddfast.methods import gvbsm
from ddfast.ops import densify_loss
from ddfast.reference.densify_official import densify_loss_official

CLASSES, IPC, SHAPE = 10, 10, (1, 28, 28)


def _config(*extra: str) -> gvbsm.Config:
    args = build_parser().parse_args(["--method", "gvbsm", "--ipc", str(IPC), "--batch-size", str(CLASSES * IPC), *extra])
    return gvbsm.resolve_config(args, CLASSES)


class _NoMatching:
    """The matcher interface doing nothing: times the bare network inside the same recover loop."""

    mode = "full"

    def reset(self) -> None:
        pass

    def draw(self, generator: torch.Generator | None = None) -> list[str]:
        return []

    def loss(self) -> torch.Tensor:
        return torch.zeros(())


def _pool(config: gvbsm.Config, match: bool = True) -> list[gvbsm.Backbone]:
    torch.manual_seed(0)
    pool = []
    for name, width in config.backbones.items():
        model = models.create(name, SHAPE[0], CLASSES, SHAPE[1:], width=width).eval()
        targets = [torch.randn(200, *SHAPE)]
        if match:
            pool.append(gvbsm.attach(name, model, config, lambda m, t=targets: m.collect_conv_stats(t)))
        else:  # the bare network: no matcher, no hooks
            for p in model.parameters():
                p.requires_grad_(False)
            pool.append(gvbsm.Backbone(name, model, _NoMatching()))
    return pool


def _seconds_per_iteration(pool: list[gvbsm.Backbone], config: gvbsm.Config, rounds: int) -> float:
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    lo, hi = torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 3.0)
    timing = gvbsm.new_timing()
    config.iterations = len(pool)  # warm-up: one iteration per backbone
    gvbsm.recover_batch(pool, labels, SHAPE, lo, hi, config, 0, timing, "warm-up")
    config.iterations = rounds * len(pool)
    start = time.perf_counter()
    gvbsm.recover_batch(pool, labels, SHAPE, lo, hi, config, 1, timing, "timed")
    return (time.perf_counter() - start) / config.iterations


@pytest.mark.parametrize("provider", ["ddfast", "official"])
def test_recover_iteration_split(provider: str) -> None:
    reference = provider == "official"
    extra = ["--impl", "official"] if reference else []
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    x = torch.randn(CLASSES * IPC, *SHAPE, requires_grad=True)
    densify = densify_loss_official if reference else densify_loss

    def densify_step():
        x.grad = None
        densify(x, labels).backward()

    with use_backend("reference" if reference else None):
        bare = _config(*extra, "--dd-weight", "0")
        network = _seconds_per_iteration(_pool(bare, match=False), bare, rounds=2)
        full = _config(*extra)
        total = _seconds_per_iteration(_pool(full), full, rounds=2)
        dd = time_ms(densify_step, warmup=2, reps=10)[0] / 1e3
    split = {"network": network, "stat_match": total - network - dd, "densify": dd}
    shape = f"pool{len(full.backbones)}-b{CLASSES * IPC}-{'x'.join(map(str, SHAPE))}"
    record("gvbsm_recover", provider, "fwd_bwd", shape, "time", "ms", (total * 1e3,) * 3)
    for part, value in split.items():
        record("gvbsm_recover", provider, "fwd_bwd", shape, f"time_{part}", "ms", (value * 1e3,) * 3)
    test_recover_iteration_split.results[provider] = total
    print(
        f"\ngvbsm recover [{provider}] {shape}: {total:.3f} s/iteration = network fwd+bwd {split['network']:.3f} "
        f"+ statistic matching {split['stat_match']:.3f} + densification {split['densify']:.3f}"
    )
    if len(test_recover_iteration_split.results) == 2:
        r = test_recover_iteration_split.results
        print(f"gvbsm recover speed-up: {r['official'] / r['ddfast']:.2f}x vs official-style")


test_recover_iteration_split.results = {}


@pytest.mark.parametrize("provider", ["ddfast", "official"])
def test_recover_iteration_split_per_backbone(provider: str) -> None:
    """The same split for each backbone of the default pool alone: where the matching overhead is."""
    extra = ["--impl", "official"] if provider == "official" else []
    with use_backend("reference" if provider == "official" else None):
        config = _config(*extra, "--dd-weight", "0")  # matching only: densification is timed in the test above
        bare_pool, full_pool = _pool(config, match=False), _pool(config)
        print()
        for plain, hooked in zip(bare_pool, full_pool):
            network = _seconds_per_iteration([plain], config, rounds=4)
            total = _seconds_per_iteration([hooked], config, rounds=4)
            shape = f"{hooked.name}-b{CLASSES * IPC}-{'x'.join(map(str, SHAPE))}"
            record("gvbsm_recover_backbone", provider, "fwd_bwd", shape, "time", "ms", (total * 1e3,) * 3)
            record("gvbsm_recover_backbone", provider, "fwd_bwd", shape, "time_network", "ms", (network * 1e3,) * 3)
            print(f"gvbsm recover [{provider}] {shape}: {total * 1e3:.1f} ms/iteration = network fwd+bwd {network * 1e3:.1f} "
                  f"+ statistic matching {(total - network) * 1e3:.1f} ({(total - network) / network:+.0%})")


def test_segment_bounds_recover_memory() -> None:
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    lo, hi = torch.full((1, 1, 1), -1.0), torch.full((1, 1, 1), 3.0)
    peaks = {}
    for segment in (0, 25):
        config = _config("--backbones", "resnet18:64", "--segment", str(segment), "--iterations", "1")
        pool = _pool(config)
        timing = gvbsm.new_timing()
        gvbsm.recover_batch(pool, labels, SHAPE, lo, hi, config, 0, timing, "warm-up")
        peaks[segment] = peak_mem_mb(lambda: gvbsm.recover_batch(pool, labels, SHAPE, lo, hi, config, 0, timing, "measured"))
        record("gvbsm_recover", "ddfast", "fwd_bwd", f"resnet18w64-b100-seg{segment or 'off'}", "peak_mem", "MB", (peaks[segment],) * 3)
    ratio = peaks[25] / peaks[0]
    print(f"\ngvbsm recover ResNet-18 w64 batch 100: peak {peaks[0]:.0f} MB whole batch, {peaks[25]:.0f} MB with --segment 25 ({ratio:.0%})")
    assert ratio <= 0.5, f"--segment 25 should at most halve the recover peak, got {ratio:.0%}"


def test_paper_preset_iteration_time() -> None:
    # The --preset paper pool at its standard widths: the basis of the time estimate in the README.
    config = _config("--preset", "paper")
    iterations = config.iterations  # the preset's; the measurement overwrites config.iterations
    with use_backend(None):
        seconds = _seconds_per_iteration(_pool(config), config, rounds=1)
    record("gvbsm_recover", "ddfast", "fwd_bwd", f"paper-pool-b{CLASSES * IPC}-{'x'.join(map(str, SHAPE))}", "time", "ms", (seconds * 1e3,) * 3)
    print(f"\ngvbsm recover, paper pool: {seconds:.3f} s/iteration -> {seconds * iterations / 60:.0f} min per batch of {CLASSES * IPC}")
