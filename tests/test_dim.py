"""DiM (--method dim): the generator and critic against the official modules and their layer table, the
WGAN-GP and matching losses against float64 formulas, the batched critic pass against the official
separate passes, DiM's on-the-fly protocol, resume after SIGKILL and argument checks — on a small
28 px synthetic dataset written as .npz."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddfast import data, generators
from ddfast.distill import build_parser, run
from ddfast.evaluate import main as evaluate_main
from ddfast.methods import dim
from ddfast.testing import (STEPPING_DISTILL, SteppingClock, assert_resumed_speed, describe_mismatch, rel_error, run_distill,
                            sigkill_after_checkpoint)

pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py

MIRROR = Path("/work/.mirror/vimar-gu+DiM/repo")
TINY = ["--gen-width", "8", "--z-dim", "16", "--gan-iterations", "6", "--gan-batch", "20", "--dim-batch", "20",
        "--pool", "convnet", "--pool-steps", "2", "--pool-every", "5", "--no-eval"]


@pytest.fixture(scope="module")
def npz28(tmp_path_factory) -> Path:
    ds = data.synthetic(train_per_class=12, test_per_class=4, image_size=28)
    path = tmp_path_factory.mktemp("data") / "syn28.npz"
    np.savez(path, x_train=ds.train_images.numpy(), y_train=ds.train_labels.numpy(), x_test=ds.test_images.numpy(),
             y_test=ds.test_labels.numpy())
    return path


def _args(npz: Path, out: Path, *extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["--method", "dim", "--dataset", "npz", "--data-dir", str(npz), "--ipc", "2",
                                      "--iterations", "12", *TINY, "--out", str(out), *extra])


def _official_module():
    """DiM's gan_model.py from the mirrored official repository, or a stated skip."""
    if not (MIRROR / "HEAD").exists():
        pytest.skip(f"the official DiM code is not mirrored at {MIRROR} (fetch vimar-gu/DiM to run this comparison)")
    source = subprocess.run(["git", "-C", str(MIRROR), "show", "HEAD:gan_model.py"], capture_output=True, text=True, check=True).stdout
    spec = importlib.util.spec_from_loader("dim_gan_model", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, "gan_model.py", "exec"), module.__dict__)
    return module


