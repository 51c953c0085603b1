"""Statistic matching written the way the official G-VBSM / SRe2L code writes it: forward hooks,
``permute(...).contiguous()`` copies and ``var`` per statistic, EMA started from zero.

Kept as the perf baseline ("official" provider in ``pytest perf/``) and as a test oracle for
:class:`ddfast.StatMatcher` (which, with ``ema_init="zero"``, must give the same loss and gradients).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class OfficialBNHook:
    """SRe2L's BNFeatureHook with G-VBSM's EMA ("SDS") form."""

    def __init__(self, module: nn.BatchNorm2d, momentum: float = 0.0) -> None:
        self.hook = module.register_forward_hook(self.hook_fn)
        self.momentum = momentum
        self.total_mean: torch.Tensor | float = 0.0
        self.total_var: torch.Tensor | float = 0.0
        self.r_feature: torch.Tensor | float = 0.0
        self.dropped = False

    def hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        self.total_mean = self.momentum * self.total_mean + (1 - self.momentum) * mean.detach()
        self.total_var = self.momentum * self.total_var + (1 - self.momentum) * var.detach()
        self.r_feature = torch.norm(module.running_mean.data - (self.total_mean + mean - mean.detach()), 2) + torch.norm(
            module.running_var.data - (self.total_var + var - var.detach()), 2
        )

    def reset(self) -> None:
        self.total_mean, self.total_var = 0.0, 0.0

    def remove(self) -> None:
        self.hook.remove()


class OfficialConvHook:
    """G-VBSM's ConvFeatureHook: channel and patch statistics of a conv input, EMA-SDS loss."""

    def __init__(self, module: nn.Conv2d, targets: tuple[torch.Tensor, ...], patch_size: int = 4, momentum: float = 0.0) -> None:
        self.hook = module.register_forward_hook(self.hook_fn)
        self.targets = targets  # (channel mean, channel var, patch mean, patch var)
        self.patch_size = patch_size
        self.momentum = momentum
        self.totals: list[torch.Tensor | float] = [0.0, 0.0, 0.0, 0.0]
        self.r_feature: torch.Tensor | float = 0.0
        self.dropped = False

    def hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if self.dropped:
            self.r_feature = 0.0
            return
        x = input[0]
        n, c, h, w = x.shape
        p = self.patch_size
        if h % p != 0 or w % p != 0:
            x = F.interpolate(x, size=(math.ceil(h / p) * p, math.ceil(w / p) * p), mode="bilinear")
            n, c, h, w = x.shape
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape([c, -1]).var(1, unbiased=False)
        patches = x.reshape(n, c, h // p, p, w // p, p).permute(2, 4, 0, 1, 3, 5).contiguous().reshape(h // p * w // p, -1)
        patch_mean = patches.mean(1)
        patch_var = patches.var(1, unbiased=False)
        loss = 0.0
        for i, stat in enumerate((mean, var, patch_mean, patch_var)):
            self.totals[i] = self.momentum * self.totals[i] + (1 - self.momentum) * stat.detach()
            loss = loss + torch.norm(self.targets[i] - (self.totals[i] + stat - stat.detach()), 2)
        self.r_feature = loss

    def reset(self) -> None:
        self.totals = [0.0, 0.0, 0.0, 0.0]

    def remove(self) -> None:
        self.hook.remove()


def official_loss(bn_hooks: list[OfficialBNHook], conv_hooks: list[OfficialConvHook], first_multiplier: float = 10.0) -> torch.Tensor:
    """Σ rescale·r_feature over BN hooks plus the same over conv hooks; the first of each ×first_multiplier."""
    total = 0.0
    for hooks in (bn_hooks, conv_hooks):
        rescale = [first_multiplier] + [1.0] * (len(hooks) - 1)
        total = total + sum(mod.r_feature * rescale[i] for i, mod in enumerate(hooks))
    return total
