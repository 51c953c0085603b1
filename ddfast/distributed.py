"""Scale out with torch.distributed: ``torchrun --nproc_per_node N -m ddfast.distill ...`` gives the same set as one process.

The design (so that 1 and N processes agree bit for bit):

* **work units that do not depend on the world size**: a unit (for gvbsm/sre2l one recover batch, a fixed group of
  classes in class-major order) is seeded from (seed, unit id) alone, never from the rank or the global RNG;
* units are dealt to ranks round-robin (:func:`my_units`) and gathered by unit id (:func:`gather_units`), with no
  padding and no duplicated unit;
* what every unit needs is built before the units start: the teachers and their statistics as units of their own
  (each rank trains and caches its share, then all read the cache), the selected initial images by rank 0 and
  broadcast (:func:`broadcast`);
* rank 0 writes the outputs and evaluates; every rank checkpoints its own units, so a rerun with the same world size
  resumes.

``python -m ddfast.distill`` alone stays one process and never initialises torch.distributed. gloo on CPU, NCCL when
CUDA is available (``--dist-backend`` overrides).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

BACKENDS = ("gloo", "nccl")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None) -> World:
    """Join the process group torchrun describes (one process: :data:`SINGLE`, nothing initialised)."""
    if not launched():
        return SINGLE
    import torch.distributed as dist  # noqa: PLC0415 - only when launched: no import cost for one process

    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"--dist-backend must be one of {BACKENDS}, got {backend!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size())


def shutdown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_initialized():
            dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()


def broadcast(world: World, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    if not world.distributed:
        return value
    import torch.distributed as dist  # noqa: PLC0415

    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def my_units(world: World, count: int) -> list[int]:
    """The unit ids of this rank: round-robin, ``rank, rank + size, ...``."""
    return list(range(world.rank, count, world.size))


def build_everywhere(world: World, count: int, build: Callable[[int], T]) -> list[T]:
    """Units every rank needs whose builds are cached (teachers, their statistics): each rank builds its share first,
    then, after a barrier, the others -- from the cache the other ranks just filled."""
    mine = {u: build(u) for u in my_units(world, count)}
    barrier(world)
    return [mine[u] if u in mine else build(u) for u in range(count)]


def checkpoint_name(world: World, name: str) -> str:
    """The file stem of this rank's checkpoint: ``name`` alone, ``name.rank{r}of{n}`` under torchrun (a rerun must
    use the same world size to resume)."""
    return name if not world.distributed else f"{name}.rank{world.rank}of{world.size}"


def all_units(world: World, results: dict[int, Any], count: int) -> list[Any]:
    """On every rank the results of all ``count`` units in unit order (every rank passes its own {unit id: result})."""
    if not world.distributed:
        return [results[u] for u in range(count)]
    import torch.distributed as dist  # noqa: PLC0415

    parts: list[dict[int, Any] | None] = [None] * world.size
    dist.all_gather_object(parts, results)
    merged = {u: r for part in parts for u, r in part.items()}
    return [merged[u] for u in range(count)]


def gather_units(world: World, results: dict[int, Any], count: int) -> list[Any] | None:
    """On rank 0 the results of all ``count`` units in unit order (every rank passes its own {unit id: result});
    None on the other ranks."""
    if not world.distributed:
        return [results[u] for u in range(count)]
    import torch.distributed as dist  # noqa: PLC0415

    parts: list[dict[int, Any]] | None = [None] * world.size if world.is_main else None
    dist.gather_object(results, parts, dst=0)
    if not world.is_main:
        return None
    merged: dict[int, Any] = {}
    for part in parts:
        merged.update(part)
    missing = sorted(set(range(count)) - set(merged))
    if missing:
        raise RuntimeError(f"units {missing} came back from no rank")
    return [merged[u] for u in range(count)]