def _copy_by_order(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    s, d = src.state_dict(), dst.state_dict()
    assert [v.shape for v in s.values()] == [v.shape for v in d.values()]  # same layers, same order
    dst.load_state_dict(dict(zip(d, s.values())))


@pytest.mark.parametrize("dataset, size, channels", [("fashion", 28, 1), ("cifar10", 32, 3)])
def test_generator_and_critic_equal_the_official_modules(dataset, size, channels):
    official = _official_module()
    cfg = argparse.Namespace(data=dataset)
    torch.manual_seed(0)
    g_off, d_off = official.Generator(cfg), official.Discriminator(cfg)
    g = generators.DiMGenerator(10, channels, size, z_dim=100, width=196)
    d = generators.DiMCritic(10, channels, size, width=196)
    _copy_by_order(g_off, g), _copy_by_order(d_off, d)
    z, y = torch.randn(6, 100), torch.tensor([0, 3, 9, 1, 1, 5])
    u = z.clone()
    u[:, :10] = F.one_hot(y, 10).float()  # gen_condense.py:228-231
    for mode in (True, False):
        g.train(mode), g_off.train(mode)
        x = g(z, y)
        assert rel_error(x, g_off(u)) < 1e-5
    src, cls = d(x)
    src_off, cls_off = d_off(x)
    assert rel_error(src, src_off.squeeze(1)) < 1e-5 and rel_error(cls, cls_off) < 1e-5


def test_layer_table_and_parameter_counts():
    # spec §A1: 28 px [196,4,4] → 7 → 7 → 14 → 28; critic 28 → 14 → 7 → 4; counts from the layer table
    w, z = 196, 100
    g, d = generators.DiMGenerator(10, 1, 28, z, w), generators.DiMCritic(10, 1, 28, w)
    bn = 2 * w
    expected_g = (z * 16 * w + 16 * w) + 2 * 16 * w + (w * w * 9 + w + bn) + 3 * (w * w * 9 + w + bn) \
        + 2 * (w * w * 16 + w + bn) + (w * w * 9 + w + bn) + (w * 9 + 1)
    assert sum(p.numel() for p in g.parameters()) == expected_g
    sizes = [28, 14, 14, 7, 7, 7, 7, 4]
    expected_d = (9 + 1) * w + 7 * (w * w * 9 + w) + sum(2 * w * s * s for s in sizes) + (w + 1) + (w * 10 + 10)
    assert sum(p.numel() for p in d.parameters()) == expected_d
    x = g(torch.randn(3, z), torch.tensor([1, 2, 3]))
    assert x.shape == (3, 1, 28, 28) and float(x.detach().abs().max()) <= 1
    with pytest.raises(ValueError, match="28 and 32"):
        generators.DiMGenerator(10, 1, 16)


def test_conditioning_overwrite_and_concat():
    g = generators.DiMGenerator(10, 1, 28, z_dim=16, width=8)
    z, y = torch.randn(4, 16), torch.tensor([2, 0, 9, 2])
    u = g.condition(z, y)
    assert torch.equal(u[:, :10], F.one_hot(y, 10).float()) and torch.equal(u[:, 10:], z[:, 10:])
    c = generators.DiMGenerator(10, 1, 28, z_dim=16, width=8, cond="concat")
    assert c.fc[0].in_features == 26 and torch.equal(c.condition(z, y), torch.cat([z, F.one_hot(y, 10).float()], 1))


def _tiny_critic(dtype=torch.float64):
    torch.manual_seed(1)
    return generators.DiMCritic(10, 1, 28, width=4).to(dtype)


def test_gradient_penalty_is_the_formula_float64():
    d = _tiny_critic()
    real, fake = torch.rand(5, 1, 28, 28, dtype=torch.float64) * 2 - 1, torch.rand(5, 1, 28, 28, dtype=torch.float64) * 2 - 1
    gp = dim.gradient_penalty(d, real, fake, torch.Generator().manual_seed(3))
    alpha = torch.rand(5, 1, 1, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    terms = []
    for i in range(5):  # one sample at a time: ‖∂D_src(x̂_i)/∂x̂_i‖₂
        xi = (alpha[i] * real[i] + (1 - alpha[i]) * fake[i])[None].requires_grad_(True)
        (grad,) = torch.autograd.grad(d(xi)[0].sum(), xi)
        terms.append((grad.norm() - 1) ** 2)
    value = float(gp.detach())
    assert abs(value - 10 * float(torch.stack(terms).mean())) <= 1e-12 * value
    (dp,) = torch.autograd.grad(gp, d.adv.weight)  # differentiable: the GP trains the critic (double backward)
    assert float(dp.abs().max()) > 0


def test_batched_critic_step_equals_the_official_separate_passes():
    d, d_ref = _tiny_critic(torch.float32), _tiny_critic(torch.float32)
    torch.manual_seed(2)
    g = generators.DiMGenerator(10, 1, 28, z_dim=16, width=8)
    real, labels = torch.rand(6, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 5])
    opt = torch.optim.SGD(d.parameters(), lr=1.0)
    before = {k: v.clone() for k, v in d.state_dict().items()}
    loss = dim.critic_step(g, d, opt, real, labels, 10, torch.Generator().manual_seed(7))
    # the official statement order (gen_condense.py:249-268) with separate passes, same draws
    gen = torch.Generator().manual_seed(7)
    y_fake = torch.randint(10, (6,), generator=gen)
    z = torch.randn(6, 16, generator=gen)
    torch.manual_seed(2)
    g_ref = generators.DiMGenerator(10, 1, 28, z_dim=16, width=8)  # the same generator, in the same (train) mode
    with torch.no_grad():
        fake = g_ref(z, y_fake)
    s_f, c_f = d_ref(fake)
    s_r, c_r = d_ref(real)
    ref = s_f.mean() - s_r.mean() + F.cross_entropy(c_f, y_fake) + F.cross_entropy(c_r, labels) + dim.gradient_penalty(d_ref, real, fake, gen)
    ref.backward()
    assert abs(loss - float(ref)) <= 1e-5 * abs(float(ref))
    for (name, p), p_ref in zip(d.named_parameters(), d_ref.parameters()):
        assert rel_error(before[name] - p.detach(), p_ref.grad) < 1e-4, name  # SGD lr 1: the step is the gradient


def test_logits_match_loss_is_the_formula_and_only_moves_the_synthetic_side():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)).double()
    real, syn = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    loss = dim.logits_match_loss(model, real, syn, 0.01)
    lr, ls = F.log_softmax(model(real), 1), F.log_softmax(model(syn), 1)
    expected = 0.01 * sum(float((lr[i, k] - ls[i, k]) ** 2) for i in range(4) for k in range(5)) / 20
    assert abs(float(loss) - expected) <= 1e-14
    (g,) = torch.autograd.grad(loss, syn)
    (g_ref,) = torch.autograd.grad(0.01 * ((lr - ls) ** 2).mean(), syn)  # the official real branch keeps its graph
    assert rel_error(g, g_ref) < 1e-12


