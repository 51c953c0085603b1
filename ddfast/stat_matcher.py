"""``StatMatcher``: G-VBSM's generalized statistic matching (and SRe2L's BN matching) for any model.

Attaches forward pre-hooks to the model's ``BatchNorm2d`` layers (targets: running statistics) and
``Conv2d`` layers (targets: global statistics collected over a dataset), computes each layer's
input statistics with the fused K1 op and the EMA-SDS loss ‖g − (e + s − sg(s))‖₂ per statistic.

Full batch::

    matcher.draw(gen)                # choose this iteration's dropped conv layers
    logits = model(x)
    loss = ce + r * matcher.loss()

Segments (exact, DESIGN §5)::

    matcher.draw(gen)
    with matcher.accumulating():     # pass 1, no grad: global batch statistics
        for seg in segments: model(seg)
    value = matcher.finish_accumulation()   # loss value; ∂ℓ/∂statistics kept
    with matcher.injecting():        # pass 2: closed-form dx injected per segment
        for seg in segments:
            (ce_seg + r * matcher.surrogate_loss()).backward() after model(seg)
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ddfast.ops.stat_match import Moments, MomentSums, moment_sums, moments, stat_grad_surrogate
from ddfast.reference.stat_match import ema_update, sds_norm
from ddfast.utils import atomic_torch_save

_MODES = ("full", "accumulate", "inject", "collect", "off")


def model_key(model: nn.Module) -> str:
    """Identifies a model's architecture and weights (keys cached statistics)."""
    digest = hashlib.sha256(repr(getattr(model, "ddfast_config", type(model).__name__)).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


class _Layer:
    def __init__(self, name: str, module: nn.Module, kind: str, weight: float) -> None:
        self.name, self.module, self.kind, self.weight = name, module, kind, weight
        self.ema: list[torch.Tensor | None] = [None, None, None, None]
        self.loss: torch.Tensor | None = None
        self.dropped = False
        self.sums: MomentSums | None = None
        self.grads: tuple[torch.Tensor | None, ...] | None = None
        self.surrogates: list[torch.Tensor] = []


class StatMatcher:
    """Statistic matching on the inputs of a model's BN and conv layers.

    Args:
        model: any ``nn.Module`` (put it in eval mode so BN uses its running statistics).
        patch_size: patch size of the conv patch statistics (4 for ≤64 px data, 16 for ImageNet).
        alpha: EMA factor of the SDS form (0.8 small datasets, 0.4 ImageNet; 0 = plain SRe2L).
        drop_rate: probability that a conv layer's matching is dropped in an iteration (:meth:`draw`).
        first_multiplier: weight of the first matched layer in ``named_modules()`` order, BN or conv
            (10; the official recover's ``rescale`` list: a ResNet's stem conv, the first BN when
            only BN layers are matched).
        layer_weights: optional per-layer weights by module name (default 1).
        match_bn / match_conv: which layer kinds to match (SRe2L: BN only).
        conv_stats: global conv statistics {name: Moments}, from :meth:`collect_conv_stats` or :meth:`load_conv_stats`.
        ema_init: "zero" starts each EMA from 0 as the official code does (default: its
            ``isinstance(self.dd_var, int)`` test never fires on the float 0.); "first" starts it
            from the first batch statistic (unbiased).
    """

    def __init__(
        self,
        model: nn.Module,
        patch_size: int = 4,
        alpha: float = 0.8,
        drop_rate: float = 0.4,
        first_multiplier: float = 10.0,
        layer_weights: dict[str, float] | None = None,
        match_bn: bool = True,
        match_conv: bool = True,
        conv_stats: dict[str, Moments] | None = None,
        ema_init: str = "zero",
    ) -> None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"alpha must be in [0, 1), got {alpha}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if ema_init not in ("first", "zero"):
            raise ValueError(f"ema_init must be 'first' or 'zero', got {ema_init!r}")
        self.model, self.patch_size, self.alpha, self.drop_rate = model, patch_size, alpha, drop_rate
        self.ema_init = ema_init
        layer_weights = dict(layer_weights or {})
        self.layers: list[_Layer] = []
        for name, module in model.named_modules():
            kind = "bn" if isinstance(module, nn.BatchNorm2d) and match_bn else "conv" if isinstance(module, nn.Conv2d) and match_conv else None
            if kind is None:
                continue
            if kind == "bn" and (module.running_mean is None or module.running_var is None):
                raise ValueError(f"BatchNorm layer {name!r} tracks no running statistics to match")
            weight = layer_weights.pop(name, 1.0) * (first_multiplier if not self.layers else 1.0)
            self.layers.append(_Layer(name, module, kind, weight))
        if layer_weights:
            raise ValueError(f"layer_weights names no matched layer: {sorted(layer_weights)}")
        if not self.layers:
            raise ValueError("the model has no BatchNorm2d or Conv2d layer to match")
        self.conv_targets: dict[str, Moments] = {}
        if conv_stats is not None:
            self.set_conv_stats(conv_stats)
        self.mode = "full"
        self._collect_sums: dict[str, list[MomentSums]] = {}
        self._handles = [layer.module.register_forward_pre_hook(self._hook(layer)) for layer in self.layers]

    # ------------------------------------------------------------------ set-up

    @property
    def conv_layers(self) -> list[_Layer]:
        return [layer for layer in self.layers if layer.kind == "conv"]

    def set_conv_stats(self, stats: dict[str, Moments]) -> None:
        missing = [layer.name for layer in self.conv_layers if layer.name not in stats]
        if missing:
            raise ValueError(f"conv statistics missing for layers {missing}")
        self.conv_targets = {name: Moments(*(None if t is None else t.float() for t in m)) for name, m in stats.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def reset(self) -> None:
        """Forget the EMA state (e.g. before a new batch of synthetic images)."""
        for layer in self.layers:
            layer.ema = [None, None, None, None]

    def draw(self, generator: torch.Generator | None = None) -> list[str]:
        """Choose which conv layers this iteration drops (probability ``drop_rate`` each); the draw
        stays until the next call, so both segment passes use the same one. Returns their names."""
        for layer in self.conv_layers:
            layer.dropped = bool(torch.rand((), generator=generator) < self.drop_rate) if self.drop_rate > 0 else False
        return [layer.name for layer in self.conv_layers if layer.dropped]

    # ------------------------------------------------------------------ hooks

    def _targets(self, layer: _Layer, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if layer.kind == "bn":
            return layer.module.running_mean.to(like.dtype), layer.module.running_var.to(like.dtype)
        if layer.name not in self.conv_targets:
            raise RuntimeError(f"no global statistics for conv layer {layer.name!r}: call collect_conv_stats or load_conv_stats first")
        return tuple(t.to(device=like.device, dtype=like.dtype) for t in self.conv_targets[layer.name] if t is not None)

    def _patch(self, layer: _Layer) -> int | None:
        return self.patch_size if layer.kind == "conv" else None

    def _layer_loss(self, layer: _Layer, stats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        # The loss and its EMA state in float64 (a few hundred scalars per layer): ∂ℓ/∂s is the unit
        # direction (e − g)/‖e − g‖, which fp32 rounding would make noisy as e approaches g.
        stats = tuple(s.double() for s in stats)
        targets = self._targets(layer, stats[0])
        loss = stats[0].new_zeros(())
        for i, (stat, target) in enumerate(zip(stats, targets)):
            start = layer.ema[i] if layer.ema[i] is not None else (torch.zeros_like(stat) if self.ema_init == "zero" else None)
            layer.ema[i] = ema_update(start, stat, self.alpha)
            loss = loss + sds_norm(target, layer.ema[i], stat)
        return loss

    def _hook(self, layer: _Layer):
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            if self.mode == "off" or (layer.dropped and self.mode != "collect"):
                layer.loss = None
                return
            if self.mode == "collect":
                if layer.kind == "conv":
                    self._collect_sums.setdefault(layer.name, []).append(moment_sums(x, self.patch_size))
                return
            if self.mode == "accumulate":
                sums = moment_sums(x, self._patch(layer))
                layer.sums = sums if layer.sums is None else layer.sums.merge(sums)
                return
            if self.mode == "inject":
                if layer.grads is not None:
                    layer.surrogates.append(stat_grad_surrogate(x, layer.sums, layer.grads, self._patch(layer)))
                return
            stats = tuple(s for s in moments(x, self._patch(layer), dtype=torch.float64) if s is not None)
            layer.loss = self._layer_loss(layer, stats)

        return hook

    # ------------------------------------------------------------------ full batch

    def loss(self) -> torch.Tensor:
        """Σ weight·ℓ over the layers matched in the last forward pass (0 if none)."""
        terms = [layer.weight * layer.loss for layer in self.layers if layer.loss is not None]
        if not terms:
            if self._all_dropped():  # a legal draw (e.g. a BN-free ConvNet with every conv dropped)
                return torch.zeros(())
            raise RuntimeError("no matched layer ran: call the model (in 'full' mode) before loss()")
        return torch.stack(terms).sum()

    def _all_dropped(self) -> bool:
        return all(layer.dropped for layer in self.layers)

    def layer_losses(self) -> dict[str, float]:
        return {layer.name: float(layer.loss.detach()) for layer in self.layers if layer.loss is not None}

    # ------------------------------------------------------------------ segments

    @contextlib.contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    @contextlib.contextmanager
    def accumulating(self) -> Iterator[None]:
        """Pass 1: forward every segment (no grad needed); each layer accumulates batch sums."""
        for layer in self.layers:
            layer.sums, layer.grads, layer.loss = None, None, None
        with self._mode("accumulate"), torch.no_grad():
            yield

    def finish_accumulation(self) -> torch.Tensor:
        """Turn the accumulated sums into the full-batch loss (returned, detached), update the EMAs
        exactly as a full-batch forward would, and keep ∂(Σ weight·ℓ)/∂statistics for injection."""
        total = None
        for layer in self.layers:
            if layer.sums is None:
                continue
            stats = tuple(s.detach().requires_grad_(True) for s in layer.sums.finalize(torch.float64) if s is not None)
            with torch.enable_grad():
                loss = layer.weight * self._layer_loss(layer, stats)
                grads = torch.autograd.grad(loss, stats)
            layer.grads = tuple(grads) + (None,) * (4 - len(grads))
            layer.loss = (loss / layer.weight).detach().float()
            total = loss.detach() if total is None else total + loss.detach()
        if total is None:
            if self._all_dropped():
                return torch.zeros(())
            raise RuntimeError("finish_accumulation called but no layer accumulated statistics")
        return total.float()

    @contextlib.contextmanager
    def injecting(self) -> Iterator[None]:
        """Pass 2: each forward of a segment records a zero-valued surrogate whose gradient is the
        segment's exact share of the full-batch matching gradient; collect it with :meth:`surrogate_loss`."""
        with self._mode("inject"):
            yield

    def surrogate_loss(self) -> torch.Tensor:
        terms = [s for layer in self.layers for s in layer.surrogates]
        for layer in self.layers:
            layer.surrogates = []
        if not terms:
            if self._all_dropped():
                return torch.zeros(())
            raise RuntimeError("no surrogate recorded: run the segment forward inside injecting() after finish_accumulation()")
        return torch.stack(terms).sum()

    # ------------------------------------------------------------------ global conv statistics

    @torch.no_grad()
    def collect_conv_stats(self, batches: Iterable[torch.Tensor], exact: bool = True) -> dict[str, Moments]:
        """Global statistics of every conv layer's input over ``batches`` (a whole dataset).

        ``exact=True`` merges per-batch sums in float64 (Chan), i.e. the dataset statistics;
        ``exact=False`` is the official collection: per-batch means and variances weighted by
        batch size / total (the official hook's ``bs / data_number``), summed."""
        self._collect_sums = {}
        with self._mode("collect"):
            for x in batches:
                self.model(x)
        stats: dict[str, Moments] = {}
        for name, parts in self._collect_sums.items():
            if exact:
                merged = parts[0]
                for part in parts[1:]:
                    merged = merged.merge(part)
                stats[name] = merged.finalize(torch.float32)
            else:
                total = sum(p.count_c for p in parts)
                finals = [(p.count_c / total, p.finalize(torch.float64)) for p in parts]
                stats[name] = Moments(*(sum(w * f[i] for w, f in finals).float() for i in range(4)))
        self._collect_sums = {}
        self.set_conv_stats(stats)
        return stats

    def save_conv_stats(self, path: str | os.PathLike) -> None:
        blob = {
            "model_key": model_key(self.model),
            "patch_size": self.patch_size,
            "stats": {name: list(m) for name, m in self.conv_targets.items()},
        }
        atomic_torch_save(blob, path)

    def load_conv_stats(self, path: str | os.PathLike) -> dict[str, Moments]:
        blob = torch.load(Path(path), map_location="cpu", weights_only=True)
        if blob["model_key"] != model_key(self.model):
            raise ValueError(f"{path} holds statistics of a different model (key {blob['model_key']} != {model_key(self.model)})")
        if blob["patch_size"] != self.patch_size:
            raise ValueError(f"{path} was collected with patch size {blob['patch_size']}, this matcher uses {self.patch_size}")
        stats = {name: Moments(*m) for name, m in blob["stats"].items()}
        self.set_conv_stats(stats)
        return stats
