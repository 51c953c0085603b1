"""DataDAM's attention loss written statement by statement after the official code
(DataDistillation/DataDAM: utils.py:17-50 ``get_attention``, main_DataDAM.py:238-310 ``error`` with
err_type "MSE_B" and the per-layer loop), the oracle and perf baseline of K2 (specs/d2m-datadam-k2.md §2).

Inputs are the hooks' activations of the real and synthetic batches (class-major, exactly
``batch_real`` / ``ipc`` images per class, as the official reshape needs) and the networks' outputs
(the official ``net(x)[0]``, the flattened embedding). The official `.cpu()` round trips are kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def get_attention(feature_set: torch.Tensor, param: int = 0, exp: float = 4, norm: str = "l2") -> torch.Tensor:
    """utils.py:17-50, the branches DataDAM's main uses (param 0/1, norm 'l2')."""
    if param == 0:
        attention_map = torch.sum(torch.abs(feature_set), dim=1)
    elif param == 1:
        attention_map = torch.sum(torch.abs(feature_set) ** exp, dim=1)
    else:
        raise ValueError(f"param {param} is not used by DataDAM's main")
    if norm != "l2":
        raise ValueError(f"norm {norm!r} is not used by DataDAM's main")
    vectorized_attention_map = attention_map.view(feature_set.size(0), -1)
    return F.normalize(vectorized_attention_map, p=2.0)


def error_mse_b(real: torch.Tensor, syn: torch.Tensor, num_classes: int, batch_real: int, ipc: int) -> torch.Tensor:
    """main_DataDAM.py:254, err_type "MSE_B"."""
    return torch.sum((torch.mean(real.reshape(num_classes, batch_real, -1), dim=1).cpu()
                      - torch.mean(syn.cpu().reshape(num_classes, ipc, -1), dim=1)) ** 2)


def datadam_loss(
    original_model_set_activations: list[torch.Tensor], syn_model_set_activations: list[torch.Tensor],
    output_real: torch.Tensor, output_syn: torch.Tensor, num_classes: int, batch_real: int, ipc: int,
    task_balance: float = 0.01, exp: float = 1,
) -> torch.Tensor:
    """main_DataDAM.py:267-310: 100·MSE_B of every activation's attention but the last, plus
    100·task_balance·MSE_B of the outputs."""
    loss = torch.tensor(0.0, dtype=output_syn.dtype)
    length_of_network = len(original_model_set_activations)
    for layer in range(length_of_network - 1):
        real_attention = get_attention(original_model_set_activations[layer].detach(), param=1, exp=exp, norm="l2")
        syn_attention = get_attention(syn_model_set_activations[layer], param=1, exp=exp, norm="l2")
        tl = 100 * error_mse_b(real_attention, syn_attention, num_classes, batch_real, ipc)
        loss += tl
    output_loss = 100 * task_balance * error_mse_b(output_real, output_syn, num_classes, batch_real, ipc)
    loss += output_loss
    return loss