def test_dim_runs_end_to_end_and_writes_generators(npz28, tmp_path):
    report = run(_args(npz28, tmp_path / "a"))
    out = tmp_path / "a"
    for name in ("distilled.pt", "generator.pt", "pretrained-generator-baseline.pt", "grid.png"):
        assert (out / name).is_file(), name
    distilled = torch.load(out / "distilled.pt", weights_only=True)
    assert distilled["images"].shape == (20, 1, 28, 28)
    g, meta = generators.load(out / "generator.pt")
    stage1, _ = generators.load(meta["stage1"])
    assert meta["stage"] == "dim" and set(report["time_split_seconds"]) >= {"stage1_gan", "stage2_matching"}
    iterations = dim.resolve_config(_args(npz28, out), data.load("npz", npz28)).gan_iterations
    curve = generators.load(meta["stage1"])[1]["judge_curve"]
    assert [p["iteration"] for p in curve] == [*range(0, iterations, dim.JUDGE_EVERY), iterations]
    assert all(0 <= p["consistency"] <= 100 for p in curve)
    for key in ("judge", "baseline_judge"):  # the set and the stage-1 generator's sample, judged
        assert 0 <= report[key]["consistency"] <= 100 and report[key]["real_diversity"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(g.state_dict().values(), stage1.state_dict().values()))  # stage 2 moved G
    again, _ = generators.sample(g, 10, 2, 0, meta["normalization"]["mean"], meta["normalization"]["std"])
    assert torch.allclose(again, distilled["images"])


def test_sigkill_resumes_to_the_same_generator(npz28, tmp_path, monkeypatch):
    extra = ["--iterations", "40"]
    _, whole = run_distill(["--method", "dim", "--dataset", "npz", "--data-dir", str(npz28), "--ipc", "2", *TINY, *extra], tmp_path / "whole")
    assert whole["method"] == "dim"
    out = tmp_path / "killed"
    cmd = [*STEPPING_DISTILL, "--method", "dim", "--dataset", "npz", "--data-dir", str(npz28), "--ipc", "2", *TINY, *extra, "--out", str(out)]
    killed_at = sigkill_after_checkpoint(cmd, out / "checkpoint" / "dim.pt")
    assert killed_at in (10, 20, 30) and not (out / "distilled.pt").exists()
    monkeypatch.setattr("ddfast.runner.time", SteppingClock())
    report = run(_args(npz28, out, *extra))
    assert report["seconds_per_iteration"] == pytest.approx(report["time_split_seconds"]["stage2_matching"] / 40)  # over all 40
    assert_resumed_speed(report, whole)
    g_whole, _ = generators.load(tmp_path / "whole" / "generator.pt")
    g_resumed, _ = generators.load(out / "generator.pt")
    differ = [name for (name, x), y in zip(g_whole.state_dict().items(), g_resumed.state_dict().values()) if not torch.equal(x, y)]
    assert not differ, f"resumed generator differs from the uninterrupted one (killed at {killed_at}) in {differ}"
    a = torch.load(tmp_path / "whole" / "distilled.pt", weights_only=True)["images"]
    b = torch.load(out / "distilled.pt", weights_only=True)["images"]
    assert torch.equal(a, b), describe_mismatch(b, a, 0.0, 0.0)


