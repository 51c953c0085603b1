"""D2M (--method d2m), the generator infrastructure (ddfast.generators) and ``python -m ddfast.generate``:
generator files (round trip, restricted unpickler), sampling, GAN pretraining resume, the exact
--segment contract, resume after SIGKILL and argument checks — on the small synthetic dataset."""
from __future__ import annotations

import pickle
import sys

import pytest
import torch

from ddfast import data, generators, io
from ddfast.distill import build_parser, run
from ddfast.generate import main as generate_main
from ddfast.testing import STEPPING_DISTILL, SteppingClock, assert_resumed_speed, rel_error, run_distill, sigkill_after_checkpoint

GAN = ["--gan-epochs", "2", "--gen-width", "8", "--z-dim", "16"]
BASE = ["--dataset", "synthetic", "--ipc", "2", "--iterations", "4", "--net-width", "8", "--d2m-batch", "32",
        "--gen-optimizer", "adam", *GAN, "--no-eval"]

pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py


def _run(tmp_path, name, *extra):
    args = build_parser().parse_args(["--method", "d2m", *BASE, "--out", str(tmp_path / name), *extra])
    report = run(args)
    return torch.load(tmp_path / name / "distilled.pt", weights_only=True), report


def _generator(seed=0):
    torch.manual_seed(seed)
    return generators.create("dcgan", num_classes=10, channels=1, image_size=16, z_dim=16, width=8)


def test_generator_file_round_trip_and_sampling(tmp_path):
    g = _generator()
    kwargs = {"num_classes": 10, "channels": 1, "image_size": 16, "z_dim": 16, "width": 8}
    generators.save(tmp_path / "g.pt", g, "dcgan", kwargs, {"normalization": {"mean": [0.5], "std": [0.25]}})
    loaded, meta = generators.load(tmp_path / "g.pt")
    assert not loaded.training and meta["normalization"]["std"] == [0.25]
    x, y = generators.sample(loaded, 10, 3, seed=5, mean=[0.5], std=[0.25])
    again, _ = generators.sample(g, 10, 3, seed=5, mean=[0.5], std=[0.25])
    assert x.shape == (30, 1, 16, 16) and torch.equal(y, torch.arange(10).repeat_interleave(3))
    assert torch.equal(x, again)  # deterministic, eval mode: independent of training-mode state
    z, _ = generators.sample_latents(10, 3, 16, 5)
    g.eval()
    with torch.no_grad():
        raw = g(z, y)
    assert torch.allclose(x * 0.25 + 0.5, (raw + 1) / 2, atol=1e-6)  # (x+1)/2, then the dataset normalisation
    # one image does not depend on the others sampled with it (eval-mode batch norm)
    single, _ = generators.sample(loaded, 10, 3, seed=5, mean=[0.5], std=[0.25], batch_size=1)
    assert torch.allclose(single, x, atol=1e-6)


def test_generator_file_refuses_code_and_foreign_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": generators.FORMAT, "x": Evil()}, f)
    with pytest.raises(ValueError, match="not a valid ddfast generator.*nothing in it was executed"):
        generators.load(tmp_path / "evil.pt")
    io.save(tmp_path / "set.pt", torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="not a ddfast generator"):
        generators.load(tmp_path / "set.pt")
    with pytest.raises(FileNotFoundError):
        generators.load(tmp_path / "missing.pt")


def test_pretraining_resumes_after_sigkill(tmp_path, monkeypatch):
    code = ("from ddfast import data, generators; generators.pretrain(data.synthetic(train_per_class=200), "
            "generators.GANConfig(epochs=6, width=8, z_dim=16, batch_size=64))")
    env = {**__import__("os").environ, "DDFAST_CACHE_DIR": str(tmp_path / "killed")}
    config = generators.GANConfig(epochs=6, width=8, z_dim=16, batch_size=64)
    dataset = data.synthetic(train_per_class=200)
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "killed"))
    partial = generators.pretrained_path(dataset, config).with_suffix(".partial.pt")
    sigkill_after_checkpoint([sys.executable, "-c", code], partial, env=env)
    assert partial.exists() and not generators.pretrained_path(dataset, config).exists()
    resumed, resumed_path = generators.pretrain(dataset, config)
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "whole"))
    whole, whole_path = generators.pretrain(dataset, config)
    for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()):
        assert torch.equal(a, b)
    # the judge's curve: one point per epoch start and one at the end, the same after the resume
    curve = generators.load(whole_path)[1]["judge_curve"]
    steps = len(dataset.train_labels) // config.batch_size
    assert [p["iteration"] for p in curve] == [e * steps for e in range(config.epochs + 1)]
    assert generators.load(resumed_path)[1]["judge_curve"] == curve


