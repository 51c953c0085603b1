"""G-VBSM's ``BNFeatureHook`` and ``ConvFeatureHook`` (shaoshitong/G_VBSM_Dataset_Condensation
``Branch_CIFAR_10/recover/utils.py:103-230``) on K1, with the official semantics kept on purpose: the EMA of the
batch statistics starts from the float 0 (the official ``isinstance(self.dd_var, int)`` never fires), the EMA value
enters r_feature with the current batch's gradient (``ema + s − s.detach()``), a conv hook is dropped with
``random.random() > 1 − drop_rate`` inside the hook, and the conv statistics are collected into and read from
``<save_path>/ConvFeatureHook/<name>/running.npz``. The 4×4 patches of a layer whose side is not a multiple of 4 are
those of its input bilinearly resized to the next multiple, as ``F.interpolate`` + einops do there.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.nn as nn

from ddfast.ops import moments

PATCH = 4  # the official div_four_mul and einops h=4, w=4


def _ema(old: torch.Tensor | float, new: torch.Tensor, momentum: float) -> torch.Tensor:
    return momentum * old + (1 - momentum) * new


def _surrogate(ema: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """The EMA's value with the batch statistic's gradient (official ``ema + s − s.detach()``)."""
    return ema + batch - batch.detach()


class BNFeatureHook:
    def __init__(self, module: nn.BatchNorm2d, training_momentum: float = 0.8) -> None:
        self.hook = module.register_forward_hook(self.hook_fn)
        self.dd_var: torch.Tensor | float = 0.
        self.dd_mean: torch.Tensor | float = 0.
        self.momentum = training_momentum

    def hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        m = moments(input[0], dtype=input[0].dtype)
        with torch.no_grad():
            self.dd_var = _ema(self.dd_var, m.channel_var, self.momentum)
            self.dd_mean = _ema(self.dd_mean, m.channel_mean, self.momentum)
        self.r_feature = torch.norm(module.running_var.data - _surrogate(self.dd_var, m.channel_var), 2) + \
            torch.norm(module.running_mean.data - _surrogate(self.dd_mean, m.channel_mean), 2)

    def close(self) -> None:
        self.hook.remove()


class ConvFeatureHook:
    STATS = ("running_dd_var", "running_dd_mean", "running_patch_var", "running_patch_mean")

    def __init__(self, module: nn.Conv2d | None = None, save_path: str = "./", data_number: int = 50000, name: str | None = None,
                 gpu: int = 0, training_momentum: float = 0.8, drop_rate: float = 0.4) -> None:
        if module is None or name is None:
            raise ModuleNotFoundError("module and name can not be None!")
        self.module = module
        self.hook = module.register_forward_hook(self.post_hook_fn)
        self.data_number = data_number
        self.dd_var: torch.Tensor | float = 0.
        self.dd_mean: torch.Tensor | float = 0.
        self.patch_var: torch.Tensor | float = 0.
        self.patch_mean: torch.Tensor | float = 0.
        self.momentum = training_momentum
        self.drop_rate = drop_rate
        os.makedirs(os.path.join(save_path, "ConvFeatureHook", name), exist_ok=True)
        self.save_path = os.path.join(save_path, "ConvFeatureHook", name, "running.npz")
        self.load_tag = os.path.exists(self.save_path)
        device = torch.device(f"cuda:{gpu}") if torch.cuda.is_available() else torch.device("cpu")
        for key in self.STATS:
            setattr(self, key, torch.from_numpy(np.load(self.save_path)[key]).to(device) if self.load_tag else 0.)

    def save(self) -> None:
        np.savez(self.save_path, **{k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k in self.STATS
                                    for v in [getattr(self, k)]})

    def set_hook(self, pre: bool = True) -> None:
        self.close()
        self.hook = self.module.register_forward_hook(self.pre_hook_fn if pre else self.post_hook_fn)

    @torch.no_grad()
    def pre_hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        m = moments(input[0], PATCH, dtype=input[0].dtype)
        w = input[0].shape[0] / self.data_number
        self.running_dd_var += m.channel_var * w
        self.running_dd_mean += m.channel_mean * w
        self.running_patch_var += m.patch_var * w
        self.running_patch_mean += m.patch_mean * w

    def post_hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if random.random() > (1. - self.drop_rate):
            self.r_feature = torch.tensor([0.], device=input[0].device)
            return
        m = moments(input[0], PATCH, dtype=input[0].dtype)
        with torch.no_grad():
            self.dd_var = _ema(self.dd_var, m.channel_var, self.momentum)
            self.dd_mean = _ema(self.dd_mean, m.channel_mean, self.momentum)
            self.patch_var = _ema(self.patch_var, m.patch_var, self.momentum)
            self.patch_mean = _ema(self.patch_mean, m.patch_mean, self.momentum)
        self.r_feature = torch.norm(self.running_dd_var - _surrogate(self.dd_var, m.channel_var), 2) + \
            torch.norm(self.running_dd_mean - _surrogate(self.dd_mean, m.channel_mean), 2) + \
            torch.norm(self.running_patch_mean - _surrogate(self.patch_mean, m.patch_mean), 2) + \
            torch.norm(self.running_patch_var - _surrogate(self.patch_var, m.patch_var), 2)

    def close(self) -> None:
        self.hook.remove()
