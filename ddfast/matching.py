"""Class-mean matching of a network's activations between a real and a synthetic batch (DataDAM, D2M).

A randomly initialised ConvNet sees a real batch (no grad) and a synthetic batch; the loss compares,
per class present on both sides, the mean attention map of blocks 1..D−1 (kernel K2,
``ddfast.ops.attention_match``), the mean final embedding and, for D2M, the mean logits (KL at
temperature T, the "prediction matching" L_PM):

    L = Σ_l w_a Σ_k ‖m^R_k(â_l) − m^S_k(â_l)‖² + w_e Σ_k ‖m^R_k(e) − m^S_k(e)‖²
        + λ Σ_k KL(σ(m^R_k(o)/T) ‖ σ(m^S_k(o)/T))

:func:`match_loss` is the whole-batch form (K2 for the first two terms, autograd through the network).
:func:`segmented_backward` is the exact two-pass form behind ``--segment S``: pass 1 runs the synthetic
images through the network S at a time without a graph and accumulates the class sums (K2's
``attention_class_sums`` for the attention maps); pass 2 re-runs each segment with a graph and
back-propagates ⟨â_n, ∂L/∂â_n⟩ (K2's ``attention_grad_surrogate``) + ⟨e_n, ∂L/∂e_n⟩ + ⟨o_n, ∂L/∂o_n⟩ with
the per-class derivatives fixed by pass 1, which is the gradient of L itself because L depends on every
synthetic sample only through the class means. Memory is then ∝ S (plus the inputs); the network must
not couple samples (instance norm, not batch norm in train mode).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast.ops.attention_match import attention_class_sums, attention_grad_surrogate, attention_match

Tensor = torch.Tensor


@dataclasses.dataclass(frozen=True)
class MatchConfig:
    power: float = 1.0  # p of the attention map Σ|f|^p
    mode: str = "spatial"  # spatial: Σ over channels; channel: Σ over positions
    layer_weight: float = 100.0  # w_a of every attention layer (DataDAM main:306)
    emb_weight: float = 1.0  # w_e of the final embedding (100 · task_balance 0.01, DataDAM main:310)
    pm_weight: float = 0.0  # λ of the prediction matching term (D2M: 100; DataDAM: none)
    temperature: float = 4.0  # T of the prediction matching term


@dataclasses.dataclass
class Outputs:
    acts: list[Tensor]  # activation outputs of every block (pre-pooling), the last one included
    emb: Tensor  # flattened final features (the classifier's input)
    logits: Tensor


def network_outputs(net: nn.Module, x: Tensor) -> Outputs:
    """Run a ``ddfast.models`` ConvNet (``features`` -> flatten -> ``classifier``) and keep the output of
    every activation module: DataDAM's ReLU hooks (main:170-177) without hooks or clones."""
    acts = []
    h = x
    for layer in net.features:
        h = layer(h)
        if isinstance(layer, (nn.ReLU, nn.LeakyReLU, nn.Sigmoid)):
            acts.append(h)
    emb = h.flatten(1)
    return Outputs(acts, emb, net.classifier(emb))


