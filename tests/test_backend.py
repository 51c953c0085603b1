"""Backend dispatch (DESIGN §3) and the compiled extension."""
import importlib
import warnings

import pytest
import torch

from ddfast import backend


def test_cpu_extension_is_built():
    # CI must fail when ddfast._C was not compiled: the fallback would hide a slow CPU path.
    ext = importlib.import_module("ddfast._C")
    assert ext.openmp_enabled()
    assert ext.num_threads() >= 1


def test_default_choice_follows_device(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.select_backend("cpu") == "cpu"
    assert backend.select_backend("cuda") == ("triton" if backend.triton_available() else "reference")


@pytest.mark.parametrize("name", ["reference", "cpu"])
def test_env_override(monkeypatch, name):
    monkeypatch.setenv(backend.ENV_VAR, name)
    assert backend.select_backend("cpu") == name


def test_triton_override_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.select_backend("cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.select_backend("cpu")


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'.*reference, cpu, triton"):
        backend.select_backend("cpu")


def test_use_backend_context_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    with backend.use_backend("reference"):
        assert backend.select_backend("cpu") == "reference"
        with backend.use_backend(None):
            assert backend.select_backend("cpu") == "cpu"
    assert backend.select_backend("cpu") == "cpu"


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    real_import = importlib.import_module

    def fake_import(name, *args):
        if name == "ddfast._C":
            raise ImportError("simulated missing build")
        return real_import(name, *args)

    monkeypatch.setattr(backend.importlib, "import_module", fake_import)
    monkeypatch.setattr(backend, "_missing_extension_warned", False)
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.select_backend("cpu") == "reference"
        assert backend.select_backend(torch.device("cpu")) == "reference"
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "simulated missing build" in messages[0]


def test_env_report_runs():
    from ddfast.env_report import report

    text = report()
    assert "torch 2.13.0" in text
    assert "ddfast._C: built" in text
    assert "active backend on cpu: cpu" in text
    # No GPU on this machine or in CI: the report must say so plainly rather than crash.
    if not torch.cuda.is_available():
        assert "no NVIDIA driver" in text or "nvidia-ml-py not installed" in text


@pytest.fixture
def buffer_cache():
    limit, _ = backend.cpu_buffer_cache_mb()
    yield
    backend.set_cpu_buffer_cache(limit)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_buffer_cache_reuses_freed_outputs(buffer_cache, memory_format):
    from ddfast.ops import moments

    backend.set_cpu_buffer_cache(0)
    backend.set_cpu_buffer_cache(64)
    x = torch.randn(4, 16, 64, 64).to(memory_format=memory_format).requires_grad_(True)  # 1 MiB
    with backend.use_backend("cpu"):
        moments(x, 4)[1].sum().backward()
        first = x.grad
        assert first.is_contiguous(memory_format=memory_format) and torch.isfinite(first).all()
        ptr, expected = first.data_ptr(), first.clone()
        x.grad = first = None
        assert backend.cpu_buffer_cache_mb()[1] == 1.0
        moments(x, 4)[1].sum().backward()
    assert x.grad.data_ptr() == ptr  # the same pages again
    assert backend.cpu_buffer_cache_mb()[1] == 0.0
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)


def test_buffer_cache_limit_evicts_and_disables(buffer_cache):
    from ddfast.ops import moments

    backend.set_cpu_buffer_cache(1.5)
    with backend.use_backend("cpu"):
        grads = []
        for _ in range(2):  # two 1 MiB outputs alive at once, both freed: only one fits
            x = torch.randn(4, 16, 64, 64, requires_grad=True)
            moments(x, 4)[1].sum().backward()
            grads.append(x.grad)
        grads.clear()
        assert backend.cpu_buffer_cache_mb() == (1.5, 1.0)
        backend.set_cpu_buffer_cache(0)
        assert backend.cpu_buffer_cache_mb() == (0.0, 0.0)
        x = torch.randn(4, 16, 64, 64, requires_grad=True)
        moments(x, 4)[1].sum().backward()
        x.grad = None
        assert backend.cpu_buffer_cache_mb()[1] == 0.0
    with pytest.raises(ValueError, match="megabytes must be >= 0"):
        backend.set_cpu_buffer_cache(-1)
