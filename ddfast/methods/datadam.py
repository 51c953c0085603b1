"""DataDAM — dataset distillation by attention matching (Sajedi, Khaki et al., ICCV 2023).

Learnable pixels, initialised from real images. Every iteration a freshly initialised ConvNet-D3 sees
``batch_real`` real images per class and all synthetic images, each class through one siamese DSA draw
(same parameters for both sides), and the pixels take one SGD step (lr 1, momentum 0.5) on

    L = Σ_{l<D} 100·Σ_k ‖mean_{R_k} â_l − mean_{S_k} â_l‖² + 1·Σ_k ‖mean_{R_k} e − mean_{S_k} e‖²

with â the L2-normalised spatial attention map Σ_c |f|^p (p = 1) of the ReLU outputs of blocks 1..D−1 and
e the flattened final features (``DataDistillation/DataDAM`` main_DataDAM.py:232-317, utils.py:17-50).
The loss runs through kernel K2 (``ddfast.ops.attention_match``): one batched call for all layers and
classes instead of the official per-layer ``.cpu()`` round trips, activations taken from the forward
itself instead of cloning hooks, the real forward under ``no_grad``.

The official ``get_network('ConvNet')`` builds the ConvNet with **batch** norm in train mode (utils.py:272;
the paper says instance norm): that is the default (``--match-norm``). Batch norm couples the samples
of a forward, so ``--segment`` (exact two-pass, ``ddfast.matching.segmented_backward``) needs
``--match-norm instancenorm``.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from ddfast import augment, data, distributed, models
from ddfast.matching import MatchConfig, match_loss, network_outputs, segmented_backward
from ddfast.methods import DistillResult
from ddfast.reference.attention_match import MODES
from ddfast.runner import Loop
from ddfast.selection import class_balanced_subset

NAME = "datadam"
MODEL = "convnet"
NORMS = ("batchnorm", "instancenorm")

PRESETS = {
    # paper: the official code's defaults (main_DataDAM.py:26-37).
    "paper": {"iterations": 20000, "batch_real": 64, "net_width": 128},
    # default: sized for 2 CPU cores (docs/methods/datadam-d2m.md).
    "default": {"iterations": 400, "batch_real": 32, "net_width": 64},
}


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """datadam options; --preset, --iterations, --net-width and --lr-img are shared (ddfast.distill)."""
    group.add_argument("--batch-real", type=int, default=None, help="real images per class per iteration (default from --preset: 64 paper)")
    group.add_argument("--att-power", type=float, default=None,
                       help="p of the attention map Σ|f|^p (datadam: 1, the official code; d2m: 4, the DataDAM paper's value)")
    group.add_argument("--att-mode", choices=MODES, default="spatial", help="attention map over positions (spatial, default) or channels")
    group.add_argument("--layer-weight", type=float, default=100.0, help="weight of every attention layer (100, the official code)")
    group.add_argument("--emb-weight", type=float, default=1.0, help="weight of the final-embedding term (1 = 100 · task_balance 0.01)")
    group.add_argument("--class-groups", type=int, default=None,
                       help="datadam: split the classes into this many groups, each matched by its own forward (the work units "
                       "torchrun deals to its ranks; 1 and N processes give the same set for the same number of groups); "
                       ">1 needs --match-norm instancenorm (default 1: one forward over all classes, the official loop)")
    group.add_argument("--match-norm", choices=NORMS, default=None,
                       help="normalisation of the matching ConvNets (datadam: batchnorm in train mode, the official code; "
                       "d2m: instancenorm, the paper)")


@dataclasses.dataclass
class Config:
    ipc: int
    iterations: int
    batch_real: int
    net_width: int
    norm: str
    lr_img: float
    momentum: float
    init: str
    match: dict[str, Any]
    segment: int
    seed: int
    class_groups: int = 1

    @property
    def match_config(self) -> MatchConfig:
        return MatchConfig(**self.match)


def resolve_match(args: argparse.Namespace, power: float) -> MatchConfig:
    match = MatchConfig(power=power if args.att_power is None else args.att_power, mode=args.att_mode,
                        layer_weight=args.layer_weight, emb_weight=args.emb_weight)
    if not match.power > 0:
        raise ValueError(f"--att-power must be > 0, got {match.power}")
    if match.layer_weight < 0 or match.emb_weight < 0:
        raise ValueError("--layer-weight and --emb-weight must be >= 0")
    return match


def check_segment(segment: int, norm: str) -> None:
    if segment and norm == "batchnorm":
        raise ValueError("--segment needs --match-norm instancenorm: batch norm in train mode normalises over the whole batch, "
                         "so running it a segment at a time would change the loss")


def resolve_config(args: argparse.Namespace, dataset: data.Dataset) -> Config:
    """Fill preset defaults and reject bad arguments before any work starts."""
    preset = PRESETS[args.preset]
    pick = lambda value, key: preset[key] if value is None else value  # noqa: E731
    config = Config(
        ipc=args.ipc, iterations=pick(args.iterations, "iterations"), batch_real=pick(args.batch_real, "batch_real"),
        net_width=pick(args.net_width, "net_width"), norm=args.match_norm or "batchnorm",
        lr_img=1.0 if args.lr_img is None else args.lr_img, momentum=0.5, init="real" if args.init is None else args.init,
        match=dataclasses.asdict(resolve_match(args, 1.0)), segment=args.segment, seed=args.seed,
        class_groups=args.class_groups or 1,
    )
    for field in ("iterations", "batch_real", "net_width"):
        if getattr(config, field) < 1:
            raise ValueError(f"--{field.replace('_', '-')} must be >= 1, got {getattr(config, field)}")
    if config.lr_img <= 0:
        raise ValueError(f"--lr-img must be > 0, got {config.lr_img}")
    if config.init not in ("real", "noise"):
        raise ValueError(f"datadam initialises from real images or noise: --init {config.init} is a gvbsm/sre2l option")
    counts = torch.bincount(dataset.train_labels, minlength=dataset.num_classes)
    if int(counts.min()) < max(config.batch_real, config.ipc):
        raise ValueError(f"the smallest class has {int(counts.min())} training images: fewer than --batch-real "
                         f"({config.batch_real}) or --ipc ({config.ipc})")
    check_segment(config.segment, config.norm)
    if args.class_groups is not None and not 1 <= args.class_groups <= dataset.num_classes:
        raise ValueError(f"--class-groups must be in [1, {dataset.num_classes}] (the number of classes), got {args.class_groups}")
    if config.class_groups > 1 and config.norm == "batchnorm":
        raise ValueError("--class-groups > 1 needs --match-norm instancenorm: batch norm in train mode normalises over the "
                         "whole batch of all classes (the official forward), so one forward per group would change the loss")
    return config


def matching_net(dataset: data.Dataset, width: int, norm: str, gen: torch.Generator) -> torch.nn.Module:
    """A freshly initialised, frozen ConvNet-D3 (train mode: batch norm uses batch statistics, as the
    official loop's ``net.train()``); its init is drawn from ``gen`` so a resumed run rebuilds it."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    net = models.create(MODEL, dataset.channels, dataset.num_classes, dataset.image_size, width=width, norm=norm)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.train()


def _iteration_rng(config: Config, it: int) -> torch.Generator:
    """Everything random in iteration ``it`` (network init, real batch, DSA) comes from here, so a
    resumed run retraces the same iterations."""
    return torch.Generator().manual_seed(config.seed * 1_000_003 + it)


def real_batch(dataset: data.Dataset, per_class: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random real images of every class, class-major (DataDAM's get_images per class)."""
    idx = class_balanced_subset(dataset.train_labels, dataset.num_classes, per_class, int(torch.randint(2**31, (1,), generator=gen)))
    return dataset.normalize(dataset.train_images[idx]), dataset.train_labels[idx]


def class_groups(num_classes: int, groups: int) -> list[torch.Tensor]:
    """The classes of each group: ``groups`` contiguous blocks, sizes differing by at most one."""
    return list(torch.arange(num_classes).tensor_split(groups))


def _backward(net: torch.nn.Module, xr: torch.Tensor, yr: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, num_classes: int,
              config: Config, retain: bool = False) -> float:
    """Back-propagate the matching loss of these batches into ``xs``'s graph (kept for the next group when ``retain``:
    the groups share the DSA of all synthetic images); the loss."""
    cfg = config.match_config
    if config.segment:
        loss, grad_xs = segmented_backward(net, xr, yr, xs, ys, num_classes, cfg, config.segment)
        xs.backward(grad_xs, retain_graph=retain)
        return loss
    with torch.no_grad():
        real = network_outputs(net, xr)
    loss = match_loss(real, network_outputs(net, xs), yr, ys, num_classes, cfg)
    loss.backward(retain_graph=retain)
    return float(loss.detach())


def image_gradient(u: torch.Tensor, y: torch.Tensor, dataset: data.Dataset, config: Config, it: int,
                   world: distributed.World = distributed.SINGLE) -> tuple[torch.Tensor, float]:
    """(∂L/∂u, L) of iteration ``it``. With class groups, this rank matches its own groups: L is a sum over classes
    and a class's images enter only its own terms, so the gradient rows of this rank's groups are exact and the
    other rows are 0 (another rank's; nothing is communicated per iteration but the groups' losses)."""
    gen = _iteration_rng(config, it)  # every rank draws everything, so each group sees the same draws anywhere
    net = matching_net(dataset, config.net_width, config.norm, gen)
    xr, yr = real_batch(dataset, config.batch_real, gen)
    leaf = u.detach().requires_grad_(True)
    xr, xs = augment.siamese_dsa(xr, leaf, yr, y, dataset.num_classes, gen)
    if config.class_groups == 1 and not world.distributed:
        loss = _backward(net, xr, yr, xs, y, dataset.num_classes, config)
        return leaf.grad, loss
    groups = class_groups(dataset.num_classes, config.class_groups)
    losses = {}
    mine = distributed.my_units(world, len(groups))
    for g in mine:
        in_r, in_s = torch.isin(yr, groups[g]), torch.isin(y, groups[g])
        losses[g] = _backward(net, xr[in_r], yr[in_r], xs[in_s], y[in_s], dataset.num_classes, config, retain=g != mine[-1])
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return grad, sum(distributed.all_units(world, losses, len(groups)))


def _init_images(dataset: data.Dataset, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    idx = class_balanced_subset(dataset.train_labels, dataset.num_classes, config.ipc, config.seed)
    labels = dataset.train_labels[idx].clone()
    if config.init == "noise":
        gen = torch.Generator().manual_seed(config.seed)
        return torch.randn(len(idx), *dataset.train_images.shape[1:], generator=gen), labels
    return dataset.normalize(dataset.train_images[idx]).clone(), labels


def distill(args: argparse.Namespace, dataset: data.Dataset) -> DistillResult | None:
    """The distilled set (None on ranks other than 0 of a torchrun launch: each rank updates the images of its class
    groups, rank 0 gathers them by group and writes the set)."""
    config = resolve_config(args, dataset)
    world = getattr(args, "world", distributed.SINGLE)
    if world.is_main:
        print(_describe(config, args.preset))
        if world.size > config.class_groups:
            print(f"datadam: {config.class_groups} class group(s) for {world.size} ranks: {world.size - config.class_groups} "
                  f"rank(s) idle; --class-groups {world.size} or more (with --match-norm instancenorm) uses them all")
    u, y = _init_images(dataset, config)
    optimizer = torch.optim.SGD([u.requires_grad_(True)], lr=config.lr_img, momentum=config.momentum)
    ckpt = Path(args.out_dir) / "checkpoint" / f"{distributed.checkpoint_name(world, NAME)}.pt"
    loop = Loop(ckpt, {**dataclasses.asdict(config), "world_size": world.size}, config.iterations, f"datadam IPC {config.ipc}")
    saved = loop.resume()
    if saved is not None:
        with torch.no_grad():
            u.copy_(saved["images"])
        optimizer.load_state_dict(saved["optimizer"])

    def step(it: int) -> dict[str, float]:
        grad, loss = image_gradient(u, y, dataset, config, it, world)
        u.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"loss": loss}

    loop.run(step, lambda: {"images": u.detach(), "optimizer": optimizer.state_dict()})
    images = u.detach().clone()
    if world.distributed:  # each rank's images are right on the rows of its groups: gather them by group
        groups = class_groups(dataset.num_classes, config.class_groups)
        mine = {g: images[torch.isin(y, groups[g])] for g in distributed.my_units(world, len(groups))}
        parts = distributed.gather_units(world, mine, len(groups))
        if not world.is_main:
            return None
        for g, rows in enumerate(parts):
            images[torch.isin(y, groups[g])] = rows
    stats = {"seconds_per_iteration": loop.seconds_per_iteration, "iterations_this_process": loop.iterations_this_process,
             "method_config": dataclasses.asdict(config)}
    return DistillResult(images=images, labels=y, stats=stats)


def _describe(config: Config, preset: str) -> str:
    m = config.match_config
    return (
        f"datadam ({preset} preset): {config.iterations} iterations, a fresh ConvNet-D3 w{config.net_width} ({config.norm}) per "
        f"iteration, {config.batch_real} real images per class, pixels from {config.init}, SGD lr {config.lr_img:g} momentum "
        f"{config.momentum:g}; attention p = {m.power:g} ({m.mode}), {m.layer_weight:g} per layer, embedding weight "
        f"{m.emb_weight:g}; segment {config.segment or 'off'}"
    )
