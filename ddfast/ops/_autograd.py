"""Helpers shared by the ops' registered backward formulas."""
from __future__ import annotations

import torch
from torch import Tensor


def scale_by_cotangent(grad: Tensor, g_loss: Tensor) -> Tensor:
    """grad · g_loss for a scalar loss's cotangent; the precomputed gradient itself, uncopied, when
    loss.backward() passes a real CPU 1 (not a tracing fake), the common case in the methods' loops."""
    if type(g_loss) is torch.Tensor and g_loss.device.type == "cpu" and not g_loss.requires_grad and float(g_loss) == 1.0:
        return grad
    return grad * g_loss.to(grad.dtype)
