"""DiM critic block benchmark: LayerNorm([C, H, W]) + per-position affine + LeakyReLU(0.01) on CPU,
forward, forward + backward, and the WGAN-GP pattern (forward, create_graph backward to the input,
backward of the penalty: the double backward).

Providers, side by side in one run (kernel "ln_lrelu", modes "fwd", "fwd_bwd", "gp"):
  ddfast        — ddfast.ops.LayerNormLeakyReLU on the cpu backend (ddfast._C: fused forward, backward
                  and closed-form double backward; saves only x and two scalars per sample);
  official      — DiM's critic block as its code builds it, eagerly: nn.LayerNorm([C, H, W]) then
                  nn.LeakyReLU(0.01) (PyTorch's LayerNorm double backward is ~36 % of the critic's GP pass);
  torch_compile — torch.compile of the reference composition (ddfast/reference/ln_lrelu.py: ln_lrelu),
                  compiled once per case before timing. AOTAutograd does not support double backward, so
                  it has no "gp" number (n/a).
Shapes: the DiM critic's blocks at widths 64 (--preset cpu) and 196 (the paper), [192, w, s, s] for
s = 28, 14, 7, 4 (192 = fake + real + interpolates of B = 64 in one batch). Inputs are leaves that
require grad, γ/β are parameters; the loss is Σ(y·c) with a fixed random c standing in for the next
layer's cotangent, and the GP is 10·((‖∂Σ(y·c)/∂x‖₂ − 1)²).mean() with its gradient to x, γ and β.

GB/s is each mode's bytes floor for the block over the ddfast time, beside the measured copy bandwidth
(S = the activation's bytes): fwd reads x and writes y (2S); fwd_bwd adds reading g, x and writing dx
(5S); gp adds the double backward reading u, g, x and writing dg, dx (10S). Times are medians over
repeated calls (the machine is shared: the ratios measured in one run are what counts).

    .venv/bin/python -m pytest perf/test_ln_lrelu.py -q -s
"""
import pytest
import torch
from torch import nn

from bench import copy_bandwidth_gbs, peak_mem_mb, record, time_ms
from ddfast.backend import use_backend
from ddfast.ops import LayerNormLeakyReLU
from ddfast.reference.ln_lrelu import ln_lrelu as reference_block

# 8 shapes × (no_grad, grad) graphs of one function: above dynamo's default recompile limit (8), past
# which it would silently run the reference eagerly; fail rather than time that.
torch._dynamo.config.recompile_limit = 64
torch._dynamo.config.fail_on_recompile_limit_hit = True

BATCH = 192
SHAPES = [(BATCH, w, s, s) for w in (64, 196) for s in (28, 14, 7, 4)]
MODES = ("fwd", "fwd_bwd", "gp")
FLOOR = {"fwd": 2, "fwd_bwd": 5, "gp": 10}  # bytes floor in units of the activation size
SLOPE, EPS = 0.01, 1e-5
_table: list[tuple] = []


def _reps(nbytes: int) -> tuple[int, int]:
    """(warmup, reps): fewer calls for the 118 MB activations (the official GP pass takes seconds there)."""
    return (1, 3) if nbytes > 50e6 else (2, 7) if nbytes > 10e6 else (3, 15)


