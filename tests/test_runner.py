"""ddfast.runner.Loop: checkpoints, resume, refusal of a foreign or different-config checkpoint, timing across resumes."""
import pytest
import torch

from ddfast.runner import Loop


class Interrupted(Exception):
    pass


def _counting_run(path, total, every, stop_at=None, config=None):
    """A loop whose state is the list of iterations it ran; raises Interrupted before iteration ``stop_at``."""
    loop = Loop(path, config or {"lr": 0.1}, total, "test", every=every)
    saved = loop.resume()
    done = list(saved["done"]) if saved else []

    def step(it):
        if it == stop_at:
            raise Interrupted
        done.append(it)
        return {"loss": 1.0 / (it + 1), "tag": "x"}

    try:
        loop.run(step, lambda: {"done": torch.tensor(done)})
    except Interrupted:
        pass
    return loop, done


def test_checkpoints_every_n_and_after_the_last(tmp_path):
    path = tmp_path / "c.pt"
    loop, done = _counting_run(path, total=7, every=3, stop_at=5)
    assert done == [0, 1, 2, 3, 4] and torch.load(path, weights_only=True)["iteration"] == 3  # the last checkpoint: after it 2
    loop, done = _counting_run(path, total=7, every=3)
    assert loop.first == 3 and done == [0, 1, 2, 3, 4, 5, 6]  # 3 and 4 run again: their results were never saved
    assert torch.load(path, weights_only=True)["iteration"] == 7 and loop.iterations_this_process == 4
    loop, done = _counting_run(path, total=7, every=3)  # finished: nothing left to run
    assert loop.first == 7 and loop.iterations_this_process == 0 and done == list(range(7))


def test_seconds_accumulate_across_resumes(tmp_path, monkeypatch):
    clock = iter(range(0, 1000, 2))  # every time.time() call advances 2 s, so each step costs 2 s
    monkeypatch.setattr("ddfast.runner.time.time", lambda: next(clock))
    path = tmp_path / "c.pt"
    _counting_run(path, total=6, every=2, stop_at=4)  # 4 steps timed, checkpoint after step 3 holds 8 s
    loop, _ = _counting_run(path, total=6, every=2)
    assert loop.seconds == 12 and loop.seconds_per_iteration == 2  # 4 steps saved + 2 after the resume


def test_resume_refuses_other_arguments_and_foreign_files(tmp_path):
    path = tmp_path / "c.pt"
    _counting_run(path, total=4, every=1, stop_at=2)
    with pytest.raises(ValueError, match="different arguments"):
        _counting_run(path, total=4, every=1, config={"lr": 0.2})
    torch.save({"iteration": 2}, path)  # e.g. a checkpoint of an older ddfast
    with pytest.raises(ValueError, match="not a checkpoint of this ddfast version"):
        _counting_run(path, total=4, every=1)
    with pytest.raises(ValueError, match="every >= 1"):
        Loop(path, {}, 4, "test", every=0)


def test_first_note_shows_in_the_bar_during_the_first_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDFAST_NO_PROGRESS", "0")
    seen = []
    loop = Loop(tmp_path / "c.pt", {}, 2, "test")
    loop.run(lambda it: seen.append(capsys.readouterr().err), lambda: {}, first_note="compiling (torch.compile)")
    assert "compiling (torch.compile)" in seen[0]
