"""Teacher training (cache, atomic checkpoints, exact resume), the evaluation protocol and the
random baseline CLI, end to end on the small synthetic dataset."""
import json
import subprocess
import sys

import pytest
import torch

from ddfast import data, evaluate, io, train
from ddfast.selection import class_balanced_subset


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDFAST_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_step_schedule_matches_the_dc_code():
    config = train.TrainConfig(epochs=10, lr=0.01)
    assert config.passes == 11  # DC loops over range(Epoch + 1)
    assert [config.lr_at(e) for e in (0, 6)] == [0.01, 0.01]  # decay after epoch E//2 + 1 = 6
    assert config.lr_at(7) == pytest.approx(0.001)
    with pytest.raises(ValueError, match="augment must be one of"):
        train.TrainConfig(augment="mixup")


def test_teacher_is_cached_and_learns(cache):
    ds = data.load("synthetic")
    model, acc = train.get_teacher(ds, "convnet", width=16, epochs=8, seed=0, lr=0.05, batch_size=64)
    assert acc > 60, acc  # 10 classes: chance is 10%
    path = train.teacher_path("synthetic", "convnet", 16, 8, 0, lr=0.05, batch_size=64)
    assert path.is_file() and not path.with_suffix(".partial.pt").exists()
    assert path != train.teacher_path("synthetic", "convnet", 16, 8, 0)  # the recipe is part of the key
    again, acc2 = train.get_teacher(ds, "convnet", width=16, epochs=8, seed=0, lr=0.05, batch_size=64)
    assert acc2 == acc
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)


def test_interrupted_teacher_training_resumes_to_the_same_weights(cache, monkeypatch):
    ds = data.load("synthetic")
    reference, _ = train.get_teacher(ds, "convnet", width=8, epochs=4, seed=1)
    train.teacher_path("synthetic", "convnet", 8, 4, 1).unlink()

    real_fit = train.fit

    def fit_killed_after_two_epochs(*args, checkpoint=None, **kwargs):
        def checkpoint_then_die(state):
            checkpoint(state)
            if state["epoch"] == 2:
                raise KeyboardInterrupt

        return real_fit(*args, checkpoint=checkpoint_then_die, **kwargs)

    monkeypatch.setattr(train, "fit", fit_killed_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train.get_teacher(ds, "convnet", width=8, epochs=4, seed=1)
    partial = train.teacher_path("synthetic", "convnet", 8, 4, 1).with_suffix(".partial.pt")
    assert torch.load(partial, weights_only=True)["epoch"] == 2
    monkeypatch.setattr(train, "fit", real_fit)
    resumed, _ = train.get_teacher(ds, "convnet", width=8, epochs=4, seed=1)
    for p, q in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_teacher_on_a_training_subset_has_its_own_cache_entry(cache):
    ds = data.load("synthetic")
    train.get_teacher(ds, "convnet", width=8, epochs=1, seed=0, train_images=100)
    assert train.teacher_path("synthetic", "convnet", 8, 1, 0, subset=100).is_file()
    assert not train.teacher_path("synthetic", "convnet", 8, 1, 0).exists()
    assert train.random_subset(400, 400) is None and train.random_subset(400, 0) is None
    assert torch.equal(train.random_subset(400, 100), train.random_subset(400, 100))


def test_random_subset_is_class_balanced_and_seeded():
    labels = torch.arange(10).repeat_interleave(30)
    idx = class_balanced_subset(labels, 10, 5, seed=3)
    assert torch.equal(labels[idx], torch.arange(10).repeat_interleave(5))
    assert torch.equal(idx, class_balanced_subset(labels, 10, 5, seed=3))
    assert not torch.equal(idx, class_balanced_subset(labels, 10, 5, seed=4))
    with pytest.raises(ValueError, match="class 0 has only 30"):
        class_balanced_subset(labels, 10, 31, seed=0)


@pytest.mark.parametrize("label_mode, dsa", [("hard", True), ("hard", False), ("soft", True)])
def test_evaluate_trains_above_chance(label_mode, dsa):
    ds = data.load("synthetic")
    idx = class_balanced_subset(ds.train_labels, ds.num_classes, 5, seed=0)
    images, labels = ds.normalize(ds.train_images[idx]), ds.train_labels[idx]
    soft = torch.nn.functional.one_hot(labels, 10).float() * 8 if label_mode == "soft" else None
    result = evaluate.evaluate_synset(images, labels, ds, soft_labels=soft, width=16, epochs=20, runs=2, dsa=dsa, label_mode=label_mode)
    assert len(result["accs"]) == 2 and result["mean"] > 40, result
    assert result["protocol"]["labels"] == label_mode and result["protocol"]["dsa"] == dsa


def test_evaluate_runs_split_over_processes_match():
    ds = data.load("synthetic")
    idx = class_balanced_subset(ds.train_labels, ds.num_classes, 2, seed=0)
    images, labels = ds.normalize(ds.train_images[idx]), ds.train_labels[idx]
    kwargs = dict(width=8, epochs=3, dsa=True, seed=4)
    both = evaluate.evaluate_synset(images, labels, ds, runs=2, **kwargs)
    second = evaluate.evaluate_synset(images, labels, ds, runs=1, first_run=1, **kwargs)
    assert second["accs"] == both["accs"][1:] and second["protocol"]["first_run"] == 1
    with pytest.raises(ValueError, match="first run must be >= 0"):
        evaluate.evaluate_synset(images, labels, ds, runs=1, first_run=-1, **kwargs)


def test_evaluate_rejects_soft_mode_without_soft_labels():
    ds = data.load("synthetic")
    with pytest.raises(ValueError, match="needs a distilled set with soft labels"):
        evaluate.evaluate_synset(ds.train_images[:10], ds.train_labels[:10], ds, label_mode="soft")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env={"DDFAST_NO_PROGRESS": "1", "PATH": ""})


