"""``python -m ddfast.env_report``: what ddfast will run on here (versions, extension, backends, GPUs)."""
from __future__ import annotations

import platform
import sys

import torch

from ddfast import __version__, backend


def _gpu_lines() -> list[str]:
    try:
        import pynvml
    except ImportError:
        return ["NVML: nvidia-ml-py not installed"]
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
        return [f"GPU: no NVIDIA driver ({type(err).__name__}: {err})"]
    try:
        lines = [f"NVIDIA driver {pynvml.nvmlSystemGetDriverVersion()}"]
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            lines.append(
                f"GPU {i}: {pynvml.nvmlDeviceGetName(handle)}, sm_{major}{minor}, "
                f"{memory.total / 2**30:.1f} GiB ({memory.used / 2**30:.1f} GiB used)"
            )
        return lines
    finally:
        pynvml.nvmlShutdown()


def report() -> str:
    lines = [
        f"ddfast {__version__}",
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; cuda available: {torch.cuda.is_available()}; "
        f"intra-op threads: {torch.get_num_threads()})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (interpreter mode: TRITON_INTERPRET=1)" if backend.triton_interpreting() else ""))
    except ImportError:
        lines.append("triton: not installed (CUDA tensors fall back to the reference backend)")
    ext = backend.cpu_extension()
    if ext is None:
        lines.append("ddfast._C: NOT built (CPU ops use the slow reference backend)")
    else:
        lines.append(f"ddfast._C: built ({ext.__file__}); OpenMP {'on' if ext.openmp_enabled() else 'off'}, {ext.num_threads()} threads")
    forced = backend.requested_backend()
    lines.append(f"backend override: {forced or 'none'} (${backend.ENV_VAR})")
    for device in ("cpu", "cuda"):
        try:
            lines.append(f"active backend on {device}: {backend.select_backend(device)}")
        except RuntimeError as err:
            lines.append(f"active backend on {device}: unavailable ({err})")
    lines.extend(_gpu_lines())
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
