"""The random real-subset baseline: IPC images per class drawn uniformly without replacement."""
from __future__ import annotations

import argparse

from ddfast.data import Dataset
from ddfast.methods import DistillResult
from ddfast.selection import class_balanced_subset

NAME = "random"


def add_arguments(parser: argparse._ArgumentGroup) -> None:
    """The random baseline has no options of its own."""


def distill(args: argparse.Namespace, dataset: Dataset) -> DistillResult:
    idx = class_balanced_subset(dataset.train_labels, dataset.num_classes, args.ipc, args.seed)
    return DistillResult(images=dataset.normalize(dataset.train_images[idx]), labels=dataset.train_labels[idx].clone())
