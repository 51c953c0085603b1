"""Official-style K3 (G-VBSM data densification), written the way the G-VBSM code does it: a
Python loop over the classes of the batch, one Gram matrix per class, and the general
non-symmetric ``torch.linalg.eigvals`` (real part) on each. Perf baseline and a second oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def densify_loss_official(images: torch.Tensor, labels: torch.Tensor, tau: float = 4.0, pool: int = 32) -> torch.Tensor:
    x = F.adaptive_avg_pool2d(images, (pool, pool))
    x = x.reshape(x.shape[0], -1)
    loss = images.new_zeros(())
    for label in torch.unique(labels):
        xc = x[labels == label]
        gram = xc @ xc.T
        eig = torch.linalg.eigvals(gram).real
        loss = loss + F.kl_div(F.log_softmax(eig, dim=0), F.softmax(eig / tau, dim=0).detach(), reduction="sum")
    return loss
