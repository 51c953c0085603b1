"""The relabel ("FKD") evaluation recipe of G-VBSM / SRe2L (``--recipe fkd``; shared/specs/relabel-eval.md §1, §5).

Every step the student sees a freshly augmented batch and the teacher pool labels exactly that batch:

* per sample RandomResizedCrop to the native size (scale 0.08–1, ratio 3/4–4/3, torchvision's
  10-try rule with its centre-crop fallback, bilinear) and a horizontal flip with p 0.5;
* CutMix on every batch: λ ~ Beta(1, 1), one box per batch with the official ``rand_bbox``
  arithmetic, partner = randperm within the batch, pasted in place;
* soft label = plain mean of the raw logits of the teacher pool (eval mode, frozen, no autograd) on
  the exact mixed image; loss = MSE(student logits, soft) + γ·CE against the pre-CutMix label (γ 0.15);
* AdamW lr 1e-3, weight decay 0, per-epoch cosine to 0 over E, batch 100; the final epoch's
  test accuracy (no selection on the test set).

As in the official relabel (one ``--fkd-seed`` for every training run), the augmentation stream and
the batch order depend on the stream seed only; runs differ in the student's initialisation. So the
labels of a (set, pool, seed) are computed once — kept in memory across the runs of one call and, with
``label_cache``, on disk — and cached runs give exactly the labels online runs compute.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast import data, models
from ddfast.train import accuracy
from ddfast.utils import atomic_torch_save, progress, seed_everything

SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


# ----------------------------------------------------------------------------- augmentation draws


def rrc_params(gen: torch.Generator, height: int, width: int, scale: tuple[float, float] = SCALE,
               ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: (top, left, crop height, crop width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    in_ratio = width / height  # fallback: the whole image, clipped to the ratio range, centred
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def rand_bbox(size: Sequence[int], lam: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    """The official ``rand_bbox`` (utils_fkd.py): its "W" is dim 2 and "H" dim 3 of the batch."""
    W, H = size[2], size[3]
    cut_rat = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    cx = int(torch.randint(0, W, (1,), generator=gen))
    cy = int(torch.randint(0, H, (1,), generator=gen))
    bbx1 = int(np.clip(cx - cut_w // 2, 0, W))
    bby1 = int(np.clip(cy - cut_h // 2, 0, H))
    bbx2 = int(np.clip(cx + cut_w // 2, 0, W))
    bby2 = int(np.clip(cy + cut_h // 2, 0, H))
    return bbx1, bby1, bbx2, bby2


@dataclasses.dataclass
class EpochDraw:
    """One epoch of the augmentation stream: sample order, per-sample crops/flips (in that order),
    per-batch CutMix partner permutation, λ and box."""

    order: torch.Tensor  # [N] sample indices, batches are consecutive slices
    crops: torch.Tensor  # [N, 4] (top, left, h, w) of the sample at that position
    flips: torch.Tensor  # [N] bool
    perms: list[torch.Tensor]  # per batch
    lams: list[float]
    boxes: list[tuple[int, int, int, int]]

    def to_blob(self) -> dict[str, Any]:
        return {"order": self.order, "crops": self.crops, "flips": self.flips, "perms": self.perms,
                "lams": torch.tensor(self.lams, dtype=torch.float64), "boxes": torch.tensor(self.boxes, dtype=torch.int64)}

    @staticmethod
    def from_blob(blob: dict[str, Any]) -> EpochDraw:
        return EpochDraw(blob["order"], blob["crops"], blob["flips"], list(blob["perms"]),
                         blob["lams"].tolist(), [tuple(b) for b in blob["boxes"].tolist()])


def draw_epoch(gen: torch.Generator, n: int, height: int, width: int, batch_size: int) -> EpochDraw:
    order = torch.randperm(n, generator=gen)
    crops = torch.tensor([rrc_params(gen, height, width) for _ in range(n)], dtype=torch.int64).reshape(n, 4)
    flips = torch.rand(n, generator=gen) < 0.5
    perms, lams, boxes = [], [], []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        perms.append(torch.randperm(size, generator=gen))
        lam = float(torch.rand((), generator=gen, dtype=torch.float64))  # Beta(1, 1) is uniform on [0, 1)
        lams.append(lam)
        boxes.append(rand_bbox((size, 0, height, width), lam, gen))
    return EpochDraw(order, crops, flips, perms, lams, boxes)


def augment_epoch(images: torch.Tensor, labels: torch.Tensor, draw: EpochDraw, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The epoch's batches (mixed images, pre-CutMix hard labels) from ``draw``."""
    n, _, height, width = images.shape
    out = []
    for b, start in enumerate(range(0, n, batch_size)):
        idx = draw.order[start : start + batch_size]
        crops = []
        for pos, i in enumerate(idx.tolist()):
            top, left, h, w = draw.crops[start + pos].tolist()
            crop = images[i : i + 1, :, top : top + h, left : left + w]
            if (h, w) != (height, width):
                crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            crops.append(crop.flip(3) if bool(draw.flips[start + pos]) else crop)
        batch = torch.cat(crops)
        x1, y1, x2, y2 = draw.boxes[b]
        batch[:, :, x1:x2, y1:y2] = batch[draw.perms[b], :, x1:x2, y1:y2]
        out.append((batch, labels[idx]))
    return out


