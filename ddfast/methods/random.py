"""The random real-subset baseline: IPC images per class drawn uniformly without replacement."""
from __future__ import annotations

import argparse

import torch

from ddfast.data import Dataset
from ddfast.methods import DistillResult

NAME = "random"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    """The random baseline has no options of its own."""


def select(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """Indices of a class-balanced random subset, class-major (class 0's images first)."""
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for k in range(num_classes):
        pool = (labels == k).nonzero().flatten()
        if len(pool) < ipc:
            raise ValueError(f"class {k} has only {len(pool)} training images; cannot draw IPC={ipc}")
        chosen.append(pool[torch.randperm(len(pool), generator=gen)[:ipc]])
    return torch.cat(chosen)


def distill(args: argparse.Namespace, dataset: Dataset) -> DistillResult:
    idx = select(dataset.train_labels, dataset.num_classes, args.ipc, args.seed)
    return DistillResult(images=dataset.normalize(dataset.train_images[idx]), labels=dataset.train_labels[idx].clone())
