"""The processes of one merge: a single one, or the ranks of ``torchrun`` / ``accelerate launch``.

A run launched with ``WORLD_SIZE > 1`` in its environment joins Accelerate's process group
(``PartialState``: gloo on CPU, NCCL with ``--device cuda``, each rank on the GPU of its
``LOCAL_RANK``). Every rank pre-flights and plans the same steps (pure functions of the same
inputs), executes its share of each pass (``StepPlan.split``), and rank 0 alone writes what is
written once: the lock, the partial folder's side files, state and card, the hooks' work and the
publishing rename. ``torch.distributed`` collectives carry the few objects that cross ranks (the
partial folder's name, each unit's statistics, the factors of factored tensors); they wait at most
``--dist-timeout`` seconds, so a rank that stops answering fails the others instead of hanging them.

:meth:`World.agree` ends every phase: each rank says whether it failed, and if any did, all raise
(the failed rank its own error, the others one naming it), so no rank goes on to a step the others
abandoned and no partial step is published.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

from ..errors import ContMergeError

T = TypeVar("T")


class World:
    """One process: rank 0 of 1. Collectives return at once."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        return [obj]

    def broadcast(self, obj: T | None) -> T:
        """Rank 0's ``obj`` on every rank."""
        return obj

    @contextmanager
    def agree(self, what: str) -> Iterator[None]:
        """Run a phase on every rank; afterwards every rank raises if any rank failed in it."""
        yield


class DistributedWorld(World):
    """The ranks of a ``torchrun`` / ``accelerate launch`` job (see the module docstring)."""

    def __init__(self, device: str, timeout_s: float):
        from accelerate import PartialState

        self.state = PartialState(cpu=not device.startswith(("cuda", "auto")), timeout=timedelta(seconds=timeout_s))
        self.rank, self.size = self.state.process_index, self.state.num_processes
        if self.size < 2:
            raise ContMergeError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but Accelerate found {self.size} process: "
                                 "launch with torchrun or accelerate launch, on the machines the job names.")

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather_to_main(self, obj: Any) -> list[Any] | None:
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.size if self.main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: T | None) -> T:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def agree(self, what: str) -> Iterator[None]:
        error: BaseException | None = None
        try:
            yield
        except BaseException as e:  # every failure must reach the other ranks before this one stops
            error = e
        said = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(said) if m is not None]
        if failed:
            r, message = failed[0]
            raise ContMergeError(f"rank {r} of {self.size} failed while {what} ({message}); this rank stopped too. "
                                 "Nothing of that step was published; rerun with --resume to finish.")


def world_from_env(device: str, timeout_s: float) -> World:
    """The job this process belongs to: :class:`DistributedWorld` under a launcher (``WORLD_SIZE > 1``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DistributedWorld(device, timeout_s)
    return World()


def on_main(world: World, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result on every rank; a failure there fails every rank."""
    result = None
    with world.agree(what):
        if world.main:
            result = fn()
    return world.broadcast(result)
