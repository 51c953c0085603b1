"""K4 benchmark: APM's image-update loss head, forward + backward to the logits z, on CPU.

Providers, side by side in one run (kernel "apm_loss", mode "fwd_bwd"), all from z [K+1, n, C]
(z[0] teacher logits, z[1:] K checkpoint logits, a leaf that requires grad) and labels [n]:
  ddfast        — ddfast.ops.apm_loss on the cpu backend (ddfast._C: one pass over the samples, dz
                  computed in the same call; backward only scales it);
  official      — the official APM code's way, eagerly: for each checkpoint −(n/B)·F.l1_loss(s_k, t),
                  summed, plus (n/B)·α·F.cross_entropy(t, y), then autograd;
  torch_compile — torch.compile of the reference (ddfast/reference/apm_loss.py: apm_loss), compiled
                  once per case before timing.
Shapes: K = 5 checkpoints, C = 10 classes with n = 100 and 1000 samples, C = 1000 with n = 256
(B = n, α = 0.1, the official φ = −d/C). Times are medians over repeated calls (the machine is
shared: ratios measured in one run are what counts).

    .venv/bin/python -m pytest perf/test_apm_loss.py -q -s
"""
import pytest
import torch
import torch.nn.functional as F

from bench import peak_mem_mb, record, time_ms
from ddfast.backend import use_backend
from ddfast.ops import apm_loss
from ddfast.reference.apm_loss import apm_loss as reference_loss

CASES = {  # name: (K, n, C)
    "c10-n100": (5, 100, 10),
    "c10-n1000": (5, 1000, 10),
    "c1000-n256": (5, 256, 1000),
}
ALPHA = 0.1
_table: list[tuple] = []


def official_loss(z: torch.Tensor, labels: torch.Tensor, batch: float, alpha: float = ALPHA) -> torch.Tensor:
    """The official APM image loss on stacked logits: −Σ_k (n/B)·l1_loss(s_k, t) + (n/B)·α·CE(t, y)."""
    t, n = z[0], z.shape[1]
    loss = 0.0
    for k in range(1, z.shape[0]):
        loss = loss - (n / batch) * F.l1_loss(z[k], t)
    return loss + (n / batch) * alpha * F.cross_entropy(t, labels)


def _inputs(K: int, n: int, C: int):
    gen = torch.Generator().manual_seed(0)
    t = 2.0 * torch.randn(n, C, generator=gen)
    s = t + 0.5 * torch.randn(K, n, C, generator=gen)
    z = torch.cat([t[None], s]).requires_grad_(True)
    return z, torch.randint(0, C, (n,), generator=gen)


@pytest.mark.parametrize("case", list(CASES))
def test_apm_loss_fwd_bwd(case):
    K, n, C = CASES[case]
    z, labels = _inputs(K, n, C)
    batch = float(n)
    shape = f"{case}: K{K} [{K + 1},{n},{C}]"

    def ddfast():
        with use_backend("cpu"):
            loss = apm_loss(z, labels, batch_size=batch, alpha=ALPHA)
        loss.backward()
        return loss

    def official():
        loss = official_loss(z, labels, batch)
        loss.backward()
        return loss

    compiled_loss = torch.compile(reference_loss)

    def torch_compile():
        loss = compiled_loss(z, labels, batch, ALPHA)
        loss.backward()
        return loss

    providers = {"ddfast": ddfast, "official": official, "torch_compile": torch_compile}
    losses, grads = {}, {}
    for name, fn in providers.items():
        z.grad = None
        losses[name] = float(fn().detach())
        grads[name] = z.grad.clone()
    for name in ("ddfast", "torch_compile"):
        assert abs(losses[name] - losses["official"]) <= 1e-5 * abs(losses["official"]) + 1e-6, losses
        scale = float(grads["official"].abs().max())
        assert float((grads[name] - grads["official"]).abs().max()) <= 1e-5 * scale, name

    times, mems = {}, {}
    for name, fn in providers.items():
        def step(fn=fn):
            z.grad = None
            return fn()

        times[name] = time_ms(step, warmup=5, reps=50, min_seconds=0.5)
        record("apm_loss", name, "fwd_bwd", shape, "time", "ms", times[name])
        mem = peak_mem_mb(step)
        mems[name] = mem
        record("apm_loss", name, "fwd_bwd", shape, "peak_mem", "MB", (mem, mem, mem))

    vs_off = times["official"][0] / times["ddfast"][0]
    vs_compile = times["torch_compile"][0] / times["ddfast"][0]
    _table.append((shape, times, mems, vs_off, vs_compile))
    print(f"\napm_loss {shape}: ddfast {times['ddfast'][0]:.3f} ms, official {times['official'][0]:.3f} ms, "
          f"torch.compile {times['torch_compile'][0]:.3f} ms | {vs_off:.1f}x vs official, {vs_compile:.1f}x vs compile")
    if case == list(CASES)[-1]:
        _print_table()
    assert vs_off > 1.0, f"ddfast slower than the official eager loss ({vs_off:.2f}x)"


def _print_table() -> None:
    head = (f"{'case':<30} {'ddfast ms':>9} {'official ms':>11} {'compile ms':>10} {'x official':>10} "
            f"{'x compile':>9} {'MB d/o/c':>12}")
    print("\n" + head + "\n" + "-" * len(head))
    for shape, t, m, vs_off, vs_compile in _table:
        mem = "/".join(f"{m[p]:.1f}" for p in ("ddfast", "official", "torch_compile"))
        print(f"{shape:<30} {t['ddfast'][0]:>9.3f} {t['official'][0]:>11.3f} {t['torch_compile'][0]:>10.3f} "
              f"{vs_off:>10.1f} {vs_compile:>9.1f} {mem:>12}")
    print("(medians over repeated calls; x = speed-up of ddfast; MB = peak RSS rise per provider)")
