"""ddfast: fast kernels and whole pipelines for dataset distillation."""
from ddfast._version import __version__
from ddfast.backend import select_backend, use_backend

__all__ = ["__version__", "select_backend", "use_backend"]
from ddfast.stat_matcher import StatMatcher  # noqa: E402

__all__ += ["StatMatcher"]
