"""Distillation methods. Each module exposes ``NAME``, ``add_arguments(parser)`` and
``distill(args, dataset) -> DistillResult``; ``ddfast.distill`` is the CLI over them."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class DistillResult:
    images: torch.Tensor  # normalised [N, C, H, W], what models consume
    labels: torch.Tensor  # int64 [N]
    soft_labels: torch.Tensor | None = None  # teacher logits [N, classes]
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)  # timings etc. for report.json
    # The random real subset of the same IPC, labelled the way this method labels (same teachers):
    # the baseline "under the same protocol", evaluated and saved beside the distilled set.
    baseline: DistillResult | None = None
    # What the baseline is: "random" (the random real subset) or e.g. "pretrained generator" (D2M).
    baseline_name: str = "random"
    # The teacher pool that labels this set (``ddfast.train.teacher_spec`` dicts): the relabel
    # ("fkd") evaluation recipe rebuilds it from the teacher cache.
    teachers: list[dict[str, Any]] | None = None
    # The evaluation label mode the method's soft labels are meant for when --labels is not given
    # (None: "soft"); APM's are logits for an L1 loss ("l1").
    label_mode: str | None = None