def _run(mode: str, block, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if mode == "fwd":
        with torch.no_grad():
            return block(x)
    y = block(x)
    out = (y * c).sum()
    if mode == "fwd_bwd":
        out.backward()
        return out
    (gx,) = torch.autograd.grad(out, x, create_graph=True)
    penalty = 10 * ((gx.flatten(1).norm(dim=1) - 1) ** 2).mean()
    penalty.backward()
    return penalty


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ln_lrelu(shape):
    gen = torch.Generator().manual_seed(0)
    norm = list(shape[1:])
    x = (2 * torch.randn(shape, generator=gen) + 0.5).requires_grad_(True)
    c = torch.randn(shape, generator=gen)
    official = nn.Sequential(nn.LayerNorm(norm, eps=EPS), nn.LeakyReLU(SLOPE))
    with torch.no_grad():
        official[0].weight.copy_(1 + 0.5 * torch.randn(norm, generator=gen))
        official[0].bias.copy_(0.3 * torch.randn(norm, generator=gen))
    fused = LayerNormLeakyReLU(norm, SLOPE, EPS)
    fused.load_state_dict(official[0].state_dict())
    compiled_fn = torch.compile(reference_block)
    compiled = nn.Module()
    compiled.weight = nn.Parameter(official[0].weight.detach().clone())
    compiled.bias = nn.Parameter(official[0].bias.detach().clone())
    blocks = {
        "ddfast": fused,
        "official": official,
        "torch_compile": lambda t: compiled_fn(t, compiled.weight, compiled.bias, SLOPE, EPS),
    }
    params = {"ddfast": list(fused.parameters()), "official": list(official.parameters()),
              "torch_compile": [compiled.weight, compiled.bias]}
    shape_str = "[" + ",".join(map(str, shape)) + "]"
    nbytes = x.numel() * x.element_size()
    warmup, reps = _reps(nbytes)
    copy = copy_bandwidth_gbs(nbytes)

    def call(name: str, mode: str):
        x.grad = None
        for p in params[name]:
            p.grad = None
        with use_backend("cpu"):
            return _run(mode, blocks[name], x, c)

    times: dict = {}
    mems: dict = {}
    for mode in MODES:
        # agreement before timing (fp32 vs the official eager block; 1e-3: fp32 sums over up to 192·150k
        # terms in different orders; tests/test_ln_lrelu.py holds ddfast to 1e-5 against float64)
        results = {}
        for name in blocks:
            try:
                out = call(name, mode)
            except RuntimeError as err:  # torch.compile: no double backward
                assert name == "torch_compile" and mode == "gp", err
                continue
            grads = [] if mode == "fwd" else [x.grad.clone(), *(p.grad.clone() for p in params[name])]
            results[name] = [out.detach().clone(), *grads]
        for name, tensors in results.items():
            for got, want in zip(tensors, results["official"]):
                err = float((got - want).norm() / want.norm().clamp_min(1e-30))
                assert err <= 1e-3, (name, mode, err)
        for name in blocks:
            if name not in results:
                continue
            t = time_ms(lambda name=name: call(name, mode), warmup=warmup, reps=reps, min_seconds=0.3)
            times[(name, mode)] = t
            record("ln_lrelu", name, mode, shape_str, "time", "ms", t)
            mem = peak_mem_mb(lambda name=name: call(name, mode))
            mems[(name, mode)] = mem
            record("ln_lrelu", name, mode, shape_str, "peak_mem", "MB", (mem, mem, mem))
        gbs = FLOOR[mode] * nbytes / (times[("ddfast", mode)][0] * 1e-3) / 1e9
        record("ln_lrelu", "ddfast", mode, shape_str, "bandwidth", "GB/s", (gbs, gbs, gbs))
        vs_off = times[("official", mode)][0] / times[("ddfast", mode)][0]
        record("ln_lrelu", "ddfast", mode, shape_str, "speedup_vs_official", "x", (vs_off,) * 3)
        comp = times.get(("torch_compile", mode))
        vs_comp = comp[0] / times[("ddfast", mode)][0] if comp else None
        if vs_comp is not None:
            record("ln_lrelu", "ddfast", mode, shape_str, "speedup_vs_compile", "x", (vs_comp,) * 3)
        _table.append((shape_str, mode, times, mems, vs_off, vs_comp, gbs, copy))
        print(f"\nln_lrelu {shape_str} {mode}: ddfast {times[('ddfast', mode)][0]:.2f} ms, official "
              f"{times[('official', mode)][0]:.2f} ms, compile {comp[0] if comp else float('nan'):.2f} ms | "
              f"{vs_off:.2f}x vs official | {gbs:.1f} GB/s ({gbs / copy:.0%} of copy {copy:.1f} GB/s)")
    if shape == SHAPES[-1]:
        _print_table()
    assert times[("ddfast", "gp")][0] < times[("official", "gp")][0], "ddfast GP pass slower than the official block"


def _print_table() -> None:
    head = (f"{'shape':<18} {'mode':<8} {'ddfast ms':>9} {'official ms':>11} {'compile ms':>10} {'x official':>10} "
            f"{'x compile':>9} {'GB/s':>6} {'% copy':>6} {'MB d/o/c':>17}")
    print("\n" + head + "\n" + "-" * len(head))
    for shape, mode, t, m, vs_off, vs_comp, gbs, copy in _table:
        comp = t.get(("torch_compile", mode))
        mem = "/".join(f"{m[(p, mode)]:.0f}" if (p, mode) in m else "n/a" for p in ("ddfast", "official", "torch_compile"))
        print(f"{shape:<18} {mode:<8} {t[('ddfast', mode)][0]:>9.2f} {t[('official', mode)][0]:>11.2f} "
              f"{(f'{comp[0]:.2f}' if comp else 'n/a'):>10} {vs_off:>10.2f} {(f'{vs_comp:.2f}' if vs_comp else 'n/a'):>9} "
              f"{gbs:>6.1f} {gbs / copy:>6.0%} {mem:>17}")
    print("(medians; x = speed-up of ddfast; GB/s on the mode's bytes floor (fwd 2S, fwd_bwd 5S, gp 10S); "
          "MB = peak RSS rise per provider; torch.compile has no double backward)")