def test_distill_and_evaluate_cli(tmp_path):
    out = tmp_path / "run"
    proc = _cli("ddfast.distill", "--method", "random", "--dataset", "synthetic", "--ipc", "2", "--seed", "5",
                "--eval-epochs", "3", "--eval-runs", "1", "--eval-width", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "random" in proc.stdout and "accuracy" in proc.stdout
    blob = io.load(out / "distilled.pt")
    assert blob["images"].shape == (20, 1, 16, 16) and blob["meta"]["method"] == "random"
    assert blob["meta"]["seed"] == 5 and blob["meta"]["config"]["ipc"] == 2
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((out / "report.json").read_text())
    assert {"mean", "std", "accs", "protocol", "seconds_per_iteration", "peak_mem_mb"} <= set(report)

    result_path = tmp_path / "eval.json"
    proc = _cli("ddfast.evaluate", str(out / "distilled.pt"), "--epochs", "3", "--runs", "2", "--width", "8",
                "--no-dsa", "--labels", "hard", "--seed", "1", "--json", str(result_path))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_path.read_text())
    assert len(result["accs"]) == 2 and result["protocol"]["dsa"] is False and result["protocol"]["epochs"] == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ipc", "0"], "--ipc must be >= 1"),
        (["--segment", "-1"], "--segment must be >= 0"),
        (["--dataset", "imagenet-9000"], "unknown dataset"),
        (["--eval-model", "lenet"], "unknown model 'lenet'"),
    ],
)
def test_distill_cli_rejects_bad_arguments(tmp_path, args, message):
    proc = _cli("ddfast.distill", "--method", "random", "--dataset", "synthetic", "--eval-epochs", "1",
                "--out", str(tmp_path / "x"), *args)
    assert proc.returncode == 2
    assert message.lower() in proc.stderr.lower(), proc.stderr


def test_distill_help_explains_every_option():
    proc = _cli("ddfast.distill", "--help")
    assert proc.returncode == 0
    for option in ("--method", "--dataset", "--ipc", "--out", "--seed", "--segment", "--backend", "--no-eval", "--eval-epochs", "--dsa", "--labels"):
        assert option in proc.stdout
