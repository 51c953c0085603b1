"""Shared verification helpers: compare an op with its float64 reference, and AOT-compile Triton
kernels for real GPU targets (sm_80, sm_90) without a GPU to read ptxas's register/spill report."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> str:
    """Where and by how much two tensors differ (the failure message of :func:`assert_close`)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    if a.shape != e.shape:
        return f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    finite = torch.isfinite(a) & torch.isfinite(e)
    nonfinite_mismatch = ~finite & ~((a == e) | (a.isnan() & e.isnan()))
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = (diff > atol + rtol * e.abs()) | nonfinite_mismatch
    lines = [
        f"{int(bad.sum())} of {a.numel()} elements outside atol={atol:g} rtol={rtol:g}",
        f"relative L2 error {rel_error(a, e):.3e}",
    ]
    if diff.numel():
        worst = int(diff.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        lines.append(
            f"largest |diff| {float(diff.flatten()[worst]):.3e} at index {idx}: "
            f"actual {float(a[idx]):.6g} expected {float(e[idx]):.6g}"
        )
    if nonfinite_mismatch.any():
        first = tuple(int(i) for i in nonfinite_mismatch.nonzero()[0])
        lines.append(f"non-finite mismatch at {first}: actual {float(a[first])} expected {float(e[first])}")
    return "\n".join(lines)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64 (absolute error when expected is zero)."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    denom = e.norm()
    err = (a - e).norm()
    return float(err / denom) if denom > 0 else float(err)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, name: str = "") -> None:
    """Elementwise ``|a − e| ≤ atol + rtol·|e|`` (NaN matches NaN); explains any failure."""
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    ok = a.shape == e.shape and bool(
        torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True).all()
    )
    if not ok:
        raise AssertionError(f"{name or 'tensor'} differs from reference:\n" + describe_mismatch(a, e, atol, rtol))


def _as_tuple(out: Any) -> tuple[torch.Tensor | None, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_against_reference(
    op: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: Sequence[Any],
    atol: float,
    rtol: float,
    check_grad: bool = True,
    seed: int = 0,
) -> None:
    """Run ``op`` on ``inputs`` as given (any dtype, layout, strides) and ``reference`` on float64
    copies; compare every output and, with random output cotangents, every input gradient."""
    op_inputs, ref_inputs = [], []
    for item in inputs:
        if isinstance(item, torch.Tensor) and item.is_floating_point():
            grad = check_grad and item.requires_grad
            op_inputs.append(item.detach().clone().requires_grad_(grad) if grad else item)
            ref_inputs.append(item.detach().to(torch.float64).requires_grad_(grad))
        else:
            op_inputs.append(item)
            ref_inputs.append(item)
    outs = _as_tuple(op(*op_inputs))
    refs = _as_tuple(reference(*ref_inputs))
    if len(outs) != len(refs):
        raise AssertionError(f"op returned {len(outs)} outputs, reference {len(refs)}")
    for i, (out, ref) in enumerate(zip(outs, refs)):
        if out is None or ref is None:
            if (out is None) != (ref is None):
                raise AssertionError(f"output {i}: one of op/reference returned None")
            continue
        assert_close(out, ref, atol, rtol, name=f"output {i}")
    if not check_grad:
        return
    grad_inputs = [(a, b) for a, b in zip(op_inputs, ref_inputs) if isinstance(a, torch.Tensor) and a.requires_grad]
    if not grad_inputs:
        return
    gen = torch.Generator().manual_seed(seed)
    pairs = [(o, r) for o, r in zip(outs, refs) if o is not None and o.requires_grad]
    cotangents = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for _, r in pairs]
    op_grads = torch.autograd.grad(
        [o for o, _ in pairs], [a for a, _ in grad_inputs],
        [c.to(o.dtype).to(o.device) for (o, _), c in zip(pairs, cotangents)], allow_unused=True,
    )
    ref_grads = torch.autograd.grad(
        [r for _, r in pairs], [b for _, b in grad_inputs], cotangents, allow_unused=True
    )
    for i, (g, rg) in enumerate(zip(op_grads, ref_grads)):
        if rg is None:
            continue
        if g is None:
            raise AssertionError(f"gradient of input {i}: op returned no gradient")
        assert_close(g, rg, atol, rtol, name=f"gradient of input {i}")


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    """ptxas's resource report for one kernel compiled for one architecture."""

    arch: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    shared_bytes: int
    log: str

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def _ptxas_binary(arch: int) -> str:
    from triton.backends.nvidia import compiler as nvidia_compiler

    return nvidia_compiler.get_ptxas(arch).path


@dataclasses.dataclass(frozen=True)
class AotRequest:
    """One ahead-of-time compilation: a ``@triton.jit`` kernel, its signature (Triton types such as
    ``"*fp32"``, ``"i32"``, ``"fp32"``, or ``"constexpr"``), constexpr values and target."""

    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    arch: int
    num_warps: int = 4


def aot_compile(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], arch: int, num_warps: int = 4) -> PtxasReport:
    """Compile a Triton kernel for ``sm_<arch>`` without a GPU or driver and return ptxas's
    register/spill report (see :func:`aot_compile_many`)."""
    return aot_compile_many([AotRequest(kernel, signature, constexprs, arch, num_warps)])[0]


