"""K2 benchmark: batched attention matching (two attention layers + the final embedding), forward +
backward to the synthetic features, on CPU.

Providers, side by side in one run (kernel "attention_match", mode "fwd_bwd"):
  ddfast        — ddfast.ops.attention_match on the cpu backend (ddfast._C: the real side read once, the
                  synthetic side read twice and its gradient written once; backward only scales it);
  official      — DataDAM's loss as its code computes it (ddfast/reference/attention_match_official.py,
                  main_DataDAM.py:267-310: get_attention per layer, MSE_B with its .cpu() round trips),
                  then autograd. It needs batch_real images of every class in class order, so the
                  D2M case (ragged classes) uses the DataDAM-style per-class loop (``official_loop``)
                  with the same .cpu() reductions;
  torch_compile — torch.compile of the reference (ddfast/reference/attention_match.py), compiled once
                  per case before timing.
Shapes (specs/d2m-datadam-k2.md §3, Fashion-MNIST ConvNet-D3 w128, DataDAM's 28→32 padding): layers
[N, 128, 32, 32] and [N, 128, 16, 16] plus the embedding [N, 2048]; DataDAM at IPC 1/10/50 (640 real =
64 per class, 10·IPC synthetic) and D2M (128 real / 128 generated, ragged classes). GB/s is the spec's
two-pass bytes floor s·P·(N_R + 3·N_S) over the ddfast time, beside the measured copy bandwidth.

    .venv/bin/python -m pytest perf/test_attention_match.py -q -s
"""
import pytest
import torch

from bench import copy_bandwidth_gbs, peak_mem_mb, record, time_ms
from ddfast.backend import use_backend
from ddfast.ops import attention_match
from ddfast.reference.attention_match import attention_match as reference_loss
from ddfast.reference.attention_match_official import datadam_loss, get_attention

LAYERS = [(128, 32, 32), (128, 16, 16)]
EMB = 2048
CASES = {  # name: (real per class, synthetic per class) for class-sorted DataDAM batches, or (N_R, N_S) ragged
    "datadam-ipc1": ("sorted", 64, 1),
    "datadam-ipc10": ("sorted", 64, 10),
    "datadam-ipc50": ("sorted", 64, 50),
    "d2m": ("ragged", 128, 128),
}
WEIGHTS = [100.0, 100.0]
EMB_WEIGHT = 1.0
_table: list[tuple] = []


def official_loop(fr, fs, er, es, yr, ys):
    """DataDAM-style per-class loop (utils.get_attention + the `error` means, .cpu() reductions)."""
    loss = torch.tensor(0.0)
    for k in sorted(set(yr.tolist()) & set(ys.tolist())):
        r, s = yr == k, ys == k
        for a_r, a_s, w in zip(fr, fs, WEIGHTS):
            att_r = get_attention(a_r[r], param=1, exp=1, norm="l2")
            att_s = get_attention(a_s[s], param=1, exp=1, norm="l2")
            loss = loss + w * torch.sum((att_r.mean(0).cpu() - att_s.mean(0).cpu()) ** 2)
        loss = loss + EMB_WEIGHT * torch.sum((er[r].mean(0).cpu() - es[s].mean(0).cpu()) ** 2)
    return loss


def _inputs(kind: str, a: int, b: int):
    gen = torch.Generator().manual_seed(0)
    if kind == "sorted":
        yr, ys = torch.arange(10).repeat_interleave(a), torch.arange(10).repeat_interleave(b)
    else:
        yr, ys = torch.randint(0, 10, (a,), generator=gen), torch.randint(0, 10, (b,), generator=gen)
    fr = [torch.randn(len(yr), *s, generator=gen).relu_() for s in LAYERS]
    fs = [torch.randn(len(ys), *s, generator=gen).relu_().requires_grad_(True) for s in LAYERS]
    er = torch.randn(len(yr), EMB, generator=gen)
    es = torch.randn(len(ys), EMB, generator=gen).requires_grad_(True)
    return fr, fs, er, es, yr, ys


