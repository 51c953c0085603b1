"""Backend dispatch (DESIGN §3).

Three backends implement every op: ``reference`` (pure PyTorch, the oracle), ``cpu`` (C++/OpenMP
in ``ddfast._C``) and ``triton`` (CUDA tensors; CPU tensors too under ``TRITON_INTERPRET=1``).
The tensor's device picks the default; ``DDFAST_BACKEND`` or :func:`use_backend` override it.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading
import warnings
from collections.abc import Iterator
from types import ModuleType

import torch

BACKENDS = ("reference", "cpu", "triton")
ENV_VAR = "DDFAST_BACKEND"

_override = threading.local()
_missing_extension_warned = False


def cpu_extension() -> ModuleType | None:
    """The compiled ``ddfast._C`` module, or None (with one warning) when it was not built."""
    global _missing_extension_warned
    try:
        return importlib.import_module("ddfast._C")
    except ImportError as err:
        if not _missing_extension_warned:
            _missing_extension_warned = True
            warnings.warn(
                f"ddfast._C is not built ({err}); CPU ops fall back to the slow reference backend. "
                "Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=2,
            )
        return None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _validate(name: str, origin: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r} from {origin}; choose one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str | None:
    """The backend forced by :func:`use_backend` or ``DDFAST_BACKEND``, if any."""
    forced = getattr(_override, "name", None)
    if forced is not None:
        return forced
    env = os.environ.get(ENV_VAR)
    return _validate(env, f"${ENV_VAR}") if env else None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for ops called inside the block (None restores automatic choice)."""
    previous = getattr(_override, "name", None)
    _override.name = _validate(name, "use_backend()") if name is not None else None
    try:
        yield
    finally:
        _override.name = previous


def select_backend(device: torch.device | str) -> str:
    """The backend an op on a tensor living on ``device`` runs with."""
    device = torch.device(device)
    choice = requested_backend()
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)"
            )
        return "triton"
    if choice == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"backend 'cpu' cannot run on {device.type} tensors")
        return "cpu" if cpu_extension() is not None else "reference"
    if choice == "reference":
        return "reference"
    if device.type == "cuda":
        return "triton" if triton_available() else "reference"
    if device.type == "cpu" and cpu_extension() is not None:
        return "cpu"
    return "reference"


def set_cpu_buffer_cache(megabytes: float) -> None:
    """Most MB of freed kernel outputs (K1's dx, K3's image gradient) the cpu backend keeps
    page-resident for reuse (csrc/buffer_cache.cpp): a fresh tens-of-MB output costs one page fault
    per 4 KiB on first touch, about a third of K1's forward+backward. 0 frees what is kept and turns
    the cache off. Default 256, or ``$DDFAST_CPU_BUFFER_CACHE_MB``."""
    if megabytes < 0:
        raise ValueError(f"set_cpu_buffer_cache: megabytes must be >= 0, got {megabytes}")
    ext = cpu_extension()
    if ext is not None:
        ext.set_buffer_cache_limit(int(megabytes * 2**20))


def cpu_buffer_cache_mb() -> tuple[float, float]:
    """(limit, held): the cache's limit and the MB of free buffers it keeps now ((0, 0) without ddfast._C)."""
    ext = cpu_extension()
    if ext is None:
        return 0.0, 0.0
    return ext.buffer_cache_limit() / 2**20, ext.buffer_cache_held() / 2**20
