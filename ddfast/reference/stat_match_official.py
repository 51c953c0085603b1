"""Statistic matching written statement by statement after the official G-VBSM code
(``Branch_CIFAR_10/recover/utils.py``: ``BNFeatureHook``, ``ConvFeatureHook``; the recover loop's
``rescale`` list in ``data_synthesis_with_svd_with_db_with_all_statistic.py``), and SRe2L's BN hook
(``SRe2LBNFeatureHook``).

Kept as the test oracle of :class:`ddfast.StatMatcher` and as the "official" perf baseline. What is
kept from the official code, on purpose:

* forward hooks on the module *input*; statistics with ``permute(...).contiguous()`` + ``var``;
* a conv layer's channel mean/var come from its input itself, only the patch mean/var from the
  bilinearly resized copy (``F.interpolate`` to the next multiple of 4, einops' ``(u h) (v w)``
  patch layout, written here with reshape/permute);
* the EMA starts from the float ``0.``: the official ``isinstance(self.dd_var, int)`` test never
  fires, so the first update is ``(1 − α)·s`` for BN and conv hooks alike;
* a dropped conv hook sets ``r_feature = 0`` and does not update its EMA;
* one list of hooks per backbone in ``named_modules()`` order (BN and conv interleaved) whose first
  entry alone is multiplied by ``first_multiplier``.

What differs: the official drop test ``random.random() > 1 − drop_rate`` runs inside each hook; here
:meth:`OfficialMatcher.draw` makes the same Bernoulli(drop_rate) draw per conv layer from a seeded
generator before the forward (the draw order equals :meth:`ddfast.StatMatcher.draw`'s), and the
conv targets come from :meth:`ConvFeatureHook.collect` / the caller instead of an ``.npz`` file.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def div_four_mul(v: int) -> int:
    """The official helper (hard-wired to 4): the next multiple of 4."""
    v = int(v)
    m = v % 4
    return int(v // 4 * 4) + int(m > 0) * 4


def _patch_rows(x: torch.Tensor, p: int) -> torch.Tensor:
    """einops ``"b c (u h) (v w) -> (u v) (b c h w)"`` with h = w = p."""
    b, c, hh, ww = x.shape
    return x.reshape(b, c, hh // p, p, ww // p, p).permute(2, 4, 0, 1, 3, 5).contiguous().reshape((hh // p) * (ww // p), -1)


class SRe2LBNFeatureHook:
    """SRe2L's hook (VILA-Lab/SRe2L ``SRe2L/recover/utils.py:92-104``), statement by statement: the batch statistics
    against the BN running statistics, no EMA."""

    def __init__(self, module: nn.BatchNorm2d) -> None:
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nch = input[0].shape[1]
        mean = input[0].mean([0, 2, 3])
        var = input[0].permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)

    def close(self) -> None:
        self.hook.remove()


class BNFeatureHook:
    def __init__(self, module: nn.BatchNorm2d, training_momentum: float = 0.8) -> None:
        self.hook = module.register_forward_hook(self.hook_fn)
        self.dd_var = 0.
        self.dd_mean = 0.
        self.momentum = training_momentum
        self.r_feature: torch.Tensor | float = 0.
        self.enabled = True

    def hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.enabled:
            return
        nch = input[0].shape[1]
        input_0 = input[0]
        mean = input_0.mean([0, 2, 3])
        var = (input_0.permute(1, 0, 2, 3).contiguous().reshape([nch, -1])).var(1, unbiased=False)

        with torch.no_grad():
            if isinstance(self.dd_var, int):  # never true: dd_var starts as the float 0.
                self.dd_var = var
                self.dd_mean = mean
            else:
                self.dd_var = self.momentum * self.dd_var + (1 - self.momentum) * var
                self.dd_mean = self.momentum * self.dd_mean + (1 - self.momentum) * mean

        r_feature = torch.norm(module.running_var.data - (self.dd_var + var - var.detach()), 2) + \
            torch.norm(module.running_mean.data - (self.dd_mean + mean - mean.detach()), 2)
        self.r_feature = r_feature

    def reset(self) -> None:
        self.dd_var, self.dd_mean = 0., 0.

    def close(self) -> None:
        self.hook.remove()


class ConvFeatureHook:
    """``targets``: (running_dd_mean, running_dd_var, running_patch_mean, running_patch_var)."""

    def __init__(self, module: nn.Conv2d, targets: tuple[torch.Tensor, ...] | None = None,
                 training_momentum: float = 0.8, patch_size: int = 4) -> None:
        if patch_size != 4:
            raise ValueError("the official ConvFeatureHook is hard-wired to 4x4 patches (div_four_mul, einops h=4 w=4)")
        self.module = module
        self.hook = module.register_forward_hook(self.post_hook_fn)
        self.dd_var = 0.
        self.dd_mean = 0.
        self.patch_var = 0.
        self.patch_mean = 0.
        self.momentum = training_momentum
        self.dropped = False
        self.enabled = True
        self.r_feature: torch.Tensor | float = 0.
        if targets is not None:
            self.running_dd_mean, self.running_dd_var, self.running_patch_mean, self.running_patch_var = targets

    def set_hook(self, pre: bool = True) -> None:
        """pre=True: the statistics-collection hook (``pre_hook_fn``); False: the matching hook."""
        self.hook.remove()
        self.hook = self.module.register_forward_hook(self.pre_hook_fn if pre else self.post_hook_fn)

    def start_collection(self, data_number: int) -> None:
        self.data_number = data_number
        self.running_dd_var = 0.
        self.running_dd_mean = 0.
        self.running_patch_var = 0.
        self.running_patch_mean = 0.
        self.set_hook(pre=True)

    @torch.no_grad()
    def pre_hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nch = input[0].shape[1]
        bs = input[0].shape[0]
        input_0 = input[0]
        dd_mean = input_0.mean([0, 2, 3])
        dd_var = (input_0.permute(1, 0, 2, 3).contiguous().reshape([nch, -1])).var(1, unbiased=False)
        new_h, new_w = div_four_mul(input_0.shape[2]), div_four_mul(input_0.shape[3])
        new_input_0 = F.interpolate(input_0, [new_h, new_w], mode="bilinear")
        new_input_0 = _patch_rows(new_input_0, 4)
        patch_mean = new_input_0.mean([1])
        patch_var = new_input_0.var([1], unbiased=False)
        self.running_dd_var += (dd_var * bs / self.data_number)
        self.running_dd_mean += (dd_mean * bs / self.data_number)
        self.running_patch_var += (patch_var * bs / self.data_number)
        self.running_patch_mean += (patch_mean * bs / self.data_number)

    def post_hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.enabled:
            return
        if self.dropped:  # official: random.random() > (1. - self.drop_rate), drawn in the hook
            self.r_feature = torch.zeros(1, dtype=input[0].dtype, device=input[0].device)
            return
        nch = input[0].shape[1]
        input_0 = input[0]
        dd_mean = input_0.mean([0, 2, 3])
        dd_var = (input_0.permute(1, 0, 2, 3).contiguous().reshape([nch, -1])).var(1, unbiased=False)
        new_h, new_w = div_four_mul(input_0.shape[2]), div_four_mul(input_0.shape[3])
        new_input_0 = F.interpolate(input_0, [new_h, new_w], mode="bilinear")
        new_input_0 = _patch_rows(new_input_0, 4)
        patch_mean = new_input_0.mean([1])
        patch_var = new_input_0.var([1], unbiased=False)

        with torch.no_grad():
            if isinstance(self.dd_var, int):  # never true: the EMA starts from the float 0.
                self.dd_var = dd_var
                self.dd_mean = dd_mean
                self.patch_var = patch_var
                self.patch_mean = patch_mean
            else:
                self.dd_var = self.momentum * self.dd_var + (1 - self.momentum) * dd_var
                self.dd_mean = self.momentum * self.dd_mean + (1 - self.momentum) * dd_mean
                self.patch_var = self.momentum * self.patch_var + (1 - self.momentum) * patch_var
                self.patch_mean = self.momentum * self.patch_mean + (1 - self.momentum) * patch_mean
        r_feature = torch.norm(self.running_dd_var - (self.dd_var + dd_var - dd_var.detach()), 2) + \
            torch.norm(self.running_dd_mean - (self.dd_mean + dd_mean - dd_mean.detach()), 2) + \
            torch.norm(self.running_patch_mean - (self.patch_mean + patch_mean - patch_mean.detach()), 2) + \
            torch.norm(self.running_patch_var - (self.patch_var + patch_var - patch_var.detach()), 2)

        self.r_feature = r_feature

    def reset(self) -> None:
        self.dd_var, self.dd_mean, self.patch_var, self.patch_mean = 0., 0., 0., 0.

    def close(self) -> None:
        self.hook.remove()


class OfficialMatcher:
    """The official hooks of one backbone behind :class:`ddfast.StatMatcher`'s interface
    (``reset``, ``draw``, ``loss``, ``mode`` = "full" / "off", ``collect_conv_stats``, ``remove``),
    so a recover loop runs either with the same code.

    ``conv_stats``: {conv module name: (mean, var, patch mean, patch var)} targets of the conv hooks.
    """

    def __init__(self, model: nn.Module, alpha: float = 0.8, drop_rate: float = 0.4, first_multiplier: float = 10.0,
                 match_bn: bool = True, match_conv: bool = True, conv_stats: dict | None = None, patch_size: int = 4) -> None:
        self.model, self.drop_rate, self.first_multiplier = model, drop_rate, first_multiplier
        self.hooks: list[BNFeatureHook | ConvFeatureHook] = []
        self.conv_names: list[str] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.BatchNorm2d) and match_bn:
                self.hooks.append(BNFeatureHook(module, training_momentum=alpha))
            elif isinstance(module, nn.Conv2d) and match_conv:
                targets = None if conv_stats is None else tuple(conv_stats[name])
                self.hooks.append(ConvFeatureHook(module, targets, training_momentum=alpha, patch_size=patch_size))
                self.conv_names.append(name)
        if not self.hooks:
            raise ValueError("the model has no BatchNorm2d or Conv2d layer to match")
        self._mode = "full"

    @property
    def conv_hooks(self) -> list[ConvFeatureHook]:
        return [h for h in self.hooks if isinstance(h, ConvFeatureHook)]

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("full", "off"):
            raise ValueError(f"the official-style matcher runs in 'full' or 'off' mode, not {value!r}")
        self._mode = value
        for hook in self.hooks:
            hook.enabled = value == "full"

    def reset(self) -> None:
        for hook in self.hooks:
            hook.reset()

    def draw(self, generator: torch.Generator | None = None) -> list[str]:
        for hook in self.conv_hooks:
            hook.dropped = bool(torch.rand((), generator=generator) < self.drop_rate) if self.drop_rate > 0 else False
        return [n for n, h in zip(self.conv_names, self.conv_hooks) if h.dropped]

    def loss(self) -> torch.Tensor:
        # The official recover: rescale = [first_multiplier] + [1.] * (len - 1) over the whole list.
        rescale = [self.first_multiplier] + [1. for _ in range(len(self.hooks) - 1)]
        total = sum(mod.r_feature * rescale[idx] for (idx, mod) in enumerate(self.hooks))
        return torch.as_tensor(total).reshape(())

    @torch.no_grad()
    def collect_conv_stats(self, batches, data_number: int) -> dict[str, tuple[torch.Tensor, ...]]:
        """The official collection: every batch's moments weighted bs / data_number, summed."""
        for hook in self.conv_hooks:
            hook.start_collection(data_number)
        for x in batches:
            self.model(x)
        stats = {}
        for name, hook in zip(self.conv_names, self.conv_hooks):
            hook.set_hook(pre=False)
            stats[name] = (hook.running_dd_mean, hook.running_dd_var, hook.running_patch_mean, hook.running_patch_var)
        return stats

    def remove(self) -> None:
        for hook in self.hooks:
            hook.close()
