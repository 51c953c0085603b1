"""G-VBSM (and SRe2L): squeeze -> statistics -> recover -> relabel (defaults from the official code; docs/methods/gvbsm.md).

* squeeze: a backbone pool trained with ``ddfast.train.get_teacher`` (cached);
* statistics: global conv-input statistics per backbone (``StatMatcher.collect_conv_stats``, cached);
* recover: class-major batches from randn, one crop/flip/roll draw per iteration, one backbone per
  iteration round-robin, loss = CE + dd_weight·DD + r·Σ rescale·(EMA-SDS statistic matching), Adam
  with the official betas and a cosine schedule, clamped to the valid pixel range;
* relabel: ensemble-mean backbone logits as soft labels.

``--segment N`` runs an exact two-pass scheme (pass 1 accumulates every matched layer's statistics over the
segments without grad, pass 2 re-runs each segment and injects the closed-form gradient of the full-batch
loss; docs/methods/gvbsm.md); ``--impl official`` runs the
same method through the official-style hooks and the official densification loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast import backend, data, distributed, models
from ddfast.augment import crop_flip
from ddfast.methods import DistillResult
from ddfast.ops import densify_loss
from ddfast.reference.densify_official import densify_loss_official
from ddfast.reference.stat_match_official import OfficialMatcher
from ddfast.runner import Loop
from ddfast.selection import SELECT_RULES, class_balanced_subset, select_real
from ddfast.stat_matcher import StatMatcher, model_key
from ddfast.train import get_teacher, random_subset, teacher_spec
from ddfast.utils import PeakMemory, cache_dir, progress

NAMES = ("gvbsm", "sre2l")

# Backbone pools: name -> width. "default" is sized for 2 CPU cores (~10 min with teacher training);
# "paper" is the G-VBSM small-dataset pool at its standard widths.
POOLS = {
    "gvbsm": {
        "default": {"convnet": 32, "resnet18": 8, "mobilenetv2": 8, "wrn-16-2": 4, "shufflenetv2": 12},
        "paper": {"convnet": 128, "resnet18": 64, "mobilenetv2": 16, "wrn-16-2": 16, "shufflenetv2": 48},
    },
    "sre2l": {"default": {"resnet18": 8}, "paper": {"resnet18": 64}},
}
PRESETS = {
    # teacher_images / stats_images: training images the teachers are trained on and the global
    # conv statistics are collected over (fixed random subsets; 0 = all)
    # default: recover refines teacher-selected real images (chosen on a held-out split, docs/results.md)
    "default": {"iterations": 200, "batch_size": 100, "teacher_epochs": 1, "teacher_images": 20000, "stats_images": 10000,
                "init": "selected", "jitter": 4},
    # 4000 iterations: G-VBSM's CIFAR-10/100 rows and the official Branch_CIFAR_10/recover/recover.sh
    "paper": {"iterations": 4000, "batch_size": 100, "teacher_epochs": 5, "teacher_images": 0, "stats_images": 0, "init": "noise",
              "jitter": 32},
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """gvbsm/sre2l options; --preset, --iterations, --teacher-epochs, --teacher-images and --alpha are shared (ddfast.distill)."""
    group.add_argument("--batch-size", type=int, default=None, help="synthetic images per recover batch (default from --preset)")
    group.add_argument("--backbones", default=None, help="comma-separated backbone pool, name or name:width (default from --preset)")
    group.add_argument("--lr", type=float, default=0.05, help="Adam learning rate on the images (0.05 small datasets, 0.1 ImageNet)")
    group.add_argument("--betas", default="0.5,0.9", help="Adam betas (official: 0.5,0.9)")
    group.add_argument("--jitter", type=int, default=None,
                       help="max torch.roll shift in pixels (default from --preset: paper 32, the official G-VBSM default; default 4, "
                       "SRe2L's CIFAR value: it refines real images instead of growing them from noise)")
    group.add_argument("--drop-rate", type=float, default=None, help="conv matching drop rate (gvbsm 0.4, sre2l 0)")
    group.add_argument("--r-weight", type=float, default=0.01, help="weight r of the statistic matching loss (0.01)")
    group.add_argument("--first-multiplier", type=float, default=10.0,
                       help="weight of the first matched layer of each backbone in named_modules() order, BN or conv (10)")
    group.add_argument("--dd-weight", type=float, default=None, help="weight of data densification (gvbsm 1.0, sre2l 0)")
    group.add_argument("--tau", type=float, default=4.0, help="densification temperature τ (4)")
    group.add_argument("--patch-size", type=int, default=4, help="patch size of the conv patch statistics (4; 16 for ImageNet)")
    group.add_argument("--stats", choices=("exact", "compat"), default="exact",
                       help="global conv statistics: exact float64 moments of the (unaugmented) training images, or compat = "
                       "the official collection (RandomCrop pad 4 + flip, shuffled batches of 64, per-batch moments weighted bs/N)")
    group.add_argument("--stats-images", type=int, default=None,
                       help="collect the conv statistics over this many training images drawn at random, 0 = all "
                       "(default from --preset: 10000 for default, all for paper)")
    group.add_argument("--ema-init", choices=("zero", "first"), default="zero",
                       help="start each statistic's EMA from 0 (default, the official code) or from the first batch "
                       "statistic (unbiased; not available with --impl official)")
    group.add_argument("--logit-norm", action="store_true", help="normalise each backbone's logits (per sample) before the ensemble mean")
    group.add_argument("--candidates", type=int, default=300,
                       help="--init selected: random real candidates per class (300, RDED's CIFAR-10 scripts)")
    group.add_argument("--select-rule", choices=SELECT_RULES, default="confidence",
                       help="--init selected: confidence = the IPC candidates with the lowest pool cross-entropy (default, "
                       "chosen on a held-out split); diverse = k-means (k = IPC) on the pool's penultimate features, the "
                       "lowest-score candidate of each cluster; rded = RDED's rule: the images are each candidate's best "
                       "square crop, the IPC x f² best, tiled f x f (--mosaic-factor f)")
    group.add_argument("--mosaic-factor", type=int, default=1,
                       help="--select-rule rded: tile f x f crops per image (RDED: 1 for CIFAR, 2 for ImageNet; default 1)")
    group.add_argument("--select-crops", type=int, default=5, help="--init selected: RandomResizedCrop+flip views per candidate in its score (5)")


@dataclasses.dataclass
class Config:
    method: str
    ipc: int
    iterations: int
    batch_size: int
    backbones: dict[str, int]
    teacher_epochs: int
    teacher_images: int
    lr: float
    betas: tuple[float, float]
    jitter: int
    alpha: float
    drop_rate: float
    r_weight: float
    first_multiplier: float
    dd_weight: float
    tau: float
    patch_size: int
    stats: str
    stats_images: int
    ema_init: str
    logit_norm: bool
    segment: int
    official: bool  # --impl official: the official code's pipeline
    seed: int
    init: str
    candidates: int
    select_rule: str
    select_crops: int
    mosaic_factor: int = 1


def _parse_backbones(spec: str) -> dict[str, int]:
    pool: dict[str, int] = {}
    for item in spec.split(","):
        name, _, width = item.strip().partition(":")
        pool[name] = int(width) if width else None
    return pool


def resolve_config(args: argparse.Namespace, num_classes: int) -> Config:
    """Fill preset/method defaults and reject bad arguments before any work starts."""
    preset = PRESETS[args.preset]
    method = args.method
    backbones = _parse_backbones(args.backbones) if args.backbones else dict(POOLS[method][args.preset])
    for name in backbones:
        models.create(name, 1, 2, 32, width=8)  # raises "unknown model" early
    betas = tuple(float(b) for b in args.betas.split(","))
    config = Config(
        method=method,
        ipc=args.ipc,
        iterations=preset["iterations"] if args.iterations is None else args.iterations,
        batch_size=preset["batch_size"] if args.batch_size is None else args.batch_size,
        backbones=backbones,
        teacher_epochs=preset["teacher_epochs"] if args.teacher_epochs is None else args.teacher_epochs,
        teacher_images=preset["teacher_images"] if args.teacher_images is None else args.teacher_images,
        lr=args.lr,
        betas=betas,
        jitter=preset["jitter"] if args.jitter is None else args.jitter,
        alpha=args.alpha if args.alpha is not None else (0.8 if method == "gvbsm" else 0.0),
        drop_rate=args.drop_rate if args.drop_rate is not None else (0.4 if method == "gvbsm" else 0.0),
        r_weight=args.r_weight,
        first_multiplier=args.first_multiplier,
        dd_weight=args.dd_weight if args.dd_weight is not None else (1.0 if method == "gvbsm" else 0.0),
        tau=args.tau,
        patch_size=args.patch_size,
        stats=args.stats,
        stats_images=preset["stats_images"] if args.stats_images is None else args.stats_images,
        ema_init=args.ema_init,
        logit_norm=args.logit_norm,
        segment=args.segment,
        official=args.impl == "official",
        seed=args.seed,
        init=preset["init"] if args.init is None else args.init,
        candidates=args.candidates,
        select_rule=args.select_rule,
        select_crops=args.select_crops,
        mosaic_factor=args.mosaic_factor,
    )
    if config.iterations < (1 if config.init == "noise" else 0):
        raise ValueError(f"--iterations must be >= 1 (>= 0 with --init real|selected), got {config.iterations}")
    if config.mosaic_factor < 1 or (config.mosaic_factor > 1 and config.select_rule != "rded"):
        raise ValueError(f"--mosaic-factor must be >= 1, and > 1 only with --select-rule rded, got {config.mosaic_factor}")
    keep = config.ipc * (config.mosaic_factor**2 if config.select_rule == "rded" else 1)
    if config.init == "selected" and config.candidates < keep:
        raise ValueError(f"--candidates must be >= {'--ipc x --mosaic-factor²' if keep > config.ipc else '--ipc'}: each class "
                         f"keeps {keep} of its candidates, got {config.candidates} < {keep}")
    if config.select_crops < 1:
        raise ValueError(f"--select-crops must be >= 1, got {config.select_crops}")
    if len(betas) != 2:
        raise ValueError(f"--betas needs two numbers, got {args.betas!r}")
    if config.teacher_images < 0:
        raise ValueError(f"--teacher-images must be >= 0 (0 = all), got {config.teacher_images}")
    if config.stats_images < 0:
        raise ValueError(f"--stats-images must be >= 0 (0 = all), got {config.stats_images}")
    if config.teacher_epochs < 1:
        raise ValueError(f"--teacher-epochs must be >= 1, got {config.teacher_epochs}")
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {config.batch_size}")
    if config.batch_size < config.ipc * num_classes and config.batch_size % config.ipc:
        raise ValueError(
            f"--batch-size {config.batch_size} must be a multiple of --ipc {config.ipc}: the reorder loop puts all IPC "
            f"images of a class in one batch (or use a batch of at least {config.ipc * num_classes})"
        )
    if config.method == "sre2l" and any(
        not any(isinstance(m, nn.BatchNorm2d) for m in models.create(n, 1, 2, 32, width=8).modules()) for n in backbones
    ):
        raise ValueError("sre2l matches BatchNorm statistics: every backbone needs BatchNorm layers (convnet has none)")
    if config.official and config.ema_init != "zero":
        raise ValueError("--impl official runs the official hooks, whose EMA starts from 0: use --ema-init zero")
    if config.official and config.segment:
        raise ValueError("--segment needs the fused statistic ops; --impl official (the official hooks) has no segment mode")
    return config


# ----------------------------------------------------------------------------- squeeze + statistics


@dataclasses.dataclass
class Backbone:
    name: str
    model: nn.Module
    matcher: StatMatcher | OfficialMatcher


COMPAT_STATS_BATCH = 64  # the official collection's DataLoader batch size


def stats_batches(raw: torch.Tensor, dataset: data.Dataset, exact: bool, seed: int = 0) -> list[torch.Tensor]:
    """Normalised batches the global conv statistics are collected over. exact: the training images
    as they are, in order; compat: the official loader (shuffled, batches of 64, per-sample
    RandomCrop(pad 4) + flip applied before normalisation, as torchvision's transform order)."""
    if exact:
        return [dataset.normalize(raw[i : i + 500]) for i in range(0, len(raw), 500)]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(raw), generator=gen)
    return [
        dataset.normalize(crop_flip(raw[order[i : i + COMPAT_STATS_BATCH]], pad=4, generator=gen))
        for i in range(0, len(raw), COMPAT_STATS_BATCH)
    ]


