"""SRe2L's ``BNFeatureHook`` (VILA-Lab/SRe2L ``SRe2L/recover/utils.py:92-104``) on K1.

r_feature = ‖running_var − var‖₂ + ‖running_mean − mean‖₂ of the BN layer's input batch (population variance).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ddfast.ops import moments


class BNFeatureHook:
    def __init__(self, module: nn.BatchNorm2d) -> None:
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        m = moments(input[0], dtype=input[0].dtype)
        self.r_feature = torch.norm(module.running_var.data - m.channel_var, 2) + torch.norm(module.running_mean.data - m.channel_mean, 2)

    def close(self) -> None:
        self.hook.remove()
