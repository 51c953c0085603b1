"""APM rounds, measured side by side in one run (Fashion-MNIST shapes: IPC 10, N = B = 100, ConvNet-D3
width 128 as the paper, K = 5).

* image update (one round's ∇_u L_u + the SGD step): ddfast (teacher + K frozen checkpoints in one
  ``torch.compile``d function, one teacher pass per segment, K4), ddfast-eager (the same, eager),
  ddfast-vmap (eager, the checkpoints as one vmap over stacked parameters) vs the official-style loop
  (teacher re-forwarded per checkpoint, parameters trainable, per-step ``.item()``);
* student training per epoch: ddfast's trainer (torch.compile'd loss), the same trainer eager, and the
  official-style trainer (DataLoader, lr scheduler, per-batch ``loss.item()`` and numpy accuracy);
* ``official+compile``: the official-style code with every network wrapped in ``torch.compile`` (what
  compiling the code one would otherwise write buys);
* a whole round at the paper's schedule (E = 250, one retrain every mid_gap + 1 = 3 rounds), composed
  from the two measurements: round = E·t_epoch/3 + t_update;
* memory: peak extra memory of the image update with ``--segment 25`` vs the whole batch.

Weights are freshly initialised (time and memory do not depend on them), so no teachers are trained.
"""
from __future__ import annotations

import pytest
import torch

from bench import peak_mem_mb, record, time_ms
from ddfast import models
from ddfast.methods import apm

CLASSES, IPC, SHAPE, WIDTH, K = 10, 10, (1, 28, 28), 128, 5
N = CLASSES * IPC
PAPER_EPOCHS, PAPER_GAP = 250, 2
RESULTS: dict[str, float] = {}


def _config(**overrides) -> apm.Config:
    base = dict(ipc=IPC, iterations=10, teachers=1, teacher_epochs=1, teacher_images=0, net_width=WIDTH, student_epochs=K,
                checkpoints=K, mid_gap=PAPER_GAP, alpha=0.1, distance="l1", eps=1e-8, lr_img=1.0, img_momentum=0.5, lr_net=0.02,
                batch_syn=N, batch_train=256, checkpoint_eval="loop", compile=True, segment=0, official=False, seed=0)
    return apm.Config(**{**base, **overrides})


class _Shapes:
    """What ``apm.Student`` reads from a dataset (no data needed)."""

    channels, num_classes, image_size = SHAPE[0], CLASSES, SHAPE[1:]


def _net() -> torch.nn.Module:
    return models.create("convnet", SHAPE[0], CLASSES, SHAPE[1:], width=WIDTH)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    teacher = apm._frozen(_net())
    states = [{n: p.detach().clone() for n, p in _net().named_parameters()} for _ in range(K)]
    u = torch.randn(N, *SHAPE)
    y = torch.arange(CLASSES).repeat_interleave(IPC)
    return teacher, states, u, y


def _update(provider: str, setup, segment: int = 0):
    teacher, states, u, y = setup
    cfg = _config(segment=segment, official=provider.startswith("official"))
    idx = torch.arange(N)
    image = u.clone().requires_grad_(True)
    opt = torch.optim.SGD([image], lr=1.0, momentum=0.5)
    if provider.startswith("official"):
        middle = []
        for state in states:
            m = _net()
            m.load_state_dict(state, strict=False)
            middle.append(m)
        trainable = apm._frozen(_net())
        trainable.load_state_dict(teacher.state_dict())
        for p in trainable.parameters():  # the official teacher is not frozen
            p.requires_grad_(True)
        if provider == "official+compile":
            trainable, middle = torch.compile(trainable), [torch.compile(m) for m in middle]

        def step():
            image.grad, _ = apm.image_gradient_reference(image, idx, y, trainable, middle, cfg)
            opt.step()
        return step
    mode = "vmap" if provider == "ddfast-vmap" else "loop"
    nets = apm.MatchingNets(_net(), K, mode, compile=provider == "ddfast").load(teacher, states)

    def step():
        image.grad, _ = apm.image_gradient(image, idx, y, nets, cfg)
        opt.step()
    return step


@pytest.mark.parametrize("provider", ["ddfast", "ddfast-eager", "ddfast-vmap", "official", "official+compile"])
def test_image_update(provider, setup):
    values = time_ms(_update(provider, setup), warmup=2, reps=5, min_seconds=2.0)
    RESULTS[f"update/{provider}"] = values[0]
    record("apm_image_update", provider, "fwd+bwd+step", f"N{N}xK{K}xw{WIDTH}", "time", "ms", values)