def _conv_stats(model: nn.Module, matcher: StatMatcher, dataset: data.Dataset, config: Config) -> None:
    subset = random_subset(len(dataset.train_images), config.stats_images)  # the same for every run and backbone
    name = f"{model.ddfast_name}-{model_key(model)}-p{config.patch_size}-{config.stats}-v2" + ("" if subset is None else f"-n{len(subset)}")
    path = cache_dir() / "stats" / dataset.name / f"{name}.pt"
    if path.is_file():
        matcher.load_conv_stats(path)
        return
    raw = dataset.train_images if subset is None else dataset.train_images[subset]
    batches = stats_batches(raw, dataset, exact=config.stats == "exact")
    matcher.collect_conv_stats(progress(batches, desc=f"statistics {model.ddfast_name}"), exact=config.stats == "exact")
    matcher.save_conv_stats(path)


def attach(name: str, model: nn.Module, config: Config, conv_stats: Callable[[StatMatcher], None]) -> Backbone:
    """Freeze a trained backbone and attach the matching ``config`` asks for; ``conv_stats`` fills
    the matcher's global conv statistics (gvbsm only)."""
    for p in model.parameters():
        p.requires_grad_(False)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    match_conv = config.method == "gvbsm"
    matcher = StatMatcher(
        model, patch_size=config.patch_size, alpha=config.alpha, drop_rate=config.drop_rate,
        first_multiplier=config.first_multiplier, match_bn=has_bn, match_conv=match_conv, ema_init=config.ema_init,
    )
    if match_conv:
        conv_stats(matcher)
    if config.official:  # the official-style hooks replace the fused matcher, same interface
        dtype = next(model.parameters()).dtype
        targets = {n: tuple(t.to(dtype) for t in m) for n, m in matcher.conv_targets.items()} if match_conv else None
        matcher.remove()
        matcher = OfficialMatcher(
            model, alpha=config.alpha, drop_rate=config.drop_rate, first_multiplier=config.first_multiplier,
            match_bn=has_bn, match_conv=match_conv, conv_stats=targets, patch_size=config.patch_size,
        )
    return Backbone(name, model, matcher)


