"""The random real-subset baseline: IPC images per class drawn uniformly without replacement."""
from __future__ import annotations

import argparse

import torch

from ddfast.data import Dataset
from ddfast.methods import DistillResult
from ddfast.selection import class_candidates

NAME = "random"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    """The random baseline has no options of its own."""


def select(labels: torch.Tensor, num_classes: int, ipc: int, seed: int) -> torch.Tensor:
    """Indices of a class-balanced random subset, class-major (class 0's images first): the first IPC
    of each class's seeded permutation (``ddfast.selection.class_candidates``)."""
    chosen = class_candidates(labels, num_classes, ipc, seed)
    for k, members in enumerate(chosen):
        if len(members) < ipc:
            raise ValueError(f"class {k} has only {int((labels == k).sum())} training images; cannot draw IPC={ipc}")
    return torch.cat(chosen)


def distill(args: argparse.Namespace, dataset: Dataset) -> DistillResult:
    idx = select(dataset.train_labels, dataset.num_classes, args.ipc, args.seed)
    return DistillResult(images=dataset.normalize(dataset.train_images[idx]), labels=dataset.train_labels[idx].clone())
