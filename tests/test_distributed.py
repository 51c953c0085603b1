"""torchrun: N processes give the same distilled set as one (gvbsm, apm, datadam on the synthetic dataset, gloo on
CPU); a killed rank ends the job with an error naming it, and the rerun resumes to the same set."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddfast import distributed

pytestmark = pytest.mark.usefixtures("module_cache_dir")  # tests/conftest.py

# 10 classes × IPC 4 in batches of 8: 5 recover batches, dealt 3 / 2 to two ranks
ARGS = ["--method", "gvbsm", "--dataset", "synthetic", "--ipc", "4", "--iterations", "3", "--batch-size", "8",
        "--backbones", "resnet18:8,convnet:8", "--teacher-epochs", "1", "--no-eval", "--candidates", "6"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DDFAST_NO_PROGRESS": "1"}  # torchrun's default thread count, for both runs


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
APM = ["--method", "apm", "--dataset", "synthetic", "--ipc", "2", "--iterations", "4", "--teachers", "3", "--teacher-epochs", "1",
       "--net-width", "8", "--student-epochs", "4", "--checkpoints", "2", "--mid-gap", "1", "--no-eval", "--no-compile"]
DATADAM = ["--method", "datadam", "--dataset", "synthetic", "--ipc", "2", "--iterations", "4", "--net-width", "8",
           "--batch-real", "4", "--match-norm", "instancenorm", "--class-groups", "3", "--no-eval"]


def _launch(out, nproc, *extra, args=ARGS, cache=None, program=("-m", "ddfast.distill")):
    # each launch trains its own teachers unless told to share a cache
    env = {**ENV, "DDFAST_CACHE_DIR": str(cache or out.parent / f"cache-{out.name}")}
    head = [sys.executable] if nproc == 1 else [*TORCHRUN, f"--nproc_per_node={nproc}"]
    return subprocess.run([*head, *program, *args, "--out", str(out), *extra], env=env, capture_output=True, text=True, timeout=600)


def _same_set(a_dir, b_dir):
    a, b = (torch.load(d / "distilled.pt", weights_only=True) for d in (a_dir, b_dir))
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    assert (a["soft_labels"] is None) == (b["soft_labels"] is None)
    assert a["soft_labels"] is None or torch.equal(a["soft_labels"], b["soft_labels"])


@pytest.fixture(scope="module")
def one_process_gvbsm(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gvbsm") / "one"
    one = _launch(out, 1)
    assert one.returncode == 0, one.stderr[-2000:]
    return out


def test_two_processes_give_the_one_process_set(one_process_gvbsm, tmp_path):
    two = _launch(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    _same_set(one_process_gvbsm, tmp_path / "two")
    # the two ranks trained one teacher each; each rank checkpointed its own batches: rank 0 the 3 of 0, 2, 4; rank 1 the 2 of 1, 3
    counts = [torch.load(tmp_path / "two" / "checkpoint" / f"gvbsm.rank{r}of2.pt", weights_only=True)["iteration"] for r in (0, 1)]
    assert counts == [3, 2]
    # each rank collected the conv statistics of its own backbones: the same float64 statistics as one process
    one_stats = sorted((one_process_gvbsm.parent / "cache-one" / "stats").rglob("*.pt"))
    two_stats = sorted((tmp_path / "cache-two" / "stats").rglob("*.pt"))
    assert len(one_stats) == 2 and [p.name for p in one_stats] == [p.name for p in two_stats]
    for a, b in zip(one_stats, two_stats):
        sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        flat = lambda blob: [t for t in torch.utils._pytree.tree_leaves(blob) if isinstance(t, torch.Tensor)]  # noqa: E731
        assert all(torch.equal(x, y) for x, y in zip(flat(sa), flat(sb))) and len(flat(sa)) == len(flat(sb)) > 0


def test_a_killed_rank_ends_the_job_naming_it_and_the_rerun_resumes_to_the_same_set(one_process_gvbsm, tmp_path):
    out, cache = tmp_path / "two", tmp_path / "cache"
    killed = _launch(out, 2, cache=cache, program=(str(Path(__file__).parent / "kill_rank_after_checkpoint.py"), "1"))
    assert killed.returncode != 0
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", killed.stderr) and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    assert torch.load(out / "checkpoint" / "gvbsm.rank1of2.pt", weights_only=True)["iteration"] == 1
    assert not (out / "distilled.pt").exists()
    rerun = _launch(out, 2, cache=cache)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming from" in rerun.stdout
    _same_set(one_process_gvbsm, out)


@pytest.mark.parametrize("method_args", [APM, DATADAM], ids=["apm", "datadam"])
def test_apm_and_datadam_two_processes_give_the_one_process_set(tmp_path, method_args):
    """apm: the teachers are dealt to the ranks, the rounds run on rank 0; datadam: the class groups are dealt to the
    ranks and the image gradient is summed over them."""
    for name, nproc in (("one", 1), ("two", 2)):
        res = _launch(tmp_path / name, nproc, args=method_args)
        assert res.returncode == 0, res.stderr[-2000:]
    _same_set(tmp_path / "one", tmp_path / "two")


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