def build_backbones(dataset: data.Dataset, config: Config, world: distributed.World = distributed.SINGLE) -> list[Backbone]:
    """The frozen pool with its matchers. Under torchrun each backbone (teacher training + conv statistics, both cached)
    is a unit: every rank builds its share first, then, after a barrier, the others from the cache."""
    names = list(config.backbones.items())

    def build(u: int) -> Backbone:
        name, width = names[u]
        model, acc = get_teacher(dataset, name, width, config.teacher_epochs, seed=0, train_images=config.teacher_images)
        print(f"backbone {name} (width {width or 'default'}): test accuracy {acc:.2f}%", flush=True)
        return attach(name, model, config, lambda matcher, model=model: _conv_stats(model, matcher, dataset, config))

    return distributed.build_everywhere(world, len(names), build)


# ----------------------------------------------------------------------------- recover


@dataclasses.dataclass(frozen=True)
class Jitter:
    """One augmentation draw for the whole batch: RandomCrop(pad 4) + flip, then torch.roll."""

    top: int
    left: int
    flip: bool
    roll_y: int
    roll_x: int

    @staticmethod
    def draw(gen: torch.Generator, jitter: int, pad: int = 4) -> Jitter:
        r = lambda hi: int(torch.randint(0, hi, (1,), generator=gen))  # noqa: E731
        return Jitter(r(2 * pad + 1), r(2 * pad + 1), bool(r(2)), r(jitter + 1), r(jitter + 1))

    def __call__(self, x: torch.Tensor, pad: int = 4) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (pad, pad, pad, pad))[..., self.top : self.top + h, self.left : self.left + w]
        if self.flip:
            x = x.flip(3)
        return torch.roll(x, shifts=(self.roll_y, self.roll_x), dims=(2, 3))


