"""``torchrun ... tests/kill_rank_after_checkpoint.py RANK ARGS...``: ``python -m ddfast.distill ARGS`` in which rank
RANK SIGKILLs itself right after writing its first run-loop checkpoint (a deterministic stand-in for a node that dies
mid-run; tests/test_distributed.py). Not collected by pytest (no test_ prefix)."""
import os
import signal
import sys

from ddfast import distill, runner

if __name__ == "__main__":
    victim = int(sys.argv[1])
    save = runner.atomic_torch_save

    def save_then_die(obj, path):
        save(obj, path)
        if int(os.environ["RANK"]) == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    runner.atomic_torch_save = save_then_die
    sys.exit(distill.main(sys.argv[2:]))
