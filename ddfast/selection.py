"""Initial images for the recover stage of gvbsm/sre2l (``--init``).

* ``noise``: standard normal pixels (the official G-VBSM/SRe2L start);
* ``real``: the class-balanced random real subset of the run's seed, i.e. exactly the images the
  random baseline of that seed uses, so distilled-vs-random is a paired comparison;
* ``selected``: per class, ``candidates`` random real images (the first IPC of them are the ``real``
  subset: same per-class permutation), scored by the whole teacher pool, ``select_rule`` keeps IPC:

  - ``confidence``: the IPC candidates with the lowest score (RDED's ranking, applied to whole images);
  - ``diverse``: k-means (k = IPC) over the pool's penultimate features of the candidates, then the
    lowest-score candidate of every cluster: images the teachers find clear that also cover the
    class's modes, rather than IPC near-copies of its easiest mode.

  score = cross-entropy against the class label of the pool's ensemble-mean logits (the soft label
  the relabel recipe trains on), averaged over ``crops`` RandomResizedCrop+flip views (torchvision's
  rule, scale ``crop_scale``): how clearly the images' crops -- what the student sees under the
  relabel recipe -- carry the class for the labels that will supervise them.

  - ``rded``: RDED's own rule (``LINs-lab/RDED`` synthesize/main.py:21-58, utils.py:54-70 and 102-164): the
    distilled images are crops, not whole images. Every candidate gives ``crops`` square RandomResizedCrop
    views (scale 0.08-1, no flip) of size H/f × W/f, each scored by the same pool cross-entropy (f > 1: the
    view zero-padded to H × W, as ``pad``); a candidate keeps its best view, the IPC·f² best views of the
    class are kept in ascending score, and f = ``factor`` > 1 tiles them f × f into IPC images (view
    k·IPC + t becomes tile k of image t, as ``mix_images``). RDED's CIFAR-10 scripts use f = 1, its
    ImageNet ones f = 2.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast.fkd import rrc_params
from ddfast.utils import progress

INITS = ("noise", "real", "selected")
SELECT_RULES = ("confidence", "diverse", "rded")


def class_candidates(labels: torch.Tensor, num_classes: int, per_class: int, seed: int) -> list[torch.Tensor]:
    """Per class, training indices of its candidates: the first ``per_class`` (all of the class when it
    has fewer) of the class's seeded permutation. :func:`class_balanced_subset` keeps the first IPC
    of the same permutations, so the first IPC candidates of each class are the random subset of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(num_classes):
        members = (labels == k).nonzero().flatten()
        rows.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
    return rows


