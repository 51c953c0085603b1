"""torchrun: N processes give the same distilled set as one (gvbsm on the synthetic dataset, gloo on CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ddfast import distributed

pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py

# 10 classes × IPC 4 in batches of 8: 5 recover batches, dealt 3 / 2 to two ranks
ARGS = ["--method", "gvbsm", "--dataset", "synthetic", "--ipc", "4", "--iterations", "3", "--batch-size", "8",
        "--backbones", "resnet18:8,convnet:8", "--teacher-epochs", "1", "--no-eval", "--candidates", "6"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DDFAST_NO_PROGRESS": "1"}  # torchrun's default thread count, for both runs


def _launch(out, nproc, *extra):
    env = {**ENV, "DDFAST_CACHE_DIR": str(out.parent / f"cache-{out.name}")}  # each launch trains its own teachers
    if nproc == 1:
        cmd = [sys.executable, "-m", "ddfast.distill", *ARGS, "--out", str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "ddfast.distill", *ARGS, "--out", str(out), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_processes_give_the_one_process_set(tmp_path):
    one = _launch(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _launch(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "distilled.pt", weights_only=True)
    b = torch.load(tmp_path / "two" / "distilled.pt", weights_only=True)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert torch.equal(a["soft_labels"], b["soft_labels"])
    # the two ranks trained one teacher each; each rank checkpointed its own batches: rank 0 the 3 of 0, 2, 4; rank 1 the 2 of 1, 3
    counts = [torch.load(tmp_path / "two" / "checkpoint" / f"gvbsm.rank{r}of2.pt", weights_only=True)["iteration"] for r in (0, 1)]
    assert counts == [3, 2]


def test_a_method_without_work_units_refuses_torchrun(tmp_path):
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddfast.distill",
                          "--method", "random", "--dataset", "synthetic", "--ipc", "2", "--no-eval", "--out", str(tmp_path / "r")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "launch it without torchrun" in res.stderr


def test_units_are_dealt_round_robin_and_gathered_in_order():
    assert distributed.my_units(distributed.World(1, 3), 8) == [1, 4, 7]
    assert distributed.my_units(distributed.SINGLE, 3) == [0, 1, 2]
    assert distributed.gather_units(distributed.SINGLE, {1: "b", 0: "a"}, 2) == ["a", "b"]


def test_evaluation_runs_over_two_processes_give_the_one_process_accuracies(tmp_path):
    from ddfast import data, io

    ds = data.load("synthetic")
    idx = torch.arange(0, len(ds.train_labels), 12)
    io.save(tmp_path / "set.pt", ds.normalize(ds.train_images[idx]), ds.train_labels[idx], None, {"method": "random", "dataset": "synthetic"})
    args = [str(tmp_path / "set.pt"), "--epochs", "3", "--runs", "3", "--width", "8"]
    one = subprocess.run([sys.executable, "-m", "ddfast.evaluate", *args, "--json", str(tmp_path / "one.json")], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddfast.evaluate",
                          *args, "--json", str(tmp_path / "two.json")], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert a["accs"] == b["accs"] and a["mean"] == b["mean"] and len(b["accs"]) == 3  # runs 0, 2 on rank 0; run 1 on rank 1