def aot_compile_many(requests: Sequence[AotRequest]) -> list[PtxasReport]:
    """Compile every request; a failed compile raises RuntimeError naming the kernel.

    Under ``TRITON_INTERPRET=1`` this runs in one child process without the interpreter: compiling
    kernels that call triton.language's own jit helpers (tl.sum, tl.zeros, ...) in an interpreting
    process executes their interpreted versions, which patches triton.language for good."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return [_compile_here(r) for r in requests]
    payload = [
        {
            "file": inspect.getsourcefile(_python_fn(r.kernel)),
            "module": _python_fn(r.kernel).__module__,
            "name": _python_fn(r.kernel).__name__,
            "signature": r.signature,
            "constexprs": r.constexprs,
            "arch": r.arch,
            "num_warps": r.num_warps,
        }
        for r in requests
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "ddfast.testing"], input=json.dumps(payload), env=env,
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compilation failed:\n{proc.stderr[-4000:]}")
    return [PtxasReport(**fields) for fields in json.loads(proc.stdout.strip().splitlines()[-1])]


def _python_fn(kernel: Any) -> Callable[..., Any]:
    return kernel.fn  # both JITFunction and InterpretedFunction keep the Python function here


def _load_kernel(entry: dict[str, Any]) -> Any:
    directory = os.path.dirname(entry["file"])
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        module = importlib.import_module(entry["module"])
    except ImportError:
        spec = importlib.util.spec_from_file_location(entry["module"], entry["file"])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return getattr(module, entry["name"])


def _compile_here(request: AotRequest) -> PtxasReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    arch = request.arch
    name = _python_fn(request.kernel).__name__
    try:
        source = ASTSource(request.kernel, request.signature, request.constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": request.num_warps})
    except Exception as err:
        raise RuntimeError(f"Triton could not compile {name} for sm_{arch}: {err}") from err
    gpu_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "kernel.ptx")
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run(
            [_ptxas_binary(arch), "-v", f"--gpu-name={gpu_name}", ptx_path, "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True, check=False,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {name} on {gpu_name}:\n{log}")

    def grab(pattern: str) -> int:
        match = re.search(pattern, log)
        return int(match.group(1)) if match else 0

    return PtxasReport(
        arch=arch,
        registers=grab(r"Used (\d+) registers"),
        spill_stores=grab(r"(\d+) bytes spill stores"),
        spill_loads=grab(r"(\d+) bytes spill loads"),
        stack_bytes=grab(r"(\d+) bytes stack frame"),
        shared_bytes=grab(r"(\d+) bytes smem"),
        log=log,
    )


def sigkill_after_checkpoint(cmd: Sequence[str], checkpoint: str | os.PathLike, at_least: int = 1, timeout: float = 900.0,
                             env: dict[str, str] | None = None) -> int:
    """Start ``cmd`` and SIGKILL it once ``checkpoint`` exists and records ``iteration >= at_least``; the
    checkpoint's iteration at the kill. The file is replaced atomically, so a read that races a rename
    is retried."""
    import signal
    import time

    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    seen = None  # the checkpoint is read only when it changes: polling must not slow the run it watches
    try:
        while proc.poll() is None and time.time() < deadline:
            try:
                stamp = os.stat(checkpoint).st_mtime_ns
                if stamp != seen and torch.load(checkpoint, weights_only=True)["iteration"] >= at_least:
                    break
                seen = stamp
            except Exception:  # noqa: BLE001 - no checkpoint yet, or a read racing the atomic rename
                pass
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"the run ended (exit {proc.returncode}) before a checkpoint at iteration >= {at_least}: {' '.join(cmd)}")
    return int(torch.load(checkpoint, weights_only=True)["iteration"])


def assert_resumed_speed(resumed: dict[str, Any], whole: dict[str, Any], tolerance: float = 1e-9) -> None:
    """A resumed run's ``seconds_per_iteration`` (time before the kill + after the resume, over all
    iterations) within ``tolerance`` of the uninterrupted run's: with the :class:`SteppingClock` on both sides the
    two are equal unless time is lost or counted twice across the resume."""
    a, b = resumed["seconds_per_iteration"], whole["seconds_per_iteration"]
    if not abs(a - b) <= tolerance * b:
        raise AssertionError(f"resumed run: {a:.4g} s/iteration, uninterrupted: {b:.4g} (off by {a / b - 1:+.0%}, limit ±{tolerance:.0%})")


class SteppingClock:
    """Stands in for the ``time`` module of ``ddfast.runner``: every reading is 1 s after the previous one, so every
    loop step costs exactly 1 s. Timing across a SIGKILL and a resume is then checked exactly, free of the
    warm-up and load noise that dominate millisecond test iterations (measured: ±30-50% between two identical runs)."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        self.now += 1.0
        return self.now


STEPPING_DISTILL = [sys.executable, "-m", "ddfast.testing", "distill-with-stepping-clock"]  # + distill's arguments


def run_distill(argv: Sequence[str], out: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """``ddfast.distill ARGV --out OUT`` in a fresh process with the :class:`SteppingClock`: (the distilled file's
    dict, report.json), the uninterrupted run a resumed one is compared with."""
    proc = subprocess.run([*STEPPING_DISTILL, *argv, "--out", str(out)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"ddfast.distill {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return torch.load(os.path.join(out, "distilled.pt"), weights_only=True), report


if __name__ == "__main__":
    if sys.argv[1:2] == ["distill-with-stepping-clock"]:  # run_distill and the killed runs of the SIGKILL tests
        from ddfast import distill, runner

        runner.time = SteppingClock()
        sys.exit(distill.main(sys.argv[2:]))
    # the child process of aot_compile_many
    entries = json.loads(sys.stdin.read())
    reports = [
        _compile_here(AotRequest(_load_kernel(e), e["signature"], e["constexprs"], e["arch"], e["num_warps"]))
        for e in entries
    ]
    print(json.dumps([dataclasses.asdict(r) for r in reports]))
