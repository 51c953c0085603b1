"""Small shared utilities: atomic file writes, seeding, progress bars, PNG grids, cache paths."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import struct
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed over ``path``,
    so a killed process leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar on stderr; silenced by ``DDFAST_NO_PROGRESS=1`` (tests, logs)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", os.environ.get("DDFAST_NO_PROGRESS") == "1")
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, **kwargs)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> None:
    # Memory freed earlier (e.g. by teacher training) stays in glibc's heap or ddfast's buffer cache
    # and would be reused without raising RSS; hand it back first so the high-water mark measures
    # the code inside.
    from ddfast.backend import cpu_buffer_cache_mb, set_cpu_buffer_cache

    limit, _ = cpu_buffer_cache_mb()
    set_cpu_buffer_cache(0)
    set_cpu_buffer_cache(limit)
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak extra resident memory (MB) of the code inside ``with PeakMemory() as peak:``.

    CPU: the rise of the RSS high-water mark (reset through /proc/self/clear_refs) over the RSS at
    entry; CUDA: ``max_memory_allocated`` over the allocation at entry. ``peak.mb`` is None where
    neither is available (no /proc)."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")
        self.mb: float | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            _release_free_heap()
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._base = _status_kb("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
        elif self._base is not None:
            self.mb = max(0, _status_kb("VmHWM") - self._base) / 1024


def cache_dir() -> Path:
    """Root of ddfast's caches (teachers, statistics): ``$DDFAST_CACHE_DIR`` or ~/.cache/ddfast."""
    root = os.environ.get("DDFAST_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ddfast"
    )
    return Path(root)


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> None:
    """Write an 8-bit grayscale [H, W] or RGB [H, W, 3] array as PNG (no imaging library needed)."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"write_png expects uint8 [H, W] or [H, W, 3], got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.reshape(height, -1)
    raw = b"".join(b"\x00" + rows[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(png)


def image_grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, max_per_class: int = 20, pad: int = 2) -> np.ndarray:
    """Tile [N, C, H, W] images in [0, 1] into one uint8 picture, one row per class."""
    n, c, h, w = images.shape
    per_class = [images[labels == k][:max_per_class] for k in range(num_classes)]
    cols = max(1, max(len(p) for p in per_class))
    grid = np.full(((h + pad) * num_classes + pad, (w + pad) * cols + pad, c), 255, dtype=np.uint8)
    for row, block in enumerate(per_class):
        pixels = (block.detach().float().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for col, img in enumerate(pixels):
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            grid[y : y + h, x : x + w] = img
    return grid[:, :, 0] if c == 1 else grid[:, :, :3]


def freeze(module: torch.nn.Module, frozen: bool) -> None:
    """Turn ``requires_grad`` off (``frozen``) or on for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(not frozen)
