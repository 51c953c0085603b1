"""Test-suite set-up. Triton kernels run on CPU tensors through Triton's interpreter, which is
chosen when a kernel is decorated, so the variable must be set before any kernel module loads."""
import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DDFAST_NO_PROGRESS", "1")


@pytest.fixture(scope="module")
def module_cache_dir(tmp_path_factory):
    """One fresh ddfast cache per test module (teachers, statistics trained once per module);
    use with ``pytestmark = pytest.mark.usefixtures("module_cache_dir")``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DDFAST_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()
