"""Training loops shared by teacher training and evaluation, and the teacher-training CLI.

``python -m ddfast.train --dataset fashion-mnist --model convnet --epochs 5`` trains a teacher, shows
progress, reports test accuracy and caches the checkpoint under a path keyed by
dataset/model/width/epochs/seed. Checkpoints are written atomically after every epoch, so a killed
run re-run with the same arguments resumes where it stopped and ends with the same weights.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast import augment, data, models
from ddfast.utils import atomic_torch_save, cache_dir, progress, seed_everything

AUGMENTATIONS = ("none", "dsa", "crop_flip")
LOSSES = ("ce", "mse_ce", "kl", "l1")
SCHEDULES = ("step", "multistep", "cosine")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation recipe. The defaults are the DC evaluation protocol (SGD 0.01, momentum 0.9,
    wd 5e-4, batch 256, lr ×0.1 after epoch E/2+1 with a fresh optimiser, E+1 passes, as in the
    DatasetCondensation code). ``multistep`` is torch's MultiStepLR as the APM code uses it: ×0.1 from
    epoch index ``milestone`` (default E//2+1) on, momentum kept; ``extra_pass`` (step/multistep) runs
    the E+1-th pass of the DC/APM loops ``for ep in range(Epoch + 1)``."""

    epochs: int = 300
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    augment: str = "none"
    loss: str = "ce"
    gamma: float = 0.15  # weight of the hard-label CE term in the mse_ce soft-label loss (G-VBSM)
    temperature: float = 4.0  # KL soft-label loss temperature
    milestone: int | None = None  # multistep: first epoch index at ×0.1 (None = E//2+1)
    extra_pass: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for field, allowed in (("schedule", SCHEDULES), ("augment", AUGMENTATIONS), ("loss", LOSSES)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")

    @property
    def passes(self) -> int:
        # The DC code loops `for ep in range(Epoch + 1)`; keep that so numbers are comparable.
        return self.epochs + 1 if self.schedule != "cosine" and self.extra_pass else self.epochs

    def lr_at(self, epoch: float) -> float:
        """Learning rate at a (fractional) epoch: the step schedule changes per epoch, cosine per step."""
        if self.schedule == "step":
            return self.lr * (0.1 if int(epoch) > self.epochs // 2 + 1 else 1.0)
        if self.schedule == "multistep":
            milestone = self.epochs // 2 + 1 if self.milestone is None else self.milestone
            return self.lr * (0.1 if int(epoch) >= milestone else 1.0)
        return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / self.epochs))


def _loss(config: TrainConfig, logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
    if config.loss == "ce":
        return F.cross_entropy(logits, labels)
    if soft is None:
        raise ValueError(f"loss {config.loss!r} needs soft labels")
    if config.loss == "l1":  # APM: L1 to the stored teacher logits, a mean over batch × classes
        return F.l1_loss(logits, soft)
    if config.loss == "mse_ce":
        return F.mse_loss(logits, soft) + config.gamma * F.cross_entropy(logits, labels)
    t = config.temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(soft / t, 1), reduction="batchmean", log_target=True) * t * t