def class_sums(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """(per-class sums [K, D] of the rows of x, counts [K]) in x's dtype."""
    counts = torch.bincount(labels.long(), minlength=num_classes).to(x.dtype)
    return x.new_zeros(num_classes, x.shape[1]).index_add_(0, labels.long(), x), counts


def _class_means(x: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    sums, counts = class_sums(x, labels, num_classes)
    return sums / counts.clamp_min(1).unsqueeze(1), counts


def _prediction_term(real_logits: Tensor, syn_logits: Tensor, real_labels: Tensor, syn_labels: Tensor, num_classes: int,
                     temperature: float) -> Tensor:
    """Σ_k KL(σ(m^R_k/T) ‖ σ(m^S_k/T)) over the classes present on both sides (real side constant)."""
    mr, nr = _class_means(real_logits.detach().double(), real_labels, num_classes)
    ms, ns = _class_means(syn_logits.double(), syn_labels, num_classes)
    both = (nr > 0) & (ns > 0)
    log_p = F.log_softmax(mr[both] / temperature, dim=1)
    log_q = F.log_softmax(ms[both] / temperature, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum()


def match_loss(real: Outputs, syn: Outputs, real_labels: Tensor, syn_labels: Tensor, num_classes: int, cfg: MatchConfig) -> Tensor:
    """The whole-batch loss (differentiable w.r.t. the synthetic side)."""
    layers = len(real.acts) - 1  # the last block enters through the embedding only
    loss = attention_match(real.acts[:layers], syn.acts[:layers], real_labels, syn_labels, cfg.power, cfg.mode,
                           [cfg.layer_weight] * layers, real.emb, syn.emb, cfg.emb_weight)
    if cfg.pm_weight:
        term = _prediction_term(real.logits, syn.logits, real_labels, syn_labels, num_classes, cfg.temperature)
        loss = loss + cfg.pm_weight * term.to(loss.dtype)
    return loss


@dataclasses.dataclass
class _ClassSums:
    att: list[Tensor]  # per layer [K, M] sums of â
    emb: Tensor  # [K, D]
    logits: Tensor  # [K, classes]
    counts: Tensor  # [K]

    @classmethod
    def of(cls, out: Outputs, labels: Tensor, num_classes: int, cfg: MatchConfig) -> _ClassSums:
        layers = len(out.acts) - 1
        att = attention_class_sums(out.acts[:layers], labels, num_classes, cfg.power, cfg.mode)
        emb, counts = class_sums(out.emb.double(), labels, num_classes)
        return cls(att, emb, class_sums(out.logits.double(), labels, num_classes)[0], counts)

    def add(self, other: _ClassSums) -> None:
        self.att = [a + b for a, b in zip(self.att, other.att)]
        self.emb, self.logits, self.counts = self.emb + other.emb, self.logits + other.logits, self.counts + other.counts


def _segment_sums(net: nn.Module, x: Tensor, labels: Tensor, num_classes: int, cfg: MatchConfig, segment: int) -> _ClassSums:
    total = None
    with torch.no_grad():
        for start in range(0, x.shape[0], segment):
            part = _ClassSums.of(network_outputs(net, x[start:start + segment]), labels[start:start + segment], num_classes, cfg)
            if total is None:
                total = part
            else:
                total.add(part)
    return total


def segmented_backward(net: nn.Module, real_x: Tensor, real_labels: Tensor, syn_x: Tensor, syn_labels: Tensor, num_classes: int,
                       cfg: MatchConfig, segment: int) -> tuple[float, Tensor]:
    """(L, ∂L/∂syn_x) with at most ``segment`` images per network forward (both sides)."""
    real = _segment_sums(net, real_x, real_labels, num_classes, cfg, segment)
    syn = _segment_sums(net, syn_x.detach(), syn_labels, num_classes, cfg, segment)
    both = ((real.counts > 0) & (syn.counts > 0)).double().unsqueeze(1)
    inv_r, inv_s = 1 / real.counts.clamp_min(1).unsqueeze(1), 1 / syn.counts.clamp_min(1).unsqueeze(1)
    loss = torch.zeros((), dtype=torch.float64)
    # dL/d(sample statistic) of a synthetic sample of class k: u_k = dL/dm^S_k / n^S_k
    u_att = []
    for sr, ss in zip(real.att, syn.att):
        diff = (ss * inv_s - sr * inv_r) * both
        loss = loss + cfg.layer_weight * diff.square().sum()
        u_att.append(2 * cfg.layer_weight * diff * inv_s)
    diff = (syn.emb * inv_s - real.emb * inv_r) * both
    loss = loss + cfg.emb_weight * diff.square().sum()
    u_emb = 2 * cfg.emb_weight * diff * inv_s
    u_logits = torch.zeros_like(syn.logits)
    if cfg.pm_weight:
        t = cfg.temperature
        mask = both.squeeze(1) > 0
        log_p = F.log_softmax(real.logits[mask] * inv_r[mask] / t, dim=1)
        log_q = F.log_softmax(syn.logits[mask] * inv_s[mask] / t, dim=1)
        loss = loss + cfg.pm_weight * (log_p.exp() * (log_p - log_q)).sum()
        u_logits[mask] = cfg.pm_weight / t * (log_q.exp() - log_p.exp()) * inv_s[mask]
    leaf = syn_x.detach().requires_grad_(True)
    ys = syn_labels.long()
    for start in range(0, leaf.shape[0], segment):
        y = ys[start:start + segment]
        out = network_outputs(net, leaf[start:start + segment])
        surrogate = attention_grad_surrogate(out.acts[:len(u_att)], y, u_att, cfg.power, cfg.mode)
        surrogate = surrogate + (out.emb.double() * u_emb[y]).sum() + (out.logits.double() * u_logits[y]).sum()
        surrogate.backward()
    return float(loss), leaf.grad