def class_balanced_subset(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """Indices of a class-balanced random subset, class-major (class 0's images first): the first IPC
    of each class's seeded permutation; the random baseline (``--method random``) (:func:`class_candidates`)."""
    chosen = class_candidates(labels, num_classes, ipc, seed)
    for k, members in enumerate(chosen):
        if len(members) < ipc:
            raise ValueError(f"class {k} has only {int((labels == k).sum())} training images; cannot draw IPC={ipc}")
    return torch.cat(chosen)


def random_resized_views(images: torch.Tensor, crops: int, gen: torch.Generator,
                         scale: tuple[float, float]) -> torch.Tensor:
    """[crops, N, C, H, W]: per image and view a RandomResizedCrop (bilinear, back to H×W) and a flip with p 0.5."""
    n, _, height, width = images.shape
    views = torch.empty(crops, *images.shape, dtype=images.dtype)
    for v in range(crops):
        for i in range(n):
            top, left, h, w = rrc_params(gen, height, width, scale=scale)
            crop = images[i : i + 1, :, top : top + h, left : left + w]
            if (h, w) != (height, width):
                crop = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
            if bool(torch.rand((), generator=gen) < 0.5):
                crop = crop.flip(3)
            views[v, i] = crop[0]
    return views


@torch.no_grad()
def pool_scores(pool: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, crops: int,
                gen: torch.Generator, scale: tuple[float, float] = (0.08, 1.0), chunk: int = 500) -> torch.Tensor:
    """[N] float64: mean over ``crops`` views of CE(mean over the pool of its logits, label)."""
    views = random_resized_views(images, crops, gen, scale).flatten(0, 1)
    logits = torch.stack([torch.cat([m(views[i : i + chunk]) for i in range(0, len(views), chunk)]) for m in pool])
    ce = F.cross_entropy(logits.double().mean(0), labels.repeat(crops), reduction="none")
    return ce.view(crops, -1).mean(0)


def square_views(images: torch.Tensor, crops: int, factor: int, gen: torch.Generator) -> torch.Tensor:
    """[crops, N, C, H/f, W/f]: RDED's MultiRandomCrop, square RandomResizedCrops (scale 0.08-1, ratio 1, no flip)
    resized (bilinear) to the tile size."""
    n, _, height, width = images.shape
    size = (height // factor, width // factor)
    views = torch.empty(crops, n, images.shape[1], *size, dtype=images.dtype)
    for v in range(crops):
        for i in range(n):
            top, left, h, w = rrc_params(gen, height, width, scale=(0.08, 1.0), ratio=(1.0, 1.0))
            crop = images[i : i + 1, :, top : top + h, left : left + w]
            views[v, i] = crop[0] if (h, w) == size else F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return views


def centre_pad(views: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad [..., h, w] to [..., H, W] around the centre (RDED's ``pad``; 0 is the mean pixel in normalised space)."""
    dh, dw = height - views.shape[-2], width - views.shape[-1]
    return F.pad(views, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


def mosaic(tiles: torch.Tensor, factor: int, height: int, width: int) -> torch.Tensor:
    """[f²·n, C, h, w] -> [n, C, H, W]: tile k (row-major) of image t is ``tiles[k·n + t]`` (RDED's mix_images;
    rows/columns of the remainder H mod f get one pixel more, the tile resized to fit)."""
    n = len(tiles) // factor**2
    out = tiles.new_zeros(n, tiles.shape[1], height, width)
    sizes_h = [height // factor + (i < height % factor) for i in range(factor)]
    sizes_w = [width // factor + (j < width % factor) for j in range(factor)]
    k, top = 0, 0
    for hh in sizes_h:
        left = 0
        for ww in sizes_w:
            part = tiles[k * n : (k + 1) * n]
            out[:, :, top : top + hh, left : left + ww] = part if part.shape[-2:] == (hh, ww) else F.interpolate(part, size=(hh, ww))
            left += ww
            k += 1
        top += hh
    return out


@torch.no_grad()
def rded_select(pool: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, ipc: int, crops: int, factor: int,
                gen: torch.Generator, chunk: int = 500) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One class's RDED selection: (IPC images [IPC, C, H, W], the score of each image (mean of its tiles'),
    candidate positions [IPC·f²] of the tiles, tile k of image t at k·IPC + t)."""
    height, width = images.shape[-2:]
    views = square_views(images, crops, factor, gen)  # [crops, N, C, h, w]
    flat = views.flatten(0, 1)
    scored = flat if factor == 1 else centre_pad(flat, height, width)
    logits = torch.stack([torch.cat([m(scored[i : i + chunk]) for i in range(0, len(scored), chunk)]) for m in pool])
    ce = F.cross_entropy(logits.double().mean(0), labels.repeat(crops), reduction="none").view(crops, -1)
    best_score, best_view = ce.min(0)
    keep = torch.argsort(best_score, stable=True)[: ipc * factor**2]
    tiles = views[best_view[keep], keep]
    out = tiles if factor == 1 else mosaic(tiles, factor, height, width)
    return out, best_score[keep].view(factor**2, ipc).mean(0), keep


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier whose input could serve as its feature")
    return linears[-1]


@torch.no_grad()
def pool_features(pool: Sequence[nn.Module], images: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """[N, D] float64: each model's penultimate feature (the input of its last nn.Linear), L2-normalised
    per model so every teacher weighs the same, concatenated over the pool."""
    parts = []
    for model in pool:
        captured: list[torch.Tensor] = []
        handle = _last_linear(model).register_forward_pre_hook(lambda _m, inp: captured.append(inp[0].flatten(1)))
        try:
            for i in range(0, len(images), chunk):
                model(images[i : i + chunk])
        finally:
            handle.remove()
        parts.append(F.normalize(torch.cat(captured).double(), dim=1))
    return torch.cat(parts, dim=1)


def kmeans(points: torch.Tensor, k: int, gen: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """[N] cluster index per point: Lloyd's algorithm from a k-means++ start (deterministic for ``gen``);
    an emptied cluster is re-seeded with the point farthest from its centre."""
    n = len(points)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= {n} points, got k={k}")
    centres = [points[int(torch.randint(n, (1,), generator=gen))]]
    for _ in range(1, k):
        d2 = torch.cdist(points, torch.stack(centres)).pow(2).min(1).values
        pick = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen)) if d2.sum() > 0 else int(torch.randint(n, (1,), generator=gen))
        centres.append(points[pick])
    centre = torch.stack(centres)
    assign = torch.cdist(points, centre).argmin(1)
    for _ in range(iterations):
        for c in range(k):
            members = assign == c
            if members.any():
                centre[c] = points[members].mean(0)
            else:
                centre[c] = points[torch.cdist(points, centre).min(1).values.argmax()]
        new = torch.cdist(points, centre).argmin(1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


def choose(scores: torch.Tensor, ipc: int, rule: str, features: torch.Tensor | None = None,
           gen: torch.Generator | None = None) -> torch.Tensor:
    """Positions of the IPC kept candidates of one class, in ascending score order."""
    if rule == "confidence":
        return torch.argsort(scores, stable=True)[:ipc]
    if rule != "diverse":
        raise ValueError(f"select rule must be one of {SELECT_RULES}, got {rule!r}")
    assign = kmeans(features, ipc, gen)
    kept = []
    for c in range(ipc):
        members = (assign == c).nonzero().flatten()
        if len(members):
            kept.append(int(members[torch.argmin(scores[members])]))
    rest = [int(i) for i in torch.argsort(scores, stable=True) if int(i) not in kept]
    kept += rest[: ipc - len(kept)]  # only if a cluster stayed empty (duplicate points)
    kept_t = torch.tensor(kept)
    return kept_t[torch.argsort(scores[kept_t], stable=True)]


def select_real(pool: Sequence[nn.Module], train_images: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
                ipc: int, candidates: int, seed: int, rule: str = "confidence", crops: int = 5,
                crop_scale: tuple[float, float] = (0.08, 1.0), factor: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class-major selected images [num_classes·IPC, C, H, W] (normalised, like ``train_images``: what the pool
    consumes), their scores, and the training indices they come from ([num_classes·IPC·f²] for ``rded``, tile k of
    a class's image t at k·IPC + t within the class's block; [num_classes·IPC] otherwise)."""
    if factor < 1 or (factor > 1 and rule != "rded"):
        raise ValueError(f"--mosaic-factor {factor}: must be >= 1, and > 1 only with --select-rule rded")
    keep_per_class = ipc * factor**2 if rule == "rded" else ipc
    if candidates < keep_per_class:
        raise ValueError(f"--candidates must be >= --ipc{' x factor²' if factor > 1 else ''} (keep {keep_per_class} of the "
                         f"candidates per class), got {candidates} < {keep_per_class}")
    if crops < 1:
        raise ValueError(f"--select-crops must be >= 1, got {crops}")
    cand = class_candidates(train_labels, num_classes, candidates, seed)
    for k, members in enumerate(cand):
        if len(members) < ipc:
            raise ValueError(f"class {k} has only {len(members)} training images; cannot keep IPC={ipc}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919)
    chosen, chosen_scores, sources = [], [], []
    for k in progress(range(num_classes), desc=f"select {ipc} of {candidates} real images per class ({rule})"):
        images = train_images[cand[k]]
        if rule == "rded":
            picked, scores, keep = rded_select(pool, images, train_labels[cand[k]], ipc, crops, factor, gen)
            chosen.append(picked)
            chosen_scores.append(scores)
            sources.append(cand[k][keep])
            continue
        scores = pool_scores(pool, images, train_labels[cand[k]], crops, gen, crop_scale)
        features = pool_features(pool, images) if rule == "diverse" else None
        keep = choose(scores, ipc, rule, features, gen)
        chosen.append(images[keep])
        chosen_scores.append(scores[keep])
        sources.append(cand[k][keep])
    return torch.cat(chosen), torch.cat(chosen_scores), torch.cat(sources)
