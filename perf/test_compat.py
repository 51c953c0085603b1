"""ddfast.compat swapped into the official recover loops: one recover iteration (forward, CE + Σ r_feature, backward
to the images) with the official hooks, with ddfast.compat's (one import line changed), and with the official hooks
under torch.compile. Shapes: ResNet-18 (BN, width 64) on a batch of 100 Fashion-MNIST-sized images, as a user's
SRe2L / G-VBSM script would run them on this machine.

``pytest perf/test_compat.py -s``; rows in perf/results/latest.csv (kernel "compat_recover").
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench import record, time_ms
from ddfast import models
from ddfast.compat import gvbsm as compat_gvbsm
from ddfast.compat import sre2l as compat_sre2l
from ddfast.reference import stat_match_official as official

BATCH, SHAPE, WIDTH = 100, (1, 28, 28), 64


def _model():
    torch.manual_seed(0)
    return models.create("resnet18", SHAPE[0], 10, SHAPE[1:], width=WIDTH).eval()


def _hooks(model, family, provider, tmp_path):
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if family == "sre2l":
        cls = compat_sre2l.BNFeatureHook if provider == "ddfast" else official.SRe2LBNFeatureHook
        return [cls(m) for m in bns]
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append((compat_gvbsm if provider == "ddfast" else official).BNFeatureHook(m))
        elif isinstance(m, nn.Conv2d):
            if provider == "ddfast":
                hook = compat_gvbsm.ConvFeatureHook(m, save_path=str(tmp_path), data_number=BATCH, name=name, drop_rate=0.0)
                hook.set_hook(pre=True)
            else:
                hook = official.ConvFeatureHook(m)
                hook.start_collection(BATCH)
            hooks.append(hook)
    with torch.no_grad():
        model(torch.randn(BATCH, *SHAPE))  # the conv statistics the loop matches
    for hook in hooks:
        if hasattr(hook, "set_hook"):
            hook.set_hook(pre=False)
    return hooks


@pytest.mark.parametrize("family", ["sre2l", "gvbsm"])
def test_swapped_in_recover_iteration(family, tmp_path):
    x = torch.randn(BATCH, *SHAPE, requires_grad=True)
    y = torch.arange(BATCH) % 10
    times = {}
    for provider in ("official", "official+compile", "ddfast"):
        model = _model()
        hooks = _hooks(model, family, provider.split("+")[0], tmp_path / provider)
        net = torch.compile(model) if provider.endswith("compile") else model

        def step():
            x.grad = None
            loss = F.cross_entropy(net(x), y) + 0.01 * sum(h.r_feature for h in hooks)
            loss.backward()

        times[provider] = time_ms(step, warmup=3, reps=10)
        record("compat_recover", provider, "fwd_bwd", f"{family}-resnet18w{WIDTH}-b{BATCH}", "time", "ms", times[provider])
    print(f"\n{family}: ddfast.compat {times['ddfast'][0]:.1f} ms, official hooks {times['official'][0]:.1f} ms "
          f"(×{times['official'][0] / times['ddfast'][0]:.2f}), official + torch.compile {times['official+compile'][0]:.1f} ms "
          f"(×{times['official+compile'][0] / times['ddfast'][0]:.2f})")
