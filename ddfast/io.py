"""The distilled-set file: images, labels, optional soft labels and metadata in one file.

Stored with ``torch.save`` and read with ``torch.load(weights_only=True)``, whose restricted
unpickler only rebuilds tensors and plain containers, so loading never runs code from the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ddfast._version import __version__
from ddfast.utils import atomic_torch_save, image_grid, write_png

FORMAT = "ddfast-distilled-set"
FORMAT_VERSION = 1

_PLAIN_TYPES = (str, int, float, bool, type(None))


def check_plain(value: Any, where: str) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"metadata key {key!r} at {where} must be a string")
            check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN_TYPES):
        raise TypeError(f"metadata value at {where} has type {type(value).__name__}; use str/int/float/bool/None, lists or dicts")


def save(
    path: str | os.PathLike,
    images: torch.Tensor,
    labels: torch.Tensor,
    soft_labels: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write a distilled set atomically. ``images`` [N, C, H, W] float, ``labels`` int [N],
    ``soft_labels`` [N, num_classes] (teacher logits) or None, ``meta`` plain data only."""
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor [N={images.shape[0]}], got {labels.dtype} {tuple(labels.shape)}")
    if soft_labels is not None and (soft_labels.ndim != 2 or soft_labels.shape[0] != images.shape[0]):
        raise ValueError(f"soft_labels must be [N={images.shape[0]}, classes], got {tuple(soft_labels.shape)}")
    meta = dict(meta or {})
    meta.setdefault("ddfast_version", __version__)
    check_plain(meta, "meta")
    atomic_torch_save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "images": images.detach().cpu().float().contiguous(),
            "labels": labels.detach().cpu().long().contiguous(),
            "soft_labels": None if soft_labels is None else soft_labels.detach().cpu().float().contiguous(),
            "meta": meta,
        },
        path,
    )


def load_restricted(path: Path, what: str, expected: str) -> Any:
    """``torch.load`` with the restricted (``weights_only``) unpickler. A file it refuses -- corrupt, not a torch
    file, or one whose pickle would run code -- is reported as what it is, without torch's advice to retry with
    ``weights_only=False``: that would run whatever the file holds."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every refusal means the same to the user
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = lines[0] if lines else type(err).__name__
        if "Weights only load failed" in str(err):  # keep the refused item, drop torch's advice around it
            after = [i for i, line in enumerate(lines) if "WeightsUnpickler error" in line]
            detail = lines[after[0] + 1] if after and after[0] + 1 < len(lines) else "an object that is not a tensor or plain data"
            reason = f"the restricted unpickler refused {detail.split('. ')[0][:150]}"
        raise ValueError(f"{path} is not a valid {what}: {reason}. Expected {expected}. It was read with torch's restricted "
                         f"unpickler, so nothing in it was executed; do not load it with weights_only=False.") from None


def load_tagged(path: str | os.PathLike, what: str, expected: str, tag: str, version: int) -> dict[str, Any]:
    """A ddfast file's dict: present, readable by the restricted unpickler, carrying the format ``tag`` and a
    format version this ddfast reads; otherwise an error saying which."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    blob = load_restricted(path, what, expected)
    if not isinstance(blob, dict) or blob.get("format") != tag:
        raise ValueError(f"{path} is not a {what} (missing format tag {tag!r})")
    if blob.get("format_version", 0) > version:
        raise ValueError(f"{path} uses format version {blob['format_version']}; this ddfast reads up to {version}")
    return blob


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a distilled set: ``{"images", "labels", "soft_labels", "meta"}``."""
    blob = load_tagged(path, "ddfast distilled set", "a file written by ddfast.io.save (python -m ddfast.distill's OUT/distilled.pt)",
                       FORMAT, FORMAT_VERSION)
    return {key: blob[key] for key in ("images", "labels", "soft_labels", "meta")}


def save_grid(path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor, mean: Any, std: Any, num_classes: int) -> None:
    """PNG grid of normalised images (one row per class) for people to look at."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    pixels = images.detach().cpu().float() * std_t + mean_t
    write_png(path, image_grid(pixels, labels.cpu(), num_classes))


def compare(a: str | os.PathLike, b: str | os.PathLike) -> dict[str, float]:
    """How far two distilled sets' images are apart: relative L2 and max absolute difference
    (e.g. a ``--segment`` run against a whole-batch run). Labels must agree."""
    first, second = load(a), load(b)
    if not torch.equal(first["labels"], second["labels"]) or first["images"].shape != second["images"].shape:
        raise ValueError(f"{a} and {b} hold different label sets or image shapes")
    diff = second["images"] - first["images"]
    return {"relative_l2": float(diff.norm() / first["images"].norm()), "max_abs": float(diff.abs().max())}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ddfast.io", description="Inspect distilled-set files.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp_parser = sub.add_parser("compare", help="relative L2 and max |difference| between two sets' images")
    cmp_parser.add_argument("a")
    cmp_parser.add_argument("b")
    args = parser.parse_args(argv)
    try:
        result = compare(args.a, args.b)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"images: relative L2 difference {result['relative_l2']:.3e}, max |difference| {result['max_abs']:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