def test_stage1_resumes_after_sigkill_to_the_same_generator_and_curve(npz28, tmp_path, monkeypatch):
    extra = ["--gan-iterations", "120", "--iterations", "1"]
    ds = data.load("npz", npz28)
    config = dim.resolve_config(_args(npz28, tmp_path / "x", *extra), ds)
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "killed"))
    partial = dim.stage1_path(ds, config).with_suffix(".partial.pt")
    cmd = [sys.executable, "-m", "ddfast.distill", "--method", "dim", "--dataset", "npz", "--data-dir", str(npz28), "--ipc", "2", *TINY,
           *extra, "--out", str(tmp_path / "k")]
    assert sigkill_after_checkpoint(cmd, partial) in (50, 100)
    assert not dim.stage1_path(ds, config).exists()
    resumed = generators.load(dim.pretrain(ds, config))
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "whole"))
    whole = generators.load(dim.pretrain(ds, config))
    for a, b in zip(resumed[0].state_dict().values(), whole[0].state_dict().values()):
        assert torch.equal(a, b)
    assert resumed[1]["judge_curve"] == whole[1]["judge_curve"] and [p["iteration"] for p in whole[1]["judge_curve"]] == [0, 120]


def test_on_the_fly_protocol_draws_fresh_images_and_reports_both_numbers(npz28):
    ds = data.load("npz", npz28)
    torch.manual_seed(0)
    g = generators.DiMGenerator(10, 1, 28, z_dim=16, width=8)
    r = dim.evaluate_on_the_fly(g, ds, ipc=2, epochs=5, runs=2, seed=0)
    assert len(r["accs"]) == 2 and r["max_of_5_mean"] >= r["mean"] and "on-the-fly" in r["protocol"]
    assert r == {**dim.evaluate_on_the_fly(g, ds, ipc=2, epochs=5, runs=2, seed=0), "seconds": r["seconds"]}  # seeded


