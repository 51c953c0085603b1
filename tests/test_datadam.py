"""DataDAM (--method datadam) and the shared class-mean matching (ddfast.matching): the loss against
DataDAM's official loop and a float64 formula, the exact two-pass --segment gradient, siamese DSA per
class, resume after SIGKILL and argument checks — on the small synthetic dataset."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ddfast import augment, backend, data, models
from ddfast.distill import build_parser, run
from ddfast.matching import MatchConfig, match_loss, network_outputs, segmented_backward
from ddfast.methods import datadam
from ddfast.reference.attention_match_official import datadam_loss
from ddfast.testing import STEPPING_DISTILL, SteppingClock, assert_resumed_speed, rel_error, run_distill, sigkill_after_checkpoint

F64 = torch.float64
BASE = ["--dataset", "synthetic", "--ipc", "2", "--iterations", "4", "--net-width", "8", "--batch-real", "4", "--no-eval"]

pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py


def _run(tmp_path, name, *extra, method="datadam"):
    args = build_parser().parse_args(["--method", method, *BASE, "--out", str(tmp_path / name), *extra])
    report = run(args)
    return torch.load(tmp_path / name / "distilled.pt", weights_only=True), report


def _net(norm="instancenorm", width=8, seed=0, dtype=F64):
    torch.manual_seed(seed)
    net = models.create("convnet", 1, 10, (16, 16), width=width, norm=norm).to(dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.train()


def _formula(net, xr, yr, xs, ys, cfg: MatchConfig):
    """The loss written from the spec (§1) per class with F.normalize, in float64."""
    def stats(x):
        acts = []
        h = x
        for layer in net.features:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                acts.append(h)
        emb = h.flatten(1)
        maps = [F.normalize(a.abs().pow(cfg.power).sum(1).flatten(1), dim=1) for a in acts[:-1]]
        return maps, emb, net.classifier(emb)

    mr, er, orr = stats(xr)
    ms, es, os_ = stats(xs)
    loss = torch.zeros((), dtype=F64)
    for k in sorted(set(yr.tolist()) & set(ys.tolist())):
        r, s = yr == k, ys == k
        for a, b in zip(mr, ms):
            loss = loss + cfg.layer_weight * (a[r].mean(0) - b[s].mean(0)).square().sum()
        loss = loss + cfg.emb_weight * (er[r].mean(0) - es[s].mean(0)).square().sum()
        if cfg.pm_weight:
            p = F.softmax(orr[r].mean(0) / cfg.temperature, 0)
            q = F.softmax(os_[s].mean(0) / cfg.temperature, 0)
            loss = loss + cfg.pm_weight * (p * (p.log() - q.log())).sum()
    return loss


def _batches(seed=1, n_real=13, n_syn=11):
    gen = torch.Generator().manual_seed(seed)
    xr = torch.randn(n_real, 1, 16, 16, generator=gen, dtype=F64)
    xs = torch.randn(n_syn, 1, 16, 16, generator=gen, dtype=F64)
    yr = torch.randint(0, 4, (n_real,), generator=gen)
    ys = torch.randint(1, 5, (n_syn,), generator=gen)  # class 0 real only, class 4 synthetic only, ragged
    return xr, yr, xs, ys


@pytest.mark.parametrize("cfg", [MatchConfig(), MatchConfig(power=4.0, emb_weight=0.5, pm_weight=100.0),
                                 MatchConfig(power=2.0, pm_weight=3.0, temperature=2.0)])
def test_match_loss_and_gradient_equal_the_formula(cfg):
    net = _net()
    xr, yr, xs, ys = _batches()
    xs.requires_grad_(True)
    expected = _formula(net, xr, yr, xs, ys, cfg)
    g_expected, = torch.autograd.grad(expected, xs)
    with torch.no_grad():
        real = network_outputs(net, xr)
    loss = match_loss(real, network_outputs(net, xs), yr, ys, 10, cfg)
    g, = torch.autograd.grad(loss, xs)
    assert abs(float(loss.detach()) - float(expected.detach())) <= 1e-10 * float(expected.detach())
    assert rel_error(g, g_expected) < 1e-9


@pytest.mark.parametrize("segment", [1, 4, 11, 50])
@pytest.mark.parametrize("cfg", [MatchConfig(), MatchConfig(power=4.0, pm_weight=100.0)])
def test_segmented_backward_is_the_whole_batch_gradient(segment, cfg):
    net = _net()
    xr, yr, xs, ys = _batches(seed=2)
    xs.requires_grad_(True)
    expected = _formula(net, xr, yr, xs, ys, cfg)
    g_expected, = torch.autograd.grad(expected, xs)
    loss, g = segmented_backward(net, xr, yr, xs, ys, 10, cfg, segment)
    assert abs(loss - float(expected)) <= 1e-10 * float(expected.detach())
    assert rel_error(g, g_expected) < 1e-9


def test_segmented_backward_runs_k2_not_the_reference(monkeypatch):
    """--segment goes through K2's two-pass API (one class-sum call per forward segment, one vjp per backward
    segment) on the C++ backend; the reference attention maps are never computed."""
    import importlib

    from ddfast.reference import attention_match as ref

    k2 = importlib.import_module("ddfast.ops.attention_match")  # the package exports the function under this name

    def refuse(*args, **kwargs):
        raise AssertionError("the segmented path computed reference attention maps")

    monkeypatch.setattr(ref, "attention", refuse)
    calls = {"attention_class_sums": 0, "attention_vjp": 0}
    impl = k2._two_pass_impl

    def spy(name, *args):
        calls[name] += 1
        return impl(name, *args)

    monkeypatch.setattr(k2, "_two_pass_impl", spy)
    net = _net()
    xr, yr, xs, ys = _batches(seed=2)
    assert backend.select_backend(xs.device) == "cpu"
    segmented_backward(net, xr, yr, xs, ys, 10, MatchConfig(), 4)
    per = lambda n: -(-n // 4)  # noqa: E731
    assert calls == {"attention_class_sums": per(len(yr)) + per(len(ys)), "attention_vjp": per(len(ys))}


def test_match_loss_is_the_official_datadam_loss():
    """Class-sorted batches, batch_real per class: ddfast's loss == DataDAM main:301-310 (BN net, train mode)."""
    net = _net(norm="batchnorm", dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    xr, xs = torch.randn(10 * 4, 1, 16, 16, generator=gen), torch.randn(10 * 2, 1, 16, 16, generator=gen)
    yr, ys = torch.arange(10).repeat_interleave(4), torch.arange(10).repeat_interleave(2)
    with torch.no_grad():
        real = network_outputs(net, xr)
    syn = network_outputs(net, xs)
    ours = match_loss(real, syn, yr, ys, 10, MatchConfig())
    official = datadam_loss([a.detach() for a in real.acts], syn.acts, real.emb, syn.emb, num_classes=10, batch_real=4, ipc=2)
    assert abs(float(ours) - float(official)) <= 1e-5 * float(official)


def test_network_outputs_are_the_relu_hook_outputs():
    net = _net(dtype=torch.float32)
    x = torch.randn(5, 1, 16, 16)
    hooked = []
    handles = [m.register_forward_hook(lambda m, i, o: hooked.append(o.clone())) for m in net.features if isinstance(m, nn.ReLU)]
    logits = net(x)
    for h in handles:
        h.remove()
    out = network_outputs(net, x)
    assert len(out.acts) == 3 and all(torch.equal(a, b) for a, b in zip(out.acts, hooked))
    assert torch.equal(out.logits, logits) and torch.equal(out.emb, net.embed(x))


def test_siamese_dsa_draws_once_per_class():
    """The i-th real and i-th synthetic image of a class get the same transform whatever the batch sizes."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(10, 1, 16, 16, generator=gen)
    yr, ys = torch.arange(10).repeat(3), torch.arange(10).flip(0)  # real class-interleaved, synthetic reversed
    real = base[yr] + 0.0
    syn = base[ys] + 0.0
    for seed in range(5):
        r, s = augment.siamese_dsa(real, syn, yr, ys, 10, torch.Generator().manual_seed(seed))
        for k in range(10):
            assert torch.equal(r[(yr == k).nonzero()[0, 0]], s[(ys == k).nonzero()[0, 0]])


def test_segment_run_gives_the_whole_batch_images(tmp_path):
    whole, report = _run(tmp_path, "whole", "--match-norm", "instancenorm")
    seg, _ = _run(tmp_path, "seg", "--match-norm", "instancenorm", "--segment", "3")
    assert rel_error(seg["images"], whole["images"]) < 1e-5
    start, _ = datadam._init_images(data.synthetic(), datadam.Config(2, 4, 4, 8, "instancenorm", 1.0, 0.5, "real", {}, 0, 0))
    assert not torch.allclose(whole["images"], start)
    assert report["seconds_per_iteration"] > 0


def test_sigkill_resumes_to_the_same_images_and_speed(tmp_path, monkeypatch):
    extra = ["--iterations", "30"]
    whole, whole_report = run_distill(["--method", "datadam", *BASE, *extra], tmp_path / "uninterrupted")
    out = tmp_path / "killed"
    cmd = [*STEPPING_DISTILL, "--method", "datadam", *BASE, *extra, "--out", str(out)]
    stopped_at = sigkill_after_checkpoint(cmd, out / "checkpoint" / "datadam.pt", at_least=3)
    assert 3 <= stopped_at < 30 and not (out / "distilled.pt").exists()
    monkeypatch.setattr("ddfast.runner.time", SteppingClock())
    resumed, report = _run(tmp_path, "killed", *extra)
    assert torch.equal(resumed["images"], whole["images"])
    assert_resumed_speed(report, whole_report)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--iterations", "0"], "--iterations must be >= 1"),
        (["--batch-real", "0"], "--batch-real must be >= 1"),
        (["--batch-real", "41"], "fewer than --batch-real"),
        (["--att-power", "0"], "--att-power must be > 0"),
        (["--lr-img", "-1"], "--lr-img"),
        (["--segment", "2"], "--segment needs --match-norm instancenorm"),
    ],
)
def test_bad_arguments_fail_before_work(tmp_path, extra, message):
    args = build_parser().parse_args(["--method", "datadam", *BASE, "--out", str(tmp_path / "x"), *extra])
    with pytest.raises(ValueError, match=message):
        run(args)
    assert not (tmp_path / "x").exists()