@pytest.mark.parametrize("case", list(CASES))
def test_attention_match_fwd_bwd(case):
    kind, a, b = CASES[case]
    fr, fs, er, es, yr, ys = _inputs(kind, a, b)
    n_r, n_s = len(yr), len(ys)
    shape = f"{case}: R{n_r} S{n_s}"
    leaves = [*fs, es]

    def ddfast():
        with use_backend("cpu"):
            loss = attention_match(fr, fs, yr, ys, 1.0, "spatial", WEIGHTS, er, es, EMB_WEIGHT)
        loss.backward()
        return loss

    def official():
        if kind == "sorted":
            # datadam_loss weights: 100 per attention layer, 100·task_balance on the embedding
            loss = datadam_loss([*fr, fr[-1]], [*fs, fs[-1]], er, es, num_classes=10, batch_real=a, ipc=b)
        else:
            loss = official_loop(fr, fs, er, es, yr, ys)
        loss.backward()
        return loss

    compiled = torch.compile(reference_loss)

    def torch_compile():
        loss = compiled(fr, fs, yr, ys, 1.0, "spatial", WEIGHTS, er, es, EMB_WEIGHT)
        loss.backward()
        return loss

    providers = {"ddfast": ddfast, "official": official, "torch_compile": torch_compile}
    losses, grads = {}, {}
    for name, fn in providers.items():
        for t in leaves:
            t.grad = None
        losses[name] = float(fn().detach())
        grads[name] = [t.grad.clone() for t in leaves]
    for name in ("ddfast", "torch_compile"):
        assert abs(losses[name] - losses["official"]) <= 1e-4 * abs(losses["official"]), losses
        for g, g_off in zip(grads[name], grads["official"]):
            assert float((g - g_off).abs().max()) <= 1e-4 * float(g_off.abs().max()), name

    times, mems = {}, {}
    for name, fn in providers.items():
        def step(fn=fn):
            for t in leaves:
                t.grad = None
            return fn()

        times[name] = time_ms(step, warmup=2, reps=10, min_seconds=1.0)
        record("attention_match", name, "fwd_bwd", shape, "time", "ms", times[name])
        mems[name] = peak_mem_mb(step)
        record("attention_match", name, "fwd_bwd", shape, "peak_mem", "MB", (mems[name],) * 3)

    per_image = sum(c * h * w for c, h, w in LAYERS) + EMB
    floor = 4 * per_image * (n_r + 3 * n_s)  # read F^R, read F^S twice, write dF^S (fp32)
    achieved = floor / (times["ddfast"][0] * 1e-3) / 1e9
    copy = copy_bandwidth_gbs(floor // 2)
    record("attention_match", "ddfast", "fwd_bwd", shape, "bandwidth", "GB/s", (achieved,) * 3)
    vs_off = times["official"][0] / times["ddfast"][0]
    vs_compile = times["torch_compile"][0] / times["ddfast"][0]
    _table.append((shape, times, mems, vs_off, vs_compile, achieved, copy, floor))
    print(f"\nattention_match {shape}: ddfast {times['ddfast'][0]:.1f} ms, official {times['official'][0]:.1f} ms, "
          f"torch.compile {times['torch_compile'][0]:.1f} ms | {vs_off:.1f}x vs official, {vs_compile:.1f}x vs compile | "
          f"{achieved:.1f} GB/s on the {floor / 1e6:.0f} MB floor = {achieved / copy:.0%} of copy ({copy:.1f} GB/s)")
    if case == list(CASES)[-1]:
        _print_table()
    assert vs_off > 1.0, f"ddfast slower than the official loss ({vs_off:.2f}x)"


def _print_table() -> None:
    head = (f"{'case':<26} {'ddfast ms':>9} {'official ms':>11} {'compile ms':>10} {'x official':>10} {'x compile':>9} "
            f"{'GB/s':>6} {'% copy':>6} {'MB d/o/c':>16}")
    print("\n" + head + "\n" + "-" * len(head))
    for shape, t, m, vs_off, vs_compile, gbs, copy, _ in _table:
        mem = "/".join(f"{m[p]:.0f}" for p in ("ddfast", "official", "torch_compile"))
        print(f"{shape:<26} {t['ddfast'][0]:>9.1f} {t['official'][0]:>11.1f} {t['torch_compile'][0]:>10.1f} {vs_off:>10.1f} "
              f"{vs_compile:>9.1f} {gbs:>6.1f} {gbs / copy:>6.0%} {mem:>16}")
    print("(medians; x = speed-up of ddfast; GB/s on the two-pass floor; MB = peak RSS rise per provider)")