def class_batches(num_classes: int, ipc: int, batch_size: int) -> list[list[int]]:
    """Reorder loop: each batch holds whole classes (all IPC images of each)."""
    per_batch = max(1, batch_size // ipc)
    return [list(range(k, min(k + per_batch, num_classes))) for k in range(0, num_classes, per_batch)]


def _dd_loss(x: torch.Tensor, y: torch.Tensor, config: Config) -> torch.Tensor:
    if config.dd_weight == 0:
        return x.new_zeros(())
    fn = densify_loss_official if config.official else densify_loss
    return fn(x, y, tau=config.tau, pool=32)


TIMING_KEYS = ("forward", "backward", "densify", "statistics_pass")


def new_timing() -> dict[str, float]:
    """Wall seconds per recover phase: network forward (with the matching hooks), backward (network
    and matching), densification forward+backward, and the segment mode's statistics pass."""
    return dict.fromkeys(TIMING_KEYS, 0.0)


def _step_full(bb: Backbone, xa: torch.Tensor, y: torch.Tensor, config: Config, timing: dict[str, float]) -> float:
    t0 = time.perf_counter()
    bb.matcher.mode = "full"
    logits = bb.model(xa)
    stat = bb.matcher.loss()
    t1 = time.perf_counter()
    # Densification's gradient first, then the network's, accumulated into x.grad in the order the
    # segment step uses: floating-point sums in the same order keep the two modes bit-identical.
    dd = _dd_loss(xa, y, config)
    if dd.requires_grad:
        (config.dd_weight * dd).backward(retain_graph=True)
    t2 = time.perf_counter()
    loss = F.cross_entropy(logits, y) + config.r_weight * stat
    loss.backward()
    t3 = time.perf_counter()
    timing["forward"] += t1 - t0
    timing["densify"] += t2 - t1
    timing["backward"] += t3 - t2
    return float(loss.detach()) + config.dd_weight * float(dd.detach())


def _step_segments(bb: Backbone, x: torch.Tensor, aug: Jitter, y: torch.Tensor, config: Config, timing: dict[str, float]) -> float:
    """Exact two-pass segment step (pass 1: the full-batch statistics, pass 2: per-segment gradient injection):
    gradients equal the full-batch step's."""
    t0 = time.perf_counter()
    matcher = bb.matcher
    with torch.no_grad():
        xa_detached = aug(x.detach())
    with matcher.accumulating():
        for part in xa_detached.split(config.segment):
            bb.model(part)
    stat_value = matcher.finish_accumulation()
    t1 = time.perf_counter()
    xa = aug(x)
    dd = _dd_loss(xa, y, config)
    if dd.requires_grad:
        (config.dd_weight * dd).backward()
    timing["statistics_pass"] += t1 - t0
    timing["densify"] += time.perf_counter() - t1
    ce_total = 0.0
    n = x.shape[0]
    with matcher.injecting():
        for xs, ys in zip(x.split(config.segment), y.split(config.segment)):
            t2 = time.perf_counter()
            logits = bb.model(aug(xs))
            ce = F.cross_entropy(logits, ys, reduction="sum") / n
            surrogate = matcher.surrogate_loss()
            t3 = time.perf_counter()
            (ce + config.r_weight * surrogate).backward()
            timing["forward"] += t3 - t2
            timing["backward"] += time.perf_counter() - t3
            ce_total += float(ce.detach())
    return ce_total + config.dd_weight * float(dd.detach()) + config.r_weight * float(stat_value)


def recover_batch(
    pool: list[Backbone], labels: torch.Tensor, shape: tuple[int, ...], lo: torch.Tensor, hi: torch.Tensor,
    config: Config, batch_index: int, timing: dict[str, float], desc: str, init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Recover one batch from ``init`` (normalised real images) or, when None, from randn."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + batch_index)
    x = (torch.randn(len(labels), *shape, generator=gen) if init is None else init.clone()).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=config.lr, betas=config.betas)
    for bb in pool:
        bb.matcher.reset()
    bar = progress(range(config.iterations), desc=desc)
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * it / config.iterations))
        bb = pool[it % len(pool)]
        aug = Jitter.draw(gen, config.jitter)
        bb.matcher.draw(gen)
        optimizer.zero_grad(set_to_none=True)
        if config.segment and config.segment < len(labels):
            loss = _step_segments(bb, x, aug, labels, config, timing)
        else:
            loss = _step_full(bb, aug(x), labels, config, timing)
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
        bar.set_postfix(loss=f"{loss:.3f}", backbone=bb.name)
    return x.detach()


