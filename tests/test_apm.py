"""APM pipeline (--method apm): the fused image update against the official-style one, the exact
--segment contract, vmapped checkpoints, student schedule, resume after SIGKILL, argument checks and
the l1 evaluation protocol — on the small synthetic dataset."""
from __future__ import annotations

import copy

import pytest
import torch

from ddfast import data, models
from ddfast.distill import build_parser, run
from ddfast.evaluate import evaluate_synset
from ddfast.methods import apm
from ddfast.testing import STEPPING_DISTILL, SteppingClock, assert_resumed_speed, rel_error, run_distill, sigkill_after_checkpoint
from ddfast.train import TrainConfig

BASE = ["--dataset", "synthetic", "--ipc", "2", "--iterations", "4", "--teachers", "2", "--teacher-epochs", "1",
        "--net-width", "8", "--student-epochs", "4", "--checkpoints", "2", "--mid-gap", "1", "--no-eval"]


pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py


def _run(tmp_path, name, *extra):
    args = build_parser().parse_args(["--method", "apm", *BASE, "--out", str(tmp_path / name), *extra])
    report = run(args)
    return torch.load(tmp_path / name / "distilled.pt", weights_only=True), report


def _config(**overrides) -> apm.Config:
    base = dict(ipc=3, iterations=4, teachers=1, teacher_epochs=1, teacher_images=0, net_width=8, student_epochs=4, checkpoints=3,
                mid_gap=1, alpha=0.1, distance="l1", eps=1e-8, lr_img=1.0, img_momentum=0.5, lr_net=0.02, batch_syn=30, batch_train=256,
                checkpoint_eval="auto", compile=False, segment=0, official=False, seed=0)
    return apm.Config(**{**base, **overrides})


def _nets(dtype, k=3, width=8, seed=0):
    torch.manual_seed(seed)
    make = lambda: models.create("convnet", 1, 10, (16, 16), width=width).to(dtype)  # noqa: E731
    teacher = apm._frozen(make())
    states = [{n: p.detach().clone() for n, p in make().named_parameters()} for _ in range(k)]
    middle = []
    for state in states:
        m = make()
        m.load_state_dict(state, strict=False)
        middle.append(m)
    return make(), teacher, states, middle


