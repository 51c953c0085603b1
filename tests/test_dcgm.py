"""DCGM (--method dcgm): the generator layout and file round trip, every loss against a float64 formula
written from the paper's equations with explicit loops (spec §B1 Eq. 1-4 with the §B6 choices), the
chunked real pass against the plain class mean, the class embeddings, the φ-step schedule, an end-to-end
CLI run, resume after SIGKILL and argument checks — on a small 28 px synthetic dataset written as .npz."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ddfast import data, distill, generators, models
from ddfast.methods import dcgm
from ddfast.testing import STEPPING_DISTILL, SteppingClock, assert_resumed_speed, rel_error, run_distill, sigkill_after_checkpoint

F64 = torch.float64
TINY = ["--gen-width", "8", "--z-dim", "16", "--gan-iterations", "4", "--gan-batch", "20", "--teacher-epochs", "1",
        "--net-width", "8", "--batch-real", "4", "--net-batch", "20", "--no-eval"]

pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py


@pytest.fixture(scope="module")
def npz28(tmp_path_factory) -> Path:
    ds = data.synthetic(train_per_class=12, test_per_class=4, image_size=28)
    path = tmp_path_factory.mktemp("data") / "syn28.npz"
    np.savez(path, x_train=ds.train_images.numpy(), y_train=ds.train_labels.numpy(), x_test=ds.test_images.numpy(),
             y_test=ds.test_labels.numpy())
    return path


def _cli(npz: Path, out: Path, *extra: str) -> list[str]:
    return ["--method", "dcgm", "--dataset", "npz", "--data-dir", str(npz), "--ipc", "2", "--iterations", "2", "--outer-loop", "3",
            *TINY, "--out", str(out), *extra]


def _args(npz: Path, out: Path, *extra: str) -> argparse.Namespace:
    return distill.build_parser().parse_args(_cli(npz, out, *extra))


# ----------------------------------------------------------------------------- generator


def test_generator_layout_crop_and_file_round_trip(tmp_path):
    torch.manual_seed(0)
    g32 = dcgm.DCGMGenerator(10, 1, 32, z_dim=16, width=8).eval()
    g28 = dcgm.DCGMGenerator(10, 1, 28, z_dim=16, width=8).eval()
    g28.class_embedding.normal_()
    g32.load_state_dict(g28.state_dict())  # the architecture does not depend on the size: 28 px is a crop
    assert g28.fc.in_features == 32 and g28.fc.out_features == 8 * 16 and g28.proj.in_features == dcgm.EMBED_WIDTH
    kinds = [type(m).__name__ for m in g28.net]
    assert kinds == (["ReLU", "Conv2d", "BatchNorm2d"] * 2 + ["Upsample"]) * 3 + ["ReLU", "Conv2d", "Tanh"]
    z, y = torch.randn(5, 16), torch.tensor([0, 3, 9, 1, 1])
    x = g28(z, y)
    h = g28.fc(torch.cat([z, g28.proj(g28.class_embedding[y])], 1)).view(5, 8, 4, 4)  # G([z ; P e_y])
    assert x.shape == (5, 1, 28, 28) and torch.equal(x, g32(z, y)[:, :, 2:30, 2:30]) and torch.equal(x, g28.net(h)[:, :, 2:30, 2:30])
    kwargs = {"num_classes": 10, "channels": 1, "image_size": 28, "z_dim": 16, "width": 8, "embed_dim": dcgm.EMBED_WIDTH}
    generators.save(tmp_path / "g.pt", g28, "dcgm", kwargs, {})  # "dcgm" is registered by importing the method
    loaded, _ = generators.load(tmp_path / "g.pt")
    assert isinstance(loaded, dcgm.DCGMGenerator) and torch.equal(loaded.class_embedding, g28.class_embedding)
    assert torch.equal(loaded(z, y), x)


# ----------------------------------------------------------------------------- losses vs float64 formulas


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def _close(value: torch.Tensor, ref: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    assert abs(float(value.detach()) - float(ref.detach())) <= 1e-12 * max(1.0, abs(float(ref.detach())))
    for a, b in zip(_grads(value, inputs), _grads(ref, inputs)):
        assert rel_error(a, b) < 1e-10


def test_adversarial_losses_are_eq1_float64():
    torch.manual_seed(0)
    disc = dcgm.FeatureDiscriminator(6, 3, hidden=5).double()
    real, fake = torch.randn(7, 6, dtype=F64), torch.randn(4, 6, dtype=F64, requires_grad=True)
    c_real, c_fake = torch.randn(7, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    prob = lambda f, c: 1 / (1 + torch.exp(-disc(f[None], c[None])[0]))  # noqa: E731  D(·) = sigmoid(logit)
    ref_d = -sum(torch.log(prob(real[i], c_real[i])) for i in range(7)) / 7 - sum(torch.log(1 - prob(fake[j], c_fake[j])) for j in range(4)) / 4
    params = list(disc.parameters())
    _close(dcgm.discriminator_loss(disc, real, c_real, fake, c_fake), ref_d, params + [fake])
    ref_g = -sum(torch.log(prob(fake[j], c_fake[j])) for j in range(4)) / 4  # non-saturating G side
    _close(dcgm.generator_adversarial_loss(disc, fake, c_fake), ref_g, [fake])


def test_classification_loss_is_ce_float64():
    logits, labels = torch.randn(6, 4, dtype=F64, requires_grad=True), torch.tensor([0, 3, 2, 2, 1, 0])
    ref = -sum(logits[i, labels[i]] - torch.log(sum(torch.exp(logits[i, k]) for k in range(4))) for i in range(6)) / 6
    _close(dcgm.classification_loss(logits, labels), ref, [logits])


def _blocks(n: int, gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(n, c, s, s, dtype=F64, generator=gen).requires_grad_(True) for c, s in ((3, 4), (2, 2), (4, 1))]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_feature_matching_loss_is_eq2_float64(reduction):
    gen = torch.Generator().manual_seed(1)
    syn, labels = _blocks(5, gen), torch.tensor([2, 0, 2, 1, 2])
    means = [torch.randn(3, *f.shape[1:], dtype=F64, generator=gen) for f in syn]
    norm = lambda v: (v.flatten() ** 2).sum() / (1 if reduction == "sum" else v.numel())  # noqa: E731  |·|²
    # per sample (the paper): mean over synthetic images of Σ_l |f_l(x̃_i) − f̄_l^T(y_i)|²
    ref = sum(sum(norm(f[i] - mu[labels[i]]) for f, mu in zip(syn, means)) for i in range(5)) / 5
    _close(dcgm.feature_matching_loss(syn, means, labels, "per-sample", reduction), ref, syn)
    # batchmean (CAFE): per class present, Σ_l |mean of the class's f_l − f̄_l^T(y)|², mean over classes
    ref = 0
    for k in (0, 1, 2):
        members = [i for i in range(5) if labels[i] == k]
        ref = ref + sum(norm(sum(f[i] for i in members) / len(members) - mu[k]) for f, mu in zip(syn, means))
    _close(dcgm.feature_matching_loss(syn, means, labels, "batchmean", reduction), ref / 3, syn)


def test_intra_class_loss_is_eq3_float64():
    gen = torch.Generator().manual_seed(2)
    f = torch.randn(7, 5, dtype=F64, generator=gen).requires_grad_(True)
    labels, tau = torch.tensor([0, 1, 0, 2, 1, 0, 1]), 0.3
    pos = torch.randn(3, 5, dtype=F64, generator=gen)
    e = lambda a, b: torch.exp((a / a.norm() * (b / b.norm())).sum() / tau)  # noqa: E731  e⟨·,·⟩ of normalised vectors
    terms = []
    for i in range(7):
        num = e(f[i], pos[labels[i]])
        den = sum(e(f[i], f[j]) for j in range(7) if j != i and labels[j] == labels[i]) + num
        terms.append(-torch.log(num / den))
    _close(dcgm.intra_class_loss(f, labels, pos, tau), sum(terms) / 7, [f])
    one = torch.randn(3, 5, dtype=F64, generator=gen, requires_grad=True)  # IPC 1: no negatives, identically 0
    loss = dcgm.intra_class_loss(one, torch.arange(3), pos, tau)
    assert float(loss.detach()) == 0.0 and float(torch.autograd.grad(loss, one)[0].abs().max()) == 0.0


def test_inter_class_loss_is_eq4_float64():
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(8, 4, dtype=F64, generator=gen).requires_grad_(True)
    labels, margin = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), 1.0
    centres = []
    for k in range(4):  # normalised class means (B6.4)
        m = sum(f[i] for i in range(8) if labels[i] == k) / 2
        centres.append(m / m.norm())
    hinges = [torch.clamp(margin - (centres[a] - centres[b]).norm(), min=0) for a in range(4) for b in range(4) if a != b]
    assert 0 < sum(float(h.detach()) > 0 for h in hinges) < len(hinges)  # both sides of the hinge are exercised
    _close(dcgm.inter_class_loss(f, labels, margin), sum(hinges) / len(hinges), [f])
    same = torch.ones(4, 4, dtype=F64, requires_grad=True)  # coinciding centres: finite (zero-norm safe) gradient
    (grad,) = torch.autograd.grad(dcgm.inter_class_loss(same, torch.tensor([0, 0, 1, 1]), margin), same)
    assert torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- φ passes and schedule


def _phi(width: int = 8, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create("convnet", 1, 10, (28, 28), width=width).double()


def test_chunked_real_pass_equals_the_plain_class_means():
    net = _phi()
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(23, 1, 28, 28, dtype=F64, generator=gen), torch.randint(0, 4, (23,), generator=gen)
    y[:4] = torch.arange(4)
    stats = dcgm.real_statistics(net, x, y, 10, chunk=5)
    blocks, _ = dcgm.phi_outputs(net, x)  # the whole association at once
    assert [tuple(b.shape[1:]) for b in blocks] == [(8, 16, 16), (8, 8, 8), (8, 4, 4)]  # 28 px → 32 (DC padding) → pooled blocks
    for b, m in zip(blocks, stats.means):
        for k in range(10):
            expected = b[y == k].mean(0) if (y == k).any() else torch.zeros_like(b[0])
            assert rel_error(m[k], expected) < 1e-12 if (y == k).any() else torch.equal(m[k], expected)
    assert torch.allclose(stats.features, blocks[-1].flatten(1), rtol=0, atol=1e-13)  # default feature: flat
    gap = dcgm.real_statistics(net, x, y, 10, chunk=5, feature="gap")
    assert torch.allclose(gap.features, blocks[-1].mean((2, 3)), rtol=0, atol=1e-13)
    assert torch.equal(stats.counts, torch.bincount(y, minlength=10))


def test_block3_feature_and_the_discriminator_width():
    block = torch.arange(2 * 3 * 4 * 4, dtype=F64).view(2, 3, 4, 4)
    assert torch.equal(dcgm.block3_feature(block, "flat"), block.reshape(2, 48))
    assert torch.equal(dcgm.block3_feature(block, "gap"), block.mean((2, 3)))
    with pytest.raises(ValueError, match="feature must be one of"):
        dcgm.block3_feature(block, "mean")
    ds = data.load("synthetic")
    net = models.create("convnet", ds.channels, ds.num_classes, ds.image_size, width=8)
    blocks, _ = dcgm.phi_outputs(net, torch.zeros(1, ds.channels, *ds.image_size))
    assert dcgm.feature_dim(net, ds, "flat") == blocks[-1][0].numel() and dcgm.feature_dim(net, ds, "gap") == 8


def test_feature_probe_sees_what_the_pooled_feature_hides():
    # the instance-norm ConvNet's GAP₃ is nearly one vector for every image; the flattened block separates images
    probe = dcgm.feature_probe(data.load("synthetic"), per_class=4, association=6, net_width=16)
    flat, gap = probe["flat"], probe["gap"]
    assert gap["cos_same_class"] > 0.99 and gap["cos_other_class"] > 0.99
    assert flat["cos_other_class"] < gap["cos_other_class"] - 0.05
    assert flat["grad_intra"] > 3 * gap["grad_intra"]
    assert flat["grad_f"] == gap["grad_f"] and flat["grad_c"] == gap["grad_c"]  # L_f and L_c do not use f₃


def test_class_embeddings_are_class_means_of_the_pooled_last_block(npz28):
    ds = data.load("npz", npz28)
    net = _phi(width=6).float()
    e = dcgm.class_embeddings(net, ds, batch=7)
    feats = net.features(ds.normalize(ds.train_images)).double().mean((2, 3))
    for k in range(10):
        assert rel_error(e[k].double(), feats[ds.train_labels == k].mean(0)) < 1e-6


def test_centred_embeddings_keep_only_the_between_class_differences():
    base, spread = torch.randn(1, 5, dtype=F64), 1e-3 * torch.randn(4, 5, dtype=F64)
    e = dcgm.centred(base + spread)  # nearly identical rows, as the pooled instance-norm features are
    expected = spread - spread.mean(0)
    for k in range(4):
        assert rel_error(e[k], expected[k] / expected[k].norm()) < 1e-9
    assert float((e @ e.T).diagonal().sub(1).abs().max()) < 1e-12


def test_phi_step_schedule():
    def due(outer: int, inner: int, rounds: int = 2) -> list[int]:
        config = argparse.Namespace(outer_loop=outer, inner_loop=inner, steps_per_round=outer * inner)
        return [s for s in range(rounds * outer * inner) if dcgm.phi_step_due(s, config)]

    assert due(3, 1) == [0, 1, 3, 4]  # N = 3: φ steps after G steps 1 and 2 of each round, none after the last
    assert due(2, 2) == [1, 5]  # M = 2: after every second G step
    assert due(1, 1) == []  # IPC 1 (N = 1): φ stays at its initialisation, as DC


# ----------------------------------------------------------------------------- the method through the CLI


def test_dcgm_runs_end_to_end_and_writes_generator_and_codebook(npz28, tmp_path):
    out = tmp_path / "a"
    report = distill.run(_args(npz28, out))
    for name in ("distilled.pt", "generator.pt", "codebook.pt", "pretrained-generator-baseline.pt", "grid.png", "report.json"):
        assert (out / name).is_file(), name
    distilled = torch.load(out / "distilled.pt", weights_only=True)
    assert distilled["images"].shape == (20, 1, 28, 28) and torch.equal(distilled["labels"], torch.arange(10).repeat_interleave(2))
    g, meta = generators.load(out / "generator.pt")
    codes = torch.load(out / "codebook.pt", weights_only=True)["codes"]
    assert codes.shape == (2, 16) and meta["stage"] == "dcgm"
    with torch.no_grad():
        raw, labels = dcgm.synthesize(g, codes, 10)
    norm = meta["normalization"]
    assert torch.allclose(generators.to_dataset_space(raw, norm["mean"], norm["std"]), distilled["images"], atol=1e-6)
    pretrained, _ = generators.load(meta["pretrained"])
    moved = [n for n, v in g.state_dict().items() if not torch.equal(v, pretrained.state_dict()[n])]
    assert any(n.startswith("fc.") for n in moved) and "proj.weight" in moved  # G and P were condensed ...
    assert not any("running" in n or n == "class_embedding" for n in moved)  # ... with batch norm frozen, e fixed
    base = torch.load(out / "pretrained-generator-baseline.pt", weights_only=True)["images"]
    expected, _ = generators.sample(pretrained, 10, 2, 0, norm["mean"], norm["std"])  # N(0, I) latents, same count
    assert torch.equal(base, expected)
    assert set(report["time_split_seconds"]) == {"pretraining", "condensation", "sampling"} and report["method"] == "dcgm"


def test_sigkill_resumes_to_the_same_images(npz28, tmp_path, monkeypatch):
    extra = ["--iterations", "10", "--outer-loop", "4"]  # 40 steps, checkpoints at 10, 20, 30 (mid-round: φ restored) and 40
    _, whole_report = run_distill(_cli(npz28, tmp_path / "whole", *extra), tmp_path / "whole")  # also fills the pretraining cache
    out = tmp_path / "killed"
    cmd = [*STEPPING_DISTILL, *_cli(npz28, out, *extra)]
    assert sigkill_after_checkpoint(cmd, out / "checkpoint" / "dcgm.pt") in (10, 20, 30) and not (out / "distilled.pt").exists()
    monkeypatch.setattr("ddfast.runner.time", SteppingClock())
    report = distill.run(_args(npz28, out, *extra))
    assert report["seconds_per_iteration"] == pytest.approx(report["time_split_seconds"]["condensation"] / 40)  # over all steps
    assert_resumed_speed(report, whole_report)
    a = torch.load(tmp_path / "whole" / "distilled.pt", weights_only=True)["images"]
    b = torch.load(out / "distilled.pt", weights_only=True)["images"]
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gen-width", "0"], "--gen-width must be >= 1"),
        (["--outer-loop", "0"], "--outer-loop must be >= 1"),
        (["--teacher-images", "-1"], "--teacher-images must be >= 0"),
        (["--batch-real", "13"], "--batch-real 13 exceeds the smallest class"),
        (["--net-batch", "1000"], "exceeds the 120 training images"),
        (["--lr-code", "0"], "--lr-code must be > 0"),
        (["--dcgm-momentum", "1"], "--dcgm-momentum must be in"),
        (["--inter-margin", "-1"], "--inter-margin must be >= 0"),
        (["--intra-positive", "class-embedding"], "needs --dcgm-feature gap"),
        (["--intra-positive", "class-embedding", "--dcgm-feature", "gap"], "needs --net-width 128"),
        (["--segment", "4"], "drop --segment"),
    ],
)
def test_bad_arguments_fail_before_work(npz28, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        distill.run(_args(npz28, tmp_path / "x", *extra))
    assert not (tmp_path / "x").exists()


def test_rejects_images_that_are_not_28_or_32_px(tmp_path):
    args = distill.build_parser().parse_args(["--method", "dcgm", "--dataset", "synthetic", *TINY, "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="28×28 and 32×32"):
        distill.run(args)


def test_presets_resolve_to_the_spec_sizes(npz28):
    ds = data.load("npz", npz28)
    parse = lambda *a: distill.build_parser().parse_args(["--method", "dcgm", "--gan-batch", "20", "--net-batch", "20", *a])  # noqa: E731
    paper = dcgm.resolve_config(parse("--preset", "paper", "--ipc", "50", "--batch-real", "4", "--gan-iterations", "5"), ds)
    assert (paper.width, paper.iterations, paper.outer_loop, paper.net_width, paper.teacher_images) == (128, 1000, 50, 128, 0)
    assert dcgm.dim.preset_iterations(dcgm.PRESETS["paper"]["gan_iterations"], 60000) == 120 * 468  # DiM's 120 epochs at batch 128
    assert dcgm.PRESETS["paper"]["batch_real"] == 256 and dcgm.PRESETS["paper"]["net_batch"] == 256
    default = dcgm.resolve_config(parse("--ipc", "1", "--batch-real", "4"), ds)
    assert (default.width, default.steps, default.lr_code, default.lr_gen, default.momentum) == (64, 300, 0.01, 1e-3, 0.5)
    assert math.isclose(default.intra_tau, 0.1) and default.inter_margin == 1.0 and default.lf == "per-sample"


def test_longer_pretraining_runs_on_from_the_cached_shorter_one(npz28, tmp_path, monkeypatch, capsys):
    """4 cached pretraining iterations asked for 7 run on from the kept state to the generator (embedding included)
    and judge curve of 7 iterations from scratch."""
    ds = data.load("npz", npz28)
    short, long = (dcgm.resolve_config(_args(npz28, tmp_path / "x", "--gan-iterations", n), ds) for n in ("4", "7"))
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "scratch"))
    scratch = dcgm.pretrain(ds, long)
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "extended"))
    dcgm.pretrain(ds, short)
    capsys.readouterr()
    extended = dcgm.pretrain(ds, long)
    assert "continuing from it 4 of 7" in capsys.readouterr().out
    a, b = generators.load(scratch), generators.load(extended)
    for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()):
        assert torch.equal(x, y)
    assert a[1]["judge_curve"] == b[1]["judge_curve"] and a[1]["embedding_teacher_test_acc"] == b[1]["embedding_teacher_test_acc"]