def _augment(config: TrainConfig, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if config.augment == "dsa":
        return augment.dsa(x, generator=gen)
    if config.augment == "crop_flip":
        return augment.crop_flip(x, pad=4, generator=gen)
    return x


def fit(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    soft_labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    desc: str = "train",
    resume: dict[str, Any] | None = None,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Train ``model`` on normalised ``images``. ``resume`` is a state produced by ``checkpoint``
    (called after every epoch with model/optimizer/generator state and the epoch count)."""
    gen = generator or torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        start = resume["epoch"]
    n = images.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    # One tick per optimiser step, so a long epoch (teacher training) still shows movement.
    bar = progress(total=config.passes * steps_per_epoch, initial=start * steps_per_epoch, desc=desc, unit="step")
    for epoch in range(start, config.passes):
        lr = config.lr_at(epoch)
        if config.schedule == "step" and epoch == config.epochs // 2 + 2:
            # DC re-creates the optimiser at the decay, dropping the momentum buffers.
            optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        order = torch.randperm(n, generator=gen)
        total, correct, loss_sum = 0, 0, 0.0
        for step, start_idx in enumerate(range(0, n, config.batch_size)):
            if config.schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = config.lr_at(epoch + step / steps_per_epoch)
            idx = order[start_idx : start_idx + config.batch_size]
            x = _augment(config, images[idx], gen)
            y = labels[idx]
            logits = model(x)
            loss = _loss(config, logits, y, None if soft_labels is None else soft_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += len(idx)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(idx)
            bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / total:.3f}", acc=f"{100 * correct / total:.1f}", lr=f"{lr:.3g}")
        if checkpoint is not None:
            checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": gen.get_state(), "epoch": epoch + 1})
    bar.close()


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in percent (eval mode)."""
    model.eval()
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        correct += int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
    return 100.0 * correct / images.shape[0]


TEACHER_LR, TEACHER_BATCH = 0.1, 128


def teacher_path(
    dataset: str, model: str, width: int | None, epochs: int, seed: int, subset: int = 0,
    lr: float = TEACHER_LR, batch_size: int = TEACHER_BATCH, recipe: str = "",
) -> Path:
    """Cache path of a teacher; ``recipe`` names a training recipe other than this module's (e.g. "apm")."""
    name = f"{model}-w{width or 'default'}-e{epochs}-s{seed}" + (f"-n{subset}" if subset else "")
    if (lr, batch_size) != (TEACHER_LR, TEACHER_BATCH):
        name += f"-lr{lr:g}-b{batch_size}"
    if recipe:
        name += f"-{recipe}"
    return cache_dir() / "teachers" / dataset / f"{name}.pt"


def random_subset(n: int, size: int, seed: int = 0) -> torch.Tensor | None:
    """Indices of a fixed random subset of ``size`` out of ``n`` items (None when it is all of them)."""
    if size <= 0 or size >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def get_teacher(
    dataset: data.Dataset,
    model_name: str,
    width: int | None = None,
    epochs: int = 5,
    seed: int = 0,
    lr: float = TEACHER_LR,
    batch_size: int = TEACHER_BATCH,
    train_images: int = 0,
) -> tuple[nn.Module, float]:
    """Train (or load from the cache) a teacher; returns the model in eval mode and its test accuracy.
    Recipe: SGD lr 0.1, batch 128, momentum 0.9, wd 5e-4, per-step cosine lr, random crop (pad 4) + flip. ``train_images > 0``
    trains on a fixed random subset of that many training images (quick CPU teachers)."""
    subset = random_subset(len(dataset.train_images), train_images)
    path = teacher_path(dataset.name, model_name, width, epochs, seed, 0 if subset is None else len(subset), lr, batch_size)
    seed_everything(seed)
    model = models.create(model_name, dataset.channels, dataset.num_classes, dataset.image_size, width=width)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, schedule="cosine", augment="crop_flip")
    acc = cached_fit(path, model, dataset, subset, config, seed, desc=f"teacher {model_name} on {dataset.name}")
    return model.eval(), acc


def cached_fit(path: Path, model: nn.Module, dataset: data.Dataset, subset: torch.Tensor | None, config: TrainConfig, seed: int,
               desc: str) -> float:
    """Load ``model`` from ``path`` when it is there; else train it with :func:`fit` on the training images (``subset`` of
    them when given), checkpointing every epoch to ``path``'s ``.partial.pt`` (a killed run resumes to the same weights),
    and store it with its test accuracy. Returns the test accuracy."""
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["model"])
        return float(blob["test_acc"])
    partial = path.with_suffix(".partial.pt")
    resume = torch.load(partial, map_location="cpu", weights_only=True) if partial.is_file() else None
    images, labels = dataset.train_images, dataset.train_labels
    if subset is not None:
        images, labels = images[subset], labels[subset]
    fit(model, dataset.normalize(images), labels, config, generator=torch.Generator().manual_seed(seed), desc=desc, resume=resume,
        checkpoint=lambda state: atomic_torch_save(state, partial))
    acc = accuracy(model, dataset.normalize(dataset.test_images), dataset.test_labels)
    atomic_torch_save({"model": model.state_dict(), "test_acc": acc, "epochs": config.epochs, "seed": seed}, path)
    partial.unlink(missing_ok=True)
    return acc


def teacher_spec(model: str, width: int | None, epochs: int, seed: int = 0, train_images: int = 0) -> dict[str, Any]:
    """How a cached teacher is named in a distilled file's metadata (``meta["teachers"]``)."""
    return {"model": model, "width": width, "epochs": epochs, "seed": seed, "train_images": train_images}


def load_teacher_pool(dataset: data.Dataset, specs: list[dict[str, Any]]) -> tuple[list[nn.Module], str]:
    """The frozen eval-mode teachers ``specs`` name, from the teacher cache (never trained here: a
    missing teacher is an error), and a key identifying the pool."""
    pool = []
    for spec in specs:
        subset = random_subset(len(dataset.train_images), spec["train_images"])
        path = teacher_path(dataset.name, spec["model"], spec["width"], spec["epochs"], spec["seed"], 0 if subset is None else len(subset))
        if not path.is_file():
            raise FileNotFoundError(
                f"teacher {spec} is not in the teacher cache ({path}); the fkd recipe relabels with the pool that "
                "distilled the set: run the distillation (or python -m ddfast.train) with the same cache directory first"
            )
        model, _ = get_teacher(dataset, spec["model"], spec["width"], spec["epochs"], spec["seed"], train_images=spec["train_images"])
        for p in model.parameters():
            p.requires_grad_(False)
        pool.append(model.eval())
    key = ",".join(f"{s['model']}:{s['width']}:e{s['epochs']}:s{s['seed']}:n{s['train_images']}" for s in specs)
    return pool, key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fashion-mnist", help=f"one of {', '.join(data.available())}")
    parser.add_argument("--data-dir", default=None, help="dataset location (default: $DDFAST_DATA_DIR or the dataset's standard path)")
    parser.add_argument("--model", default="convnet", help=f"one of {', '.join(models.available())}")
    parser.add_argument("--width", type=int, default=None, help="model width (default: the model's standard width)")
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--lr", type=float, default=TEACHER_LR, help=f"SGD learning rate, per-step cosine schedule (default {TEACHER_LR})")
    parser.add_argument("--batch-size", type=int, default=TEACHER_BATCH, help=f"batch size (default {TEACHER_BATCH})")
    parser.add_argument("--seed", type=int, default=0, help="seed; part of the cache key (default 0)")
    parser.add_argument("--train-images", type=int, default=0, help="train on a fixed random subset of this many images (default 0 = all)")
    args = parser.parse_args(argv)
    try:
        dataset = data.load(args.dataset, args.data_dir)
        start = time.time()
        _, acc = get_teacher(dataset, args.model, args.width, args.epochs, args.seed, args.lr, args.batch_size, args.train_images)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.model} on {dataset.name}: test accuracy {acc:.2f}%  ({time.time() - start:.0f} s)")
    subset = random_subset(len(dataset.train_images), args.train_images)
    size = 0 if subset is None else len(subset)
    print(f"checkpoint: {teacher_path(dataset.name, args.model, args.width, args.epochs, args.seed, size, args.lr, args.batch_size)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
