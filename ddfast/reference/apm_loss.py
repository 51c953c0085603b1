"""K4 reference: APM's image-update loss head (specs/apm.md §1.1, §3) in plain PyTorch.

z is [K+1, n, C] logits of n synthetic images: z[0] from the teacher T, z[1:] from the K student
checkpoints S_k. With r_kic = S_kic − T_ic, d_ki = Σ_c |r_kic| and CE_i = logsumexp_c T_ic − T_{i,y_i}:

    loss = (1/B) Σ_i [ Σ_k φ(d_ki) + α·CE_i ]
    φ(d) = −d/C            (``log=False``, the official code: −l1_loss(s, t), a mean over C)
    φ(d) = −log(d + ε)     (``log=True``, the paper's eq. 4)

B is the global batch (``batch_size``), so segments of one batch add up to the whole-batch loss.
:func:`apm_loss` is the autograd oracle (float64 when z is float64); :func:`apm_loss_and_grad` is the
closed form every backend implements, with g_ki = φ'(d_ki) (−1/C or −1/(d_ki + ε)):

    ∂/∂S_kic = g_ki·sgn(r_kic)/B                       (sgn(0) = 0, as torch's l1_loss backward)
    ∂/∂T_ic  = [−Σ_k g_ki·sgn(r_kic) + α·(softmax(T_i)_c − 1[c = y_i])]/B
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def compute_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def check_inputs(z: Tensor, labels: Tensor, batch_size: float, alpha: float, eps: float) -> None:
    if z.ndim != 3 or not z.is_floating_point():
        raise ValueError(f"apm_loss expects floating logits [K+1, n, C], got {z.dtype} {tuple(z.shape)}")
    if z.shape[0] < 2:
        raise ValueError(f"apm_loss needs the teacher and at least one checkpoint (K+1 >= 2), got {z.shape[0]}")
    if labels.ndim != 1 or labels.shape[0] != z.shape[1] or labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be an integer vector of length n = {z.shape[1]}, got {labels.dtype} {tuple(labels.shape)}")
    if not batch_size > 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if alpha < 0 or eps < 0:
        raise ValueError(f"alpha and eps must be >= 0, got alpha={alpha}, eps={eps}")


def check_label_range(labels: Tensor, num_classes: int) -> None:
    """Value check (data-dependent, so it runs inside the op, never while tracing)."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")


def apm_loss(z: Tensor, labels: Tensor, batch_size: float | None = None, alpha: float = 0.1, log: bool = False, eps: float = 1e-8) -> Tensor:
    """The loss by autograd-able torch ops (the oracle the fused backends are tested against)."""
    zf = z.to(compute_dtype(z))
    teacher, students = zf[0], zf[1:]
    d = (students - teacher).abs().sum(dim=2)  # [K, n]
    phi = -torch.log(d + eps) if log else -d / z.shape[2]
    ce = torch.nn.functional.cross_entropy(teacher, labels.long(), reduction="sum") if z.shape[1] else zf.new_zeros(())
    return (phi.sum() + alpha * ce) / (batch_size or max(z.shape[1], 1))


def apm_loss_and_grad(z: Tensor, labels: Tensor, inv_batch: float, alpha: float, log: bool, eps: float) -> tuple[Tensor, Tensor]:
    """Closed form: (loss in the compute dtype, dloss/dz in z's dtype)."""
    zf = z.to(compute_dtype(z))
    teacher, students = zf[0], zf[1:]
    num_classes = z.shape[2]
    r = students - teacher
    d = r.abs().sum(dim=2)
    if log:
        phi, g = -torch.log(d + eps), -1.0 / (d + eps)
    else:
        phi, g = -d / num_classes, torch.full_like(d, -1.0 / num_classes)
    logp = torch.log_softmax(teacher, dim=1)
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).to(zf.dtype)
    ce = -(logp * onehot).sum()
    loss = (phi.sum() + alpha * ce) * inv_batch
    d_students = g.unsqueeze(2) * torch.sign(r)
    d_teacher = -d_students.sum(dim=0) + alpha * (logp.exp() - onehot)
    grad = torch.cat([d_teacher.unsqueeze(0), d_students]) * inv_batch
    return loss, grad.to(z.dtype)