@pytest.mark.parametrize("distance", ["l1", "log"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_fused_update_matches_the_official_style_update(distance, dtype, tol):
    """vmapped frozen checkpoints + one teacher pass + K4 == the official per-checkpoint loop (distill.py:327-368)."""
    base, teacher, states, middle = _nets(dtype)
    cfg = _config(distance=distance)
    u = torch.randn(30, 1, 16, 16, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.arange(30) % 10
    idx = torch.arange(30)
    fused, loss = apm.image_gradient(u, idx, y, apm.MatchingNets(base, 3).load(teacher, states), cfg)
    for p in teacher.parameters():
        p.requires_grad_(True)
    official, loss_ref = apm.image_gradient_reference(u, idx, y, teacher, middle, cfg)
    assert rel_error(fused, official) < tol
    assert abs(loss - loss_ref) <= tol * abs(loss_ref)


@pytest.mark.parametrize("distance", ["l1", "log"])
@pytest.mark.parametrize("segment", [1, 7, 29])
def test_segments_give_the_whole_batch_gradient(segment, distance):
    base, teacher, states, _ = _nets(torch.float32)
    u = torch.randn(30, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    y = torch.arange(30) % 10
    idx = torch.randperm(30, generator=torch.Generator().manual_seed(3))[:23]  # a subset, unsorted
    nets = apm.MatchingNets(base, 3).load(teacher, states)
    whole, loss_whole = apm.image_gradient(u, idx, y, nets, _config(distance=distance, batch_syn=23))
    seg, loss_seg = apm.image_gradient(u, idx, y, nets, _config(distance=distance, batch_syn=23, segment=segment))
    assert rel_error(seg, whole) < 1e-5
    assert abs(loss_seg - loss_whole) < 1e-5 * abs(loss_whole)
    outside = torch.ones(30, dtype=torch.bool)
    outside[idx] = False
    assert (whole[outside] == 0).all()  # images outside the batch get no gradient


@pytest.mark.parametrize("mode,compile", [("vmap", False), ("loop", False), ("loop", True)])
def test_matching_nets_equal_each_module(mode, compile):
    dtype, tol = (torch.float32, 1e-5) if compile else (torch.float64, 1e-12)
    base, teacher, states, middle = _nets(dtype, k=4)
    nets = apm.MatchingNets(base, 4, mode, compile)
    for cycle in range(2):  # the slots take a second cycle's weights in place (no retrace when compiled)
        if cycle:
            teacher, states, middle = middle[0], [{n: p.detach() * 0.5 for n, p in m.named_parameters()} for m in middle], []
            for state in states:
                m = copy.deepcopy(base)
                m.load_state_dict(state, strict=False)
                middle.append(m)
        nets.load(teacher, states)
        x = torch.randn(5, 1, 16, 16, dtype=dtype, requires_grad=True)
        out = nets(x)
        assert out.shape == (5, 5, 10)
        for k, m in enumerate([teacher, *middle]):
            assert rel_error(out[k], m.eval()(x)) < tol
        (gx,) = torch.autograd.grad(out.square().sum(), x)
        (gx_ref,) = torch.autograd.grad(sum(m(x).square().sum() for m in [teacher, *middle]), x)
        assert rel_error(gx, gx_ref) < tol
    assert all(not p.requires_grad for m in [nets.teacher, *nets.students] for p in m.parameters())


def test_student_schedule_and_checkpoint_epochs():
    assert _config(student_epochs=250, checkpoints=5).checkpoint_epochs == [50, 100, 150, 200, 250]
    assert _config(student_epochs=10, checkpoints=3).checkpoint_epochs == [3, 7, 10]
    cfg = _config(student_epochs=250)
    assert apm.student_lr(cfg, 125) == pytest.approx(0.02) and apm.student_lr(cfg, 126) == pytest.approx(0.002)
    # fast and official-style students keep K checkpoints of the same parameters
    dataset = data.synthetic(image_size=16)
    images, targets = dataset.normalize(dataset.train_images[:20]), torch.randn(20, 10)
    student = apm.Student(dataset, 8, compile=False)
    torch.manual_seed(0)
    student.reinit()
    fast = apm.train_student(student, images, targets, _config(), torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    net = models.create("convnet", 1, 10, (16, 16), width=8)
    official = apm.train_student_reference(net, images, targets, _config(), torch.Generator().manual_seed(0))
    for states in (fast, official):
        assert len(states) == 3 and set(states[0]) == {n for n, _ in net.named_parameters()}
        assert not torch.equal(states[0]["classifier.weight"], states[-1]["classifier.weight"])


def test_teacher_recipe_is_the_official_one():
    cfg = apm.teacher_config(100)
    assert (cfg.lr, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.augment) == (0.05, 256, 0.9, 5e-4, "dsa")
    assert cfg.passes == 100 and cfg.lr_at(49) == pytest.approx(0.05) and cfg.lr_at(50) == pytest.approx(0.005)


def test_segment_run_gives_the_whole_batch_images(tmp_path):
    whole, report = _run(tmp_path, "whole")
    seg, _ = _run(tmp_path, "seg", "--segment", "3")  # both compiled (the default): same students, segmented update
    assert rel_error(seg["images"], whole["images"]) < 1e-5
    assert torch.equal(seg["labels"], whole["labels"])
    assert whole["soft_labels"].shape == (20, 10) and whole["meta"]["label_mode"] == "l1"
    split = report["time_split_seconds"]
    assert split["student_training"] > 0 and split["image_update"] > 0
    assert report["seconds_per_iteration"] > 0


def test_reference_backend_runs_the_same_method(tmp_path):
    """Same teacher draws, subsets and image update; the students differ only in their RNG use
    (DataLoader shuffling), so both runs move the images and keep labels and shapes."""
    fused, _ = _run(tmp_path, "fused", "--no-compile", "--checkpoint-eval", "vmap")
    ref, report = _run(tmp_path, "ref", "--impl", "official")
    assert ref["images"].shape == fused["images"].shape and torch.equal(ref["labels"], fused["labels"])
    assert report["method_config"]["official"] is True
    start, _ = apm._init_images(data.synthetic(), _config(ipc=2, batch_syn=20))
    assert not torch.allclose(ref["images"], start) and not torch.allclose(fused["images"], start)


def test_sigkill_resumes_to_the_same_images(tmp_path, monkeypatch):
    extra = ["--iterations", "12", "--no-compile"]
    whole, whole_report = run_distill(["--method", "apm", *BASE, *extra], tmp_path / "uninterrupted")
    out = tmp_path / "killed"
    cmd = [*STEPPING_DISTILL, "--method", "apm", *BASE, *extra, "--out", str(out)]
    stopped_at = sigkill_after_checkpoint(cmd, out / "checkpoint" / "apm.pt", at_least=3)
    assert 3 <= stopped_at < 12 and not (out / "distilled.pt").exists()
    monkeypatch.setattr("ddfast.runner.time", SteppingClock())
    resumed, report = _run(tmp_path, "killed", *extra)
    assert torch.equal(resumed["images"], whole["images"])
    assert torch.equal(resumed["soft_labels"], whole["soft_labels"])
    assert_resumed_speed(report, whole_report)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--iterations", "0"], "--iterations must be >= 1"),
        (["--checkpoints", "9"], "cannot exceed --student-epochs"),
        (["--batch-syn", "21"], "--batch-syn must be in"),
        (["--mid-gap", "-1"], "--mid-gap"),
        (["--lr-img", "0"], "--lr-img"),
        (["--teachers", "0"], "--teachers must be >= 1"),
    ],
)
def test_bad_arguments_fail_before_work(tmp_path, extra, message):
    args = build_parser().parse_args(["--method", "apm", *BASE, "--out", str(tmp_path / "x"), *extra])
    with pytest.raises(ValueError, match=message):
        run(args)
    assert not (tmp_path / "x").exists()


def test_l1_protocol_trains_on_logits_with_the_apm_schedule():
    dataset = data.synthetic(image_size=16)
    images, labels = dataset.normalize(dataset.train_images[:20]), dataset.train_labels[:20]
    soft = torch.nn.functional.one_hot(labels, 10).float() * 5
    result = evaluate_synset(images, labels, dataset, soft_labels=soft, width=8, epochs=2, runs=1, label_mode="l1")
    p = result["protocol"]
    assert (p["labels"], p["recipe"], p["lr"], p["schedule"], p["passes"]) == ("l1", "apm-l1", 0.02, "multistep", 3)
    with pytest.raises(ValueError, match="needs a distilled set with soft labels"):
        evaluate_synset(images, labels, dataset, width=8, epochs=1, runs=1, label_mode="l1")
    multistep = TrainConfig(epochs=10, lr=1.0, schedule="multistep")
    assert multistep.lr_at(5) == 1.0 and multistep.lr_at(6) == pytest.approx(0.1)


def test_image_lr_keeps_the_per_image_step_in_the_default_preset():
    """default: γ = 0.01·B (per-image step γ/B fixed across IPCs); paper: the official γ = 1; --lr-img wins."""
    parse = lambda *extra: build_parser().parse_args(["--method", "apm", "--ipc", "2", *extra])  # noqa: E731
    assert apm.resolve_config(parse(), 10).lr_img == pytest.approx(0.2)
    assert apm.resolve_config(parse("--batch-syn", "5"), 10).lr_img == pytest.approx(0.05)
    assert apm.resolve_config(parse("--preset", "paper"), 10).lr_img == 1.0
    assert apm.resolve_config(parse("--lr-img", "3"), 10).lr_img == 3.0