@pytest.mark.parametrize("provider", ["ddfast", "ddfast-eager", "official", "official+compile"])
def test_student_epoch(provider, setup):
    _, _, u, _ = setup
    targets = torch.randn(N, CLASSES)
    epochs = 10
    cfg = _config(student_epochs=epochs, checkpoints=K)
    student = apm.Student(_Shapes(), WIDTH, compile=provider == "ddfast")

    def train():
        torch.manual_seed(0)
        if provider.startswith("official"):
            net = _net()
            apm.train_student_reference(torch.compile(net) if provider == "official+compile" else net, u, targets, cfg,
                                        torch.Generator().manual_seed(0))
        else:
            student.reinit()
            apm.train_student(student, u, targets, cfg, torch.Generator().manual_seed(0))
    p50, p20, p80 = time_ms(train, warmup=1, reps=3, min_seconds=1.0)
    values = (p50 / epochs, p20 / epochs, p80 / epochs)
    RESULTS[f"epoch/{provider}"] = values[0]
    record("apm_student_epoch", provider, "train", f"N{N}xw{WIDTH}", "time", "ms", values)


def test_round_ratios():
    """The ratios the README quotes, from the rows measured above in this run."""
    needed = ("update/ddfast", "update/official", "epoch/ddfast", "epoch/official")
    if not all(k in RESULTS for k in needed):
        pytest.skip("run the whole file: this row is composed from the image-update and student-epoch rows")
    providers = [p for p in ("ddfast", "ddfast-eager", "official", "official+compile") if f"epoch/{p}" in RESULTS and f"update/{p}" in RESULTS]
    rounds = {p: PAPER_EPOCHS * RESULTS[f"epoch/{p}"] / (PAPER_GAP + 1) + RESULTS[f"update/{p}"] for p in providers}
    for p, ms in rounds.items():
        record("apm_round", p, "E250/gap2 composed", f"N{N}xK{K}xw{WIDTH}", "time", "ms", (ms, ms, ms))
    update_ratio = RESULTS["update/official"] / RESULTS["update/ddfast"]
    print(f"\nimage update: ddfast {RESULTS['update/ddfast']:.0f} ms, official {RESULTS['update/official']:.0f} ms ({update_ratio:.2f}x); "
          f"eager {RESULTS.get('update/ddfast-eager', float('nan')):.0f} ms, vmap {RESULTS.get('update/ddfast-vmap', float('nan')):.0f} ms")
    print(f"student epoch: ddfast {RESULTS['epoch/ddfast']:.1f} ms, official {RESULTS['epoch/official']:.1f} ms "
          f"({RESULTS['epoch/official'] / RESULTS['epoch/ddfast']:.2f}x)")
    print(f"round (E={PAPER_EPOCHS}, retrain every {PAPER_GAP + 1}): " + ", ".join(
        f"{p} {ms / 1e3:.2f} s ({rounds['official'] / ms:.2f}x official)" for p, ms in rounds.items()))
    for key in ("update", "epoch"):
        print(f"{key}: " + ", ".join(f"{p} {RESULTS[f'{key}/{p}']:.1f} ms" for p in providers if f"{key}/{p}" in RESULTS))
    assert update_ratio >= 2.0, f"the fused image update is only {update_ratio:.2f}x the official-style loop"


def _warm(step):
    step()  # trace/compile outside the measurement
    return step


def test_segment_memory(setup):
    whole = peak_mem_mb(_warm(_update("ddfast", setup, segment=0)))
    seg = peak_mem_mb(_warm(_update("ddfast", setup, segment=25)))
    record("apm_image_update", "ddfast", "peak_mem whole", f"N{N}xK{K}xw{WIDTH}", "peak_mem", "MB", (whole, whole, whole))
    record("apm_image_update", "ddfast", "peak_mem seg25", f"N{N}xK{K}xw{WIDTH}", "peak_mem", "MB", (seg, seg, seg))
    print(f"\nimage update peak memory: whole batch {whole:.0f} MB, --segment 25 {seg:.0f} MB ({seg / whole:.0%})")
    assert seg <= 0.5 * whole, (seg, whole)