# ----------------------------------------------------------------------------- relabel + driver


@torch.no_grad()
def relabel(pool: list[Backbone], images: torch.Tensor, logit_norm: bool) -> torch.Tensor:
    """Ensemble-mean logits of the backbone pool (optionally per-sample normalised first)."""
    outs = []
    for bb in pool:
        bb.matcher.mode = "off"
        logits = torch.cat([bb.model(images[i : i + 500]) for i in range(0, len(images), 500)])
        if logit_norm:
            logits = (logits - logits.mean(1, keepdim=True)) / logits.std(1, keepdim=True).clamp_min(1e-6)
        outs.append(logits)
    return torch.stack(outs).mean(0)


def initial_images(pool: list[Backbone], dataset: data.Dataset, config: Config) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Class-major normalised initial images for ``config.init`` (None for noise) and what to report about them."""
    if config.init == "noise":
        return None, {}
    if config.init == "real":
        idx = class_balanced_subset(dataset.train_labels, dataset.num_classes, config.ipc, config.seed)
        return dataset.normalize(dataset.train_images[idx]), {"init_indices": idx.tolist()}
    for bb in pool:
        bb.matcher.mode = "off"
    start = time.time()
    images, scores, idx = select_real([bb.model for bb in pool], dataset.normalize(dataset.train_images), dataset.train_labels,
                                      dataset.num_classes, config.ipc, config.candidates, config.seed, config.select_rule,
                                      config.select_crops, factor=config.mosaic_factor)
    seconds = time.time() - start
    print(f"selected {len(images)} real images ({config.select_rule}) from {config.candidates} candidates per class in {seconds:.0f} s; "
          f"mean pool cross-entropy {float(scores.mean()):.3f}", flush=True)
    return images, {"init_indices": idx.tolist(), "init_scores": scores.tolist(), "selection_seconds": seconds}


def _describe(config: Config, preset: str) -> str:
    pool = ", ".join(f"{n}:{w}" if w else n for n, w in config.backbones.items())
    subset = lambda n: f"{n} images" if n else "all images"  # noqa: E731
    return (
        f"{config.method} ({preset} preset): pool [{pool}], teachers {config.teacher_epochs} epoch(s) on "
        f"{subset(config.teacher_images)}, "
        f"{config.iterations} iterations x batch {config.batch_size}, conv statistics over {subset(config.stats_images)}, "
        f"segment {config.segment or 'off'}, {'official-style (--impl official)' if config.official else 'fused'} kernels, "
        f"init {config.init}" + (f" ({config.select_rule}{f' x{config.mosaic_factor} mosaic' if config.mosaic_factor > 1 else ''}, "
                                 f"{config.candidates} candidates per class)" if config.init == "selected" else "")
        + ("" if config.init == "noise" else " [deviation from the official recover, which starts from noise]")
    )


def distill(args: argparse.Namespace, dataset: data.Dataset) -> DistillResult | None:
    """The distilled set on rank 0 (None on the other ranks of a torchrun launch: they recover their share of the
    batches and hand it to rank 0)."""
    config = resolve_config(args, dataset.num_classes)
    world = getattr(args, "world", distributed.SINGLE)
    if world.is_main:
        print(_describe(config, args.preset))
    out = Path(args.out_dir)
    # Statistics collection is preprocessing (cached): it always uses the fused ops.
    with backend.use_backend(None if config.official else args.backend):
        pool = build_backbones(dataset, config, world)
    with backend.use_backend("reference" if config.official else args.backend):
        mean = torch.tensor(dataset.mean).view(-1, 1, 1)
        std = torch.tensor(dataset.std).view(-1, 1, 1)
        lo, hi = (0 - mean) / std, (1 - mean) / std
        shape = (dataset.channels, *dataset.image_size)
        batches = class_batches(dataset.num_classes, config.ipc, config.batch_size)
        timing = new_timing()
        init, init_report = distributed.broadcast(world, initial_images(pool, dataset, config) if world.is_main else None)
        labels = [torch.tensor(classes).repeat_interleave(config.ipc) for classes in batches]
        units = distributed.my_units(world, len(batches))  # all batches on one process
        ckpt_name = distributed.checkpoint_name(world, config.method)
        loop = Loop(out / "checkpoint" / f"{ckpt_name}.pt", {**dataclasses.asdict(config), "world_size": world.size}, len(units), "recover",
                    unit="batch")
        saved = loop.resume()
        images = list(saved["images"]) if saved is not None else []  # one entry per recovered batch of this rank

        def step(i: int) -> dict[str, str]:
            b = units[i]  # seeded by the batch index alone: the same images on whichever rank recovers it
            rows = slice(batches[b][0] * config.ipc, (batches[b][-1] + 1) * config.ipc)
            images.append(recover_batch(pool, labels[b], shape, lo, hi, config, b, timing, desc=f"recover batch {b + 1}/{len(batches)}",
                                        init=None if init is None else init[rows]))
            return {}

        with PeakMemory() as peak:
            loop.run(step, lambda: {"images": images})
        everything = distributed.gather_units(world, dict(zip(units, images)), len(batches))
        if everything is None:
            return None
        images_t, labels_t = torch.cat(everything), torch.cat(labels)
        soft = relabel(pool, images_t, config.logit_norm)
        # The random real subset relabelled by the same pool: the baseline under the same protocol.
        idx = class_balanced_subset(dataset.train_labels, dataset.num_classes, config.ipc, config.seed)
        real = dataset.normalize(dataset.train_images[idx])
        teachers = [teacher_spec(name, width, config.teacher_epochs, 0, config.teacher_images) for name, width in config.backbones.items()]
        baseline = DistillResult(images=real, labels=dataset.train_labels[idx].clone(), soft_labels=relabel(pool, real, config.logit_norm),
                                 teachers=teachers)
    stats: dict[str, Any] = {
        "seconds_per_iteration": loop.seconds / (len(units) * config.iterations) if units and config.iterations else None,
        "recover_seconds": loop.seconds,  # rank 0's batches, before and after a resume
        "world_size": world.size,
        "recover_peak_mem_mb": peak.mb if loop.iterations_this_process else None,
        "time_split_seconds": timing,
        "method_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        **init_report,
    }
    return DistillResult(images=images_t, labels=labels_t, soft_labels=soft, stats=stats, baseline=baseline, teachers=teachers)
