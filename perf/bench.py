"""Measurement helpers for ``pytest perf/``: timing percentiles, CPU peak memory, the results CSV.

Rows follow one schema (kernel, provider, mode, shape, metric, unit, p50, p20, p80, device, commit)
and are appended to perf/results/latest.csv and perf/results/latest.jsonl.
"""
from __future__ import annotations

import csv
import ctypes
import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddfast.utils import PeakMemory

RESULTS = Path(__file__).parent / "results"
COLUMNS = ("kernel", "provider", "mode", "shape", "metric", "unit", "p50", "p20", "p80", "device", "commit")

# glibc serves allocations above M_MMAP_THRESHOLD with fresh mmaps (page-faulted on first touch, unmapped
# on free). Timing runs at a fixed 32 MiB threshold, the ceiling glibc's dynamic threshold settles at in a
# long-running process, so every provider pays what it would pay inside a real run. Peak-memory calls
# lower it to 64 KiB so that the RSS high-water mark sees each allocation of the measured call.
M_MMAP_THRESHOLD = -3
TIMING_MMAP_THRESHOLD = 32 << 20
MEMORY_MMAP_THRESHOLD = 64 << 10
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def _mmap_threshold(nbytes: int) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, nbytes)


_mmap_threshold(TIMING_MMAP_THRESHOLD)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu:{platform.processor() or platform.machine()}x{torch.get_num_threads()}"


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20, min_seconds: float = 0.5) -> tuple[float, float, float]:
    """(p50, p20, p80) wall time in ms over at least ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < reps or (time.perf_counter() - start < min_seconds and len(samples) < 10 * reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(samples).quantile(torch.tensor([0.5, 0.2, 0.8])).tolist()
    return q[0], q[1], q[2]


def peak_mem_mb(fn: Callable[[], object]) -> float:
    """Peak extra memory of one call, in MB (see :class:`ddfast.utils.PeakMemory`)."""
    _mmap_threshold(MEMORY_MMAP_THRESHOLD)
    try:
        with PeakMemory("cuda" if torch.cuda.is_available() else "cpu") as peak:
            fn()
    finally:
        _mmap_threshold(TIMING_MMAP_THRESHOLD)
    return peak.mb


def copy_bandwidth_gbs(nbytes: int) -> float:
    """Measured read+write bandwidth of ``dst.copy_(src)`` for a buffer of ``nbytes`` (GB/s)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    p50, _, _ = time_ms(lambda: dst.copy_(src), reps=30)
    return 2 * nbytes / (p50 * 1e-3) / 1e9


def record(kernel: str, provider: str, mode: str, shape: str, metric: str, unit: str, values: tuple[float, float, float]) -> dict:
    """Append one row to the results CSV/JSONL and return it."""
    row = dict(zip(COLUMNS, (kernel, provider, mode, shape, metric, unit, *[round(v, 6) for v in values], device_name(), commit())))
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path = RESULTS / "latest.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)
    with open(RESULTS / "latest.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    return row
