"""The loop around a method's iterations: resume, timing, progress, checkpoints.

A method keeps only its math -- one iteration (``step``) and what a checkpoint must hold (``state``) -- and
:class:`Loop` owns the rest, the same way for every method:

* **resume**: :meth:`Loop.resume` returns the state an interrupted run with the same configuration left in
  ``OUT/checkpoint/<name>.pt`` (a different configuration is refused with a clear error, never mixed);
* **checkpoints** every ``every`` iterations and after the last one, written atomically;
* **timing**: the seconds spent in ``step`` accumulate across resumes (the checkpoint carries them), so
  :attr:`Loop.seconds_per_iteration` is per iteration over the whole run, whatever the interruptions;
* **progress**: one bar per loop, starting where a resumed run starts, with the step's numbers as postfix.

Every method draws the randomness of iteration ``it`` from a generator seeded by (seed, it), so a resumed run
retraces the iterations it had not checkpointed and ends with the same result as an uninterrupted one.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ddfast.utils import atomic_torch_save, progress

CHECKPOINT_FORMAT = "ddfast-loop-checkpoint"


class Loop:
    def __init__(self, checkpoint: str | Path, config: Mapping[str, Any], total: int, desc: str, every: int = 1,
                 unit: str = "it") -> None:
        if total < 0 or every < 1:
            raise ValueError(f"a loop needs total >= 0 and every >= 1, got {total}, {every}")
        self.path, self.config, self.total, self.desc, self.every, self.unit = Path(checkpoint), dict(config), total, desc, every, unit
        self.first = 0  # iterations already done when this process started
        self.seconds = 0.0  # time inside step(), this run and the interrupted ones before it

    def resume(self) -> dict[str, Any] | None:
        """The state saved by an interrupted run with the same configuration, or None (nothing to resume)."""
        if not self.path.is_file():
            return None
        blob = torch.load(self.path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{self.path} is not a checkpoint of this ddfast version; remove {self.path.parent} or change --out")
        if blob["config"] != self.config:
            raise ValueError(f"{self.path} was written with different arguments; remove {self.path.parent} or change --out")
        self.first, self.seconds = blob["iteration"], blob["seconds"]
        print(f"resuming from {self.unit} {self.first} of {self.total} ({self.path})")
        return blob["state"]

    def continue_from(self, finished: Path | None) -> dict[str, Any] | None:
        """The final state of a shorter run of this loop (written by :meth:`keep`), to run on from, or None.

        Only for loops whose iteration ``it`` does not depend on ``total`` (e.g. a constant learning rate): the
        longer run then ends exactly where one uninterrupted run of ``total`` iterations would."""
        if finished is None:
            return None
        blob = torch.load(finished, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT or not 0 < blob["iteration"] < self.total:
            raise ValueError(f"{finished} is not the final state of a shorter run of {self.desc}")
        self.first, self.seconds = blob["iteration"], blob["seconds"]
        print(f"continuing from {self.unit} {self.first} of {self.total}: the shorter schedule kept in {finished}")
        return blob["state"]

    def keep(self, path: str | Path) -> None:
        """After the last iteration: keep the final checkpoint at ``path`` for :meth:`continue_from`."""
        self.path.replace(path)

    def run(self, step: Callable[[int], Mapping[str, float] | None], state: Callable[[], dict[str, Any]],
            first_note: str | None = None) -> None:
        """``step(it)`` for it from where the run stands to ``total``; ``state()`` is what a checkpoint stores.
        ``first_note`` is shown in the bar during this process's first step (e.g. that it compiles)."""
        bar = progress(total=self.total, initial=self.first, desc=self.desc, unit=self.unit)
        if first_note and self.first < self.total:
            bar.set_postfix_str(first_note, refresh=True)
        for it in range(self.first, self.total):
            start = time.time()
            shown = step(it)
            self.seconds += time.time() - start
            if (it + 1) % self.every == 0 or it + 1 == self.total:
                atomic_torch_save({"format": CHECKPOINT_FORMAT, "state": state(), "iteration": it + 1, "seconds": self.seconds,
                                   "config": self.config}, self.path)
            bar.update()
            if shown:
                bar.set_postfix({k: f"{v:.3f}" if isinstance(v, float) else v for k, v in shown.items()})
        bar.close()

    @property
    def seconds_per_iteration(self) -> float | None:
        """Seconds per iteration over the whole run (None for an empty loop)."""
        return self.seconds / self.total if self.total else None

    @property
    def iterations_this_process(self) -> int:
        return self.total - self.first
