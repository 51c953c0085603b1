"""K3 benchmark: G-VBSM data-densification loss, forward + backward, on CPU.

Providers, side by side in one run (kernel "densify", mode "fwd_bwd"):
  ddfast    — ddfast.ops.densify_loss on the cpu backend (ddfast._C: all classes in one call,
              float64 eigensolves (LAPACK per class size, Jacobi below 9 images), the gradient
              computed in the same pass);
  official  — the G-VBSM code's way: a Python loop over the classes, general torch.linalg.eigvals
              per class Gram matrix (ddfast/reference/densify_official.py);
  reference — the batched pure-PyTorch version: one padded torch.linalg.eigvalsh + autograd
              (ddfast/reference/densify.py).
Shapes: (a) 10 classes x 10 images, (b) 100 x 10, both 3x32x32; (c) 10 x 50 at 3x64x64 (pooled to
32x32). Images are randn (a distillation's starting point); labels shuffled. Times are medians over
repeated calls (the machine is shared: ratios measured in one run are what counts). Acceptance: ddfast
>= 10x faster than official and >= 2x faster than reference on (b) and (c).

    .venv/bin/python -m pytest perf/test_densify.py -q -s
"""
import time

import pytest
import torch

from bench import peak_mem_mb, record, time_ms
from ddfast.backend import use_backend
from ddfast.ops import densify_loss
from ddfast.reference.densify import densify_loss as reference_loss
from ddfast.reference.densify_official import densify_loss_official

CASES = {  # name: (classes, images per class, C, H)
    "a": (10, 10, 3, 32),
    "b": (100, 10, 3, 32),
    "c": (10, 50, 3, 64),
}
ACCEPT = {"b", "c"}
_table: list[tuple] = []


def _inputs(classes: int, per_class: int, c: int, h: int):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(classes * per_class, c, h, h, generator=gen).requires_grad_(True)
    labels = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class, generator=gen)]
    return x, labels


def _reps(fn) -> tuple[int, int]:
    """(warmup, reps) so that a slow provider still finishes in a few seconds."""
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return (1, 5) if dt > 0.5 else ((2, 10) if dt > 0.05 else (3, 20))


@pytest.mark.parametrize("case", list(CASES))
def test_densify_fwd_bwd(case):
    classes, per_class, c, h = CASES[case]
    x, labels = _inputs(classes, per_class, c, h)
    shape = f"{case}:{classes}cls x{per_class} [{classes * per_class},{c},{h},{h}]"

    def ddfast():
        with use_backend("cpu"):
            loss = densify_loss(x, labels)
        loss.backward()
        return loss

    def official():
        loss = densify_loss_official(x, labels)
        loss.backward()
        return loss

    def reference():
        loss = reference_loss(x, labels)
        loss.backward()
        return loss

    providers = {"ddfast": ddfast, "official": official, "reference": reference}
    # the three agree (float32 inputs, float32 official/reference: loose check)
    losses = {}
    for name, fn in providers.items():
        x.grad = None
        losses[name] = float(fn().detach())
    scale = max(abs(losses["reference"]), 1e-3)
    assert abs(losses["ddfast"] - losses["reference"]) <= 1e-2 * scale + 1e-6, losses

    times, mems = {}, {}
    for name, fn in providers.items():
        def step(fn=fn):
            x.grad = None
            return fn()

        warmup, reps = _reps(step)
        times[name] = time_ms(step, warmup=warmup, reps=reps, min_seconds=0.2)
        record("densify", name, "fwd_bwd", shape, "time", "ms", times[name])
        mem = peak_mem_mb(step)
        mems[name] = mem
        record("densify", name, "fwd_bwd", shape, "peak_mem", "MB", (mem, mem, mem))

    vs_off = times["official"][0] / times["ddfast"][0]
    vs_ref = times["reference"][0] / times["ddfast"][0]
    _table.append((shape, times, mems, vs_off, vs_ref))
    print(f"\ndensify {shape}: ddfast {times['ddfast'][0]:.2f} ms, official {times['official'][0]:.1f} ms, "
          f"reference {times['reference'][0]:.1f} ms | {vs_off:.1f}x vs official, {vs_ref:.1f}x vs reference")
    if case == list(CASES)[-1]:
        _print_table()
    assert vs_off > 1.0 and vs_ref > 1.0
    if case in ACCEPT:
        assert vs_off >= 10.0, f"ddfast only {vs_off:.1f}x faster than the official loop"
        assert vs_ref >= 2.0, f"ddfast only {vs_ref:.1f}x faster than the batched-eigh reference"


def _print_table() -> None:
    head = (f"{'case':<34} {'ddfast ms':>10} {'official ms':>12} {'reference ms':>13} "
            f"{'x official':>10} {'x reference':>11} {'MB d/o/r':>16}")
    print("\n" + head + "\n" + "-" * len(head))
    for shape, t, m, vs_off, vs_ref in _table:
        mem = f"{m['ddfast']:.0f}/{m['official']:.0f}/{m['reference']:.0f}"
        print(f"{shape:<34} {t['ddfast'][0]:>10.2f} {t['official'][0]:>12.1f} {t['reference'][0]:>13.1f} "
              f"{vs_off:>10.1f} {vs_ref:>11.1f} {mem:>16}")
    print("(medians over repeated calls; x = speed-up of ddfast; MB = peak RSS rise ddfast/official/reference)")
