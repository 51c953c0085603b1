"""Judge a generator or a distilled set by a classifier trained on the real training set.

``python -m ddfast.judge runs/x/distilled.pt`` (or ``... runs/x/generator.pt --ipc 10``) prints, and with
``--json`` writes, two numbers a generative DD method is only as good as:

* **class consistency**: the judge's accuracy on the set (overall and per class): does an image of class y
  look like class y to a classifier trained on real data? Real images score about the judge's test accuracy;
  a generator that ignores its class input scores chance.
* **within-class diversity**: per class, the mean pairwise Euclidean distance between the judge's unit-normalised
  penultimate features (the input of its last ``nn.Linear``), averaged over classes; 0 for a set whose images of
  a class are all the same, at most 2. Printed beside the same number for a class-balanced random real subset
  (:data:`REAL_PER_CLASS` images per class, training split), which is what "diverse" means on that dataset.

The judge is a ConvNet-D3 (width :data:`JUDGE_WIDTH`, :data:`JUDGE_EPOCHS` epochs on every training image, the
teacher recipe of ``ddfast.train.get_teacher``), trained once per dataset and cached with the teachers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ddfast import data, generators, io
from ddfast.selection import class_candidates, pool_features
from ddfast.train import get_teacher
from ddfast.utils import freeze

JUDGE_MODEL, JUDGE_WIDTH, JUDGE_EPOCHS = "convnet", 64, 3
REAL_PER_CLASS = 100
CURVE_PER_CLASS = 20  # samples per class behind each point of a pretraining curve


def get_judge(dataset: data.Dataset) -> tuple[nn.Module, float]:
    """The dataset's judge in eval mode (trained on first use, then read from the teacher cache) and its test accuracy."""
    model, acc = get_teacher(dataset, JUDGE_MODEL, JUDGE_WIDTH, JUDGE_EPOCHS, seed=0)
    freeze(model, True)
    return model.eval(), acc


@torch.no_grad()
def class_consistency(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      batch_size: int = 500) -> tuple[float, list[float | None]]:
    """(% of images the judge assigns to their label, the same per class; None for a class with no image).
    ``images`` are in the dataset's normalisation."""
    pred = torch.cat([judge(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    hit = (pred == labels).double()
    per_class = [100.0 * float(hit[labels == k].mean()) if bool((labels == k).any()) else None for k in range(num_classes)]
    return 100.0 * float(hit.mean()), per_class


def within_class_diversity(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float | None:
    """Mean over classes (with ≥ 2 images) of the mean pairwise distance between unit-normalised judge features;
    None when no class has two images."""
    features = pool_features([judge], images)
    spreads = []
    for k in range(num_classes):
        f = features[labels == k]
        if len(f) >= 2:
            d = torch.cdist(f, f)
            spreads.append(float(d.sum() / (len(f) * (len(f) - 1))))
    return sum(spreads) / len(spreads) if spreads else None


def real_reference(dataset: data.Dataset, per_class: int = REAL_PER_CLASS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-balanced random real subset of the training split (normalised images, labels)."""
    idx = torch.cat(class_candidates(dataset.train_labels, dataset.num_classes, per_class, seed))
    return dataset.normalize(dataset.train_images[idx]), dataset.train_labels[idx]


def judge_set(dataset: data.Dataset, images: torch.Tensor, labels: torch.Tensor,
              judge: tuple[nn.Module, float] | None = None) -> dict[str, Any]:
    """Class consistency and within-class diversity of ``images`` (normalised) beside the real subset's diversity."""
    model, acc = judge or get_judge(dataset)
    consistency, per_class = class_consistency(model, images, labels, dataset.num_classes)
    real_images, real_labels = real_reference(dataset)
    return {"consistency": consistency, "consistency_per_class": per_class,
            "diversity": within_class_diversity(model, images, labels, dataset.num_classes),
            "real_diversity": within_class_diversity(model, real_images, real_labels, dataset.num_classes),
            "judge": {"model": JUDGE_MODEL, "width": JUDGE_WIDTH, "epochs": JUDGE_EPOCHS, "test_acc": acc}}


def curve_point(pair: tuple[nn.Module, float], generator: nn.Module, dataset: data.Dataset, iteration: int) -> dict[str, Any]:
    """A point of a generator's training curve: consistency and diversity of :data:`CURVE_PER_CLASS` samples per class
    (latent seed 0, eval mode; neither the generator nor any random stream is touched, so training is unchanged)."""
    images, labels = generators.sample(generator, dataset.num_classes, CURVE_PER_CLASS, 0, dataset.mean, dataset.std)
    consistency, _ = class_consistency(pair[0], images, labels, dataset.num_classes)
    return {"iteration": iteration, "consistency": consistency,
            "diversity": within_class_diversity(pair[0], images, labels, dataset.num_classes)}


def describe(metrics: dict[str, Any]) -> str:
    """One line: consistency, diversity beside the real subset's, and the judge."""
    div = metrics["diversity"]
    div_text = "n/a (one image per class)" if div is None else f"{div:.3f}"
    j = metrics["judge"]
    return (f"class consistency {metrics['consistency']:.2f}% | within-class diversity {div_text} "
            f"(real subset {metrics['real_diversity']:.3f}) | judge {j['model']} w{j['width']} e{j['epochs']}, "
            f"test {j['test_acc']:.2f}%")


def _is_generator(path: str) -> bool:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unreadable: io.load names the problem
        return False
    return isinstance(blob, dict) and blob.get("format") == generators.FORMAT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddfast.judge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="a distilled set (distilled.pt) or a generator (generator.pt) written by ddfast")
    parser.add_argument("--ipc", type=int, default=10, help="images per class sampled from a generator (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a generator's latents (default 0)")
    parser.add_argument("--dataset", default=None, help="dataset (default: the one recorded in the file)")
    parser.add_argument("--data-dir", default=None, help="dataset location (default: $DDFAST_DATA_DIR or the standard path)")
    parser.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.ipc < 1:
            raise ValueError(f"--ipc must be >= 1, got {args.ipc}")
        if _is_generator(args.file):
            generator, meta = generators.load(args.file)
            dataset = data.load(args.dataset or meta.get("dataset"), args.data_dir)
            images, labels = generators.sample(generator, dataset.num_classes, args.ipc, args.seed, dataset.mean, dataset.std)
        else:
            synset = io.load(args.file)
            dataset = data.load(args.dataset or synset["meta"].get("dataset"), args.data_dir)
            images, labels = synset["images"], synset["labels"]
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = judge_set(dataset, images.float(), labels)
    print(f"{args.file}: {describe(metrics)}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