# ----------------------------------------------------------------------------- soft labels


@torch.no_grad()
def ensemble_logits(teachers: Sequence[nn.Module], x: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Plain mean of the teachers' raw logits; one batched call per teacher per chunk."""
    total = None
    for teacher in teachers:
        logits = torch.cat([teacher(x[i : i + chunk]) for i in range(0, len(x), chunk)]).float()
        total = logits if total is None else total + logits
    return total / len(teachers)


class LabelStream:
    """The (set, pool, seed) augmentation stream and its soft labels, epoch by epoch, computed
    once and reused by every run (optionally stored under ``cache_dir``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, teachers: Sequence[nn.Module], teacher_key: str,
                 seed: int, epochs: int, batch_size: int, cache_dir: str | Path | None = None) -> None:
        self.images, self.labels, self.teachers = images, labels, teachers
        self.seed, self.epochs, self.batch_size = seed, epochs, batch_size
        self.teacher_seconds = 0.0
        digest = hashlib.sha256()
        for t in (images.float().contiguous(), labels.contiguous()):
            digest.update(t.numpy().tobytes())
        digest.update(f"{teacher_key}|{seed}|{epochs}|{batch_size}|{SCALE}|{RATIO}|beta1".encode())
        self.key = digest.hexdigest()[:24]
        self.path = None if cache_dir is None else Path(cache_dir) / f"fkd-{self.key}.pt"
        self._draws: list[EpochDraw] = []
        self._soft: list[torch.Tensor] = []  # [N, classes] per epoch, in batch order
        self._gen = torch.Generator().manual_seed(seed)
        if self.path is not None and self.path.is_file():
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
            self._draws = [EpochDraw.from_blob(d) for d in blob["draws"]]
            self._soft = list(blob["soft"])

    @property
    def from_cache(self) -> bool:
        return len(self._draws) == self.epochs

    def epoch(self, e: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """[(mixed images, pre-CutMix labels, soft labels)] of epoch e (epochs are produced in order)."""
        n, _, height, width = self.images.shape
        if e == len(self._draws):
            self._draws.append(draw_epoch(self._gen, n, height, width, self.batch_size))
        batches = augment_epoch(self.images, self.labels, self._draws[e], self.batch_size)
        if e == len(self._soft):
            start = time.perf_counter()
            self._soft.append(ensemble_logits(self.teachers, torch.cat([b for b, _ in batches])))
            self.teacher_seconds += time.perf_counter() - start
        soft = self._soft[e].split([len(b) for b, _ in batches])
        return [(x, y, s) for (x, y), s in zip(batches, soft)]

    def save(self) -> None:
        if self.path is not None and not self.path.is_file():
            atomic_torch_save({"draws": [d.to_blob() for d in self._draws], "soft": self._soft}, self.path)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class FKDConfig:
    epochs: int = 300
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    gamma: float = 0.15


def train_student(net: nn.Module, stream: LabelStream, config: FKDConfig, desc: str = "fkd") -> None:
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    net.train()
    for e in progress(range(config.epochs), desc=desc, leave=False):
        for group in optimizer.param_groups:  # LambdaLR stepped once per epoch: 0.5(1 + cos(π e / E))
            group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * e / config.epochs))
        for x, y, soft in stream.epoch(e):
            logits = net(x)
            loss = F.mse_loss(logits, soft) + config.gamma * F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()


def evaluate_fkd(
    images: torch.Tensor | Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    labels: torch.Tensor | None,
    dataset: data.Dataset,
    teachers: Sequence[nn.Module],
    teacher_key: str,
    config: FKDConfig,
    model: str = "convnet",
    width: int | None = None,
    runs: int = 3,
    seed: int = 0,
    first_run: int = 0,
    label_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Train ``runs`` students under the FKD recipe and test each on the test split.

    ``images`` is a normalised set (with ``labels``), or a function run_seed -> (images, labels)
    giving a fresh set per run (the random-subset baseline; its streams cannot be shared)."""
    if not teachers:
        raise ValueError("the fkd recipe needs a teacher pool")
    test_images = dataset.normalize(dataset.test_images)
    accs, start = [], time.time()
    teacher_seconds, student_seconds, cached_epochs = 0.0, 0.0, 0
    stream = None
    for run in range(first_run, first_run + runs):
        run_seed = seed * 1000 + run
        if callable(images):
            run_images, run_labels = images(run_seed)
            stream = None
        else:
            run_images, run_labels = images.float(), labels
        if stream is None:
            stream = LabelStream(run_images, run_labels, teachers, teacher_key, seed if not callable(images) else run_seed,
                                 config.epochs, config.batch_size, label_cache)
            cached_epochs += config.epochs if stream.from_cache else 0
        seed_everything(run_seed)
        net = models.create(model, dataset.channels, dataset.num_classes, dataset.image_size, width=width)
        before = stream.teacher_seconds
        t0 = time.perf_counter()
        train_student(net, stream, config, desc=f"fkd run {run + 1 - first_run}/{runs}")
        elapsed = time.perf_counter() - t0
        teacher_seconds += stream.teacher_seconds - before
        student_seconds += elapsed - (stream.teacher_seconds - before)
        if label_cache is not None:
            stream.save()
        accs.append(accuracy(net, test_images, dataset.test_labels))
    protocol = {
        "recipe": "fkd",
        "model": model, "width": width, "epochs": config.epochs, "runs": runs, "batch_size": config.batch_size,
        "optimizer": f"adamw(lr={config.lr:g}, weight_decay={config.weight_decay:g}), per-epoch cosine to 0",
        "augmentation": "RandomResizedCrop(0.08-1, 3/4-4/3) + flip, CutMix(beta 1) every batch",
        "labels": "fkd", "soft_loss": "mse_ce", "gamma": config.gamma,
        "teachers": teacher_key, "seed": seed, "first_run": first_run, "dataset": dataset.name,
        "random_subset_per_run": callable(images),
        "num_images": int(run_images.shape[0]),
    }
    return {
        "mean": float(np.mean(accs)), "std": float(np.std(accs)), "accs": accs, "protocol": protocol,
        "seconds": time.time() - start,
        "time_split_seconds": {"teachers": teacher_seconds, "student": student_seconds},
        "label_epochs_from_cache": cached_epochs,
    }
