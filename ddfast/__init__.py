"""ddfast: fast kernels and whole pipelines for dataset distillation."""
from ddfast._version import __version__
from ddfast.backend import cpu_buffer_cache_mb, select_backend, set_cpu_buffer_cache, use_backend

__all__ = ["__version__", "cpu_buffer_cache_mb", "select_backend", "set_cpu_buffer_cache", "use_backend"]
from ddfast.stat_matcher import StatMatcher  # noqa: E402

__all__ += ["StatMatcher"]