def test_d2m_moves_the_generator_and_writes_both_sets(tmp_path):
    out, report = _run(tmp_path, "run", "--iterations", "3")
    base = torch.load(tmp_path / "run" / "pretrained-generator-baseline.pt", weights_only=True)
    assert out["images"].shape == base["images"].shape == (20, 1, 16, 16)
    assert torch.equal(out["labels"], base["labels"]) and not torch.allclose(out["images"], base["images"])
    refined, meta = generators.load(tmp_path / "run" / "generator.pt")
    assert meta["stage"] == "d2m" and report["time_split_seconds"]["refinement"] > 0
    # python -m ddfast.generate reproduces the distilled set from the stored generator
    assert generate_main([str(tmp_path / "run" / "generator.pt"), "--ipc", "2", "--seed", "0", "--out", str(tmp_path / "gen")]) == 0
    regenerated = io.load(tmp_path / "gen" / "distilled.pt")
    assert torch.allclose(regenerated["images"], out["images"], atol=1e-6)
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert generate_main([str(tmp_path / "run" / "generator.pt"), "--ipc", "0", "--out", str(tmp_path / "bad")]) == 2


def test_segment_run_gives_the_whole_batch_generator(tmp_path):
    # SGD: Adam's normalised step turns fp32 rounding of near-zero gradients into O(lr) differences
    sgd = ["--gen-optimizer", "sgd", "--lr-gen", "1e-3"]
    whole, _ = _run(tmp_path, "whole", *sgd)
    seg, _ = _run(tmp_path, "seg", "--segment", "5", *sgd)
    base = torch.load(tmp_path / "whole" / "pretrained-generator-baseline.pt", weights_only=True)
    assert rel_error(whole["images"], base["images"]) > 1e-3  # the generator moved
    assert rel_error(seg["images"], whole["images"]) < 1e-5


def test_more_pretraining_epochs_run_on_from_the_cached_shorter_schedule(tmp_path, monkeypatch, capsys):
    dataset = data.synthetic(train_per_class=200)
    short, long = (generators.GANConfig(epochs=e, width=8, z_dim=16, batch_size=64) for e in (2, 4))
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "scratch"))
    scratch = generators.pretrain(dataset, long)[1]
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "extended"))
    generators.pretrain(dataset, short)
    capsys.readouterr()
    extended = generators.pretrain(dataset, long)[1]
    steps = len(dataset.train_labels) // 64
    assert f"continuing from step {2 * steps} of {4 * steps}" in capsys.readouterr().out
    a, b = generators.load(scratch), generators.load(extended)
    for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values()):
        assert torch.equal(x, y)
    assert a[1]["judge_curve"] == b[1]["judge_curve"]


def test_sigkill_resumes_to_the_same_generator(tmp_path, monkeypatch):
    extra = ["--iterations", "60"]
    whole, whole_report = run_distill(["--method", "d2m", *BASE, *extra], tmp_path / "uninterrupted")
    out = tmp_path / "killed"
    cmd = [*STEPPING_DISTILL, "--method", "d2m", *BASE, *extra, "--out", str(out)]
    assert sigkill_after_checkpoint(cmd, out / "checkpoint" / "d2m.pt") in (25, 50) and not (out / "distilled.pt").exists()
    monkeypatch.setattr("ddfast.runner.time", SteppingClock())
    resumed, report = _run(tmp_path, "killed", *extra)
    assert torch.equal(resumed["images"], whole["images"])
    # the checkpoint's time covers the iterations before the kill: per iteration over all 60
    assert report["seconds_per_iteration"] == pytest.approx(report["time_split_seconds"]["refinement"] / 60)
    assert_resumed_speed(report, whole_report)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--iterations", "0"], "--iterations must be >= 1"),
        (["--d2m-batch", "0"], "--d2m-batch must be >= 1"),
        (["--d2m-batch", "100000"], "exceeds"),
        (["--lr-gen", "0"], "--lr-gen"),
        (["--pm-temperature", "0"], "--pm-temperature"),
        (["--match-norm", "batchnorm"], "instance norm"),
        (["--gen-width", "0"], "--gen-width must be >= 1"),
    ],
)
def test_bad_arguments_fail_before_work(tmp_path, extra, message):
    args = build_parser().parse_args(["--method", "d2m", *BASE, "--out", str(tmp_path / "x"), *extra])
    with pytest.raises(ValueError, match=message):
        run(args)
    assert not (tmp_path / "x").exists()