def test_evaluate_cli_runs_the_on_the_fly_protocol_on_a_generator_file(npz28, tmp_path, capsys):
    ds = data.load("npz", npz28)
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "channels": 1, "image_size": 28, "z_dim": 16, "width": 8}
    g = generators.DiMGenerator(**kwargs)
    generators.save(tmp_path / "g.pt", g, "dim", kwargs, {"dataset": "npz"})
    base = ["--data-dir", str(npz28), "--on-the-fly"]
    assert evaluate_main([str(tmp_path / "g.pt"), *base, "--ipc", "2", "--epochs", "5", "--runs", "2", "--json", str(tmp_path / "r.json")]) == 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["accs"] == dim.evaluate_on_the_fly(g, ds, ipc=2, epochs=5, runs=2, seed=0)["accs"]
    assert "max of 5 test points" in capsys.readouterr().out
    assert evaluate_main([str(tmp_path / "g.pt"), *base]) == 2  # --ipc missing
    assert evaluate_main([str(tmp_path / "missing.pt"), *base, "--ipc", "2"]) == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--gen-width", "0"], "--gen-width must be >= 1"),
        (["--gan-iterations", "0"], "--gan-iterations must be >= 1"),
        (["--dim-batch", "100000"], "exceeds"),
        (["--pool", "convnet,nonet"], "unknown pool model"),
        (["--lr-gen", "0"], "--lr-gen"),
        (["--z-dim", "5", "--cond", "overwrite"], "--cond overwrite needs --z-dim >= the 10 classes"),
        (["--segment", "4"], "drop --segment"),
    ],
)
def test_bad_arguments_fail_before_work(npz28, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run(_args(npz28, tmp_path / "x", *extra))
    assert not (tmp_path / "x").exists()


def test_rejects_images_that_are_not_28_or_32_px(tmp_path):
    args = build_parser().parse_args(["--method", "dim", "--dataset", "synthetic", *TINY, "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="28×28 and 32×32"):
        run(args)


def test_fused_critic_blocks_give_the_official_layout_and_gradient_penalty():
    torch.manual_seed(0)
    fused = generators.DiMCritic(10, 1, 28, width=8)
    eager = generators.DiMCritic(10, 1, 28, width=8, fused=False)
    eager.load_state_dict(fused.state_dict())  # same keys: the LeakyReLU slot holds an Identity when fused
    real, fake = torch.rand(4, 1, 28, 28) * 2 - 1, torch.rand(4, 1, 28, 28) * 2 - 1
    grads = []
    for critic in (fused, eager):
        gp = dim.gradient_penalty(critic, real, fake, torch.Generator().manual_seed(1))
        grads.append(torch.autograd.grad(gp, [*critic.features.parameters(), critic.adv.weight]))  # the GP sees neither biases of the heads nor the class head
    for g_fused, g_eager in zip(*grads):
        assert rel_error(g_fused, g_eager) < 1e-4


def test_longer_stage1_schedule_runs_on_from_the_cached_shorter_one(npz28, tmp_path, monkeypatch, capsys):
    """A cached 4-iteration stage 1 asked for 9 iterations runs iterations 4..8 only and ends with the weights, critic,
    Adam states and judge curve of 9 iterations from scratch; a schedule with other settings is not used."""
    ds = data.load("npz", npz28)
    short, long = (dim.resolve_config(_args(npz28, tmp_path / "x", "--gan-iterations", n), ds) for n in ("4", "9"))
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "scratch"))
    scratch = dim.pretrain(ds, long)
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "extended"))
    other = dim.resolve_config(_args(npz28, tmp_path / "x", "--gan-iterations", "2", "--gan-batch", "10"), ds)
    dim.pretrain(ds, other)
    assert generators.shorter_schedule(dim.stage1_path(ds, long), 9) is None  # another batch is another schedule
    dim.pretrain(ds, short)
    kept = generators.final_state_path(dim.stage1_path(ds, short))
    assert generators.shorter_schedule(dim.stage1_path(ds, long), 9) == kept
    capsys.readouterr()
    extended = dim.pretrain(ds, long)
    assert f"continuing from it 4 of 9: the shorter schedule kept in {kept}" in capsys.readouterr().out
    a, b = generators.load(scratch), generators.load(extended)
    for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()):
        assert torch.equal(x, y)
    assert a[1]["judge_curve"] == b[1]["judge_curve"]
    sa, sb = (torch.load(generators.final_state_path(p), weights_only=True) for p in (scratch, extended))
    assert sa["iteration"] == sb["iteration"] == 9
    for key in ("d", "opt_d", "opt_g"):
        assert str(sa["state"][key]) == str(sb["state"][key])


def test_presets_choose_the_conditioning_unless_given(npz28, tmp_path):
    ds = data.load("npz", npz28)
    parse = lambda *extra: build_parser().parse_args(  # noqa: E731
        ["--method", "dim", "--dataset", "npz", "--data-dir", str(npz28), "--ipc", "2", "--out", str(tmp_path), *extra])
    default, paper = dim.resolve_config(parse(), ds), dim.resolve_config(parse("--preset", "paper", "--gan-iterations", "5", "--gan-batch", "20"), ds)
    assert (default.cond, default.gan_iterations) == ("concat", 3000)  # the paper's Eq. 4 at the spec's CPU budget
    assert paper.cond == "overwrite"  # the official code
    assert dim.resolve_config(parse("--cond", "overwrite"), ds).cond == "overwrite"
