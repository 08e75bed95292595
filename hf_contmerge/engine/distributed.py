"""The processes of one merge: a single one, or the ranks of ``torchrun`` / ``accelerate launch``.

A run launched with ``WORLD_SIZE > 1`` in its environment joins Accelerate's process group
(``PartialState``: gloo on CPU, NCCL with ``--device cuda``, each rank on the GPU of its
``LOCAL_RANK``). Every rank pre-flights and plans the same steps (pure functions of the same
inputs), executes its share of each pass (``StepPlan.split``), and rank 0 alone writes what is
written once: the lock, the partial folder's side files, state and card, the hooks' work and the
publishing rename. ``torch.distributed`` collectives carry the few objects that cross ranks (the
partial folder's name, each unit's statistics, the factors of factored tensors); they wait at most
``--dist-timeout`` seconds, so a rank that stops answering fails the others instead of hanging them.
Work that rank 0 does alone (:func:`on_main`: calibration, evaluation, publishing) may take longer
than that: rank 0 sends a heartbeat every few seconds meanwhile (on a gloo group of its own), so the
others wait as long as rank 0 is alive and fail within ``--dist-timeout`` once it stops answering.

:meth:`World.agree` ends every phase: each rank says whether it failed, and if any did, all raise
(the failed rank its own error, the others one naming it), so no rank goes on to a step the others
abandoned and no partial step is published.
"""

from __future__ import annotations

import os
import threading
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

    @contextmanager
    def agree(self, what: str) -> Iterator[None]:
        """Run a phase on every rank; afterwards every rank raises if any rank failed in it."""
        yield

    def on_main(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0, its (picklable) result on every rank; a failure there fails every rank."""
        return fn()

    def close(self) -> None:
        """Release what this world holds of the job (its own process group); the world is not used after this."""


class DistributedWorld(World):
    """The ranks of a ``torchrun`` / ``accelerate launch`` job (see the module docstring)."""

    def __init__(self, device: str, timeout_s: float):
        import torch.distributed as dist
        from accelerate import PartialState

        self.state = PartialState(cpu=not device.startswith(("cuda", "auto")), timeout=timedelta(seconds=timeout_s))
        self.rank, self.size = self.state.process_index, self.state.num_processes
        if self.size < 2:
            raise ContMergeError(f"WORLD_SIZE is {os.environ.get('WORLD_SIZE')} but Accelerate found {self.size} process: "
                                 "launch with torchrun or accelerate launch, on the machines the job names.")
        self.timeout_s = timeout_s
        self.beat_s = min(HEARTBEAT_S, timeout_s / 4)
        # rank 0's heartbeats: gloo whatever the main backend (NCCL would tie them to a CUDA stream)
        self._beats = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

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


    def on_main(self, what: str, fn: Callable[[], T]) -> T:
        import torch.distributed as dist

        def say(message: tuple) -> None:
            dist.broadcast_object_list([message], src=0, group=self._beats)

        if not self.main:
            while True:
                box: list[Any] = [None]
                try:
                    dist.broadcast_object_list(box, src=0, group=self._beats)
                except RuntimeError as e:  # gloo's timeout or a closed connection: rank 0 hung or gone
                    raise ContMergeError(f"rank 0 of {self.size} stopped answering while {what} (no heartbeat within "
                                         f"--dist-timeout {self.timeout_s:g} s, or its connection closed: {e}); this "
                                         "rank stopped too. Nothing of that step was published; rerun with --resume.") from None
                kind, payload = box[0]
                if kind == "done":
                    return payload
                if kind == "failed":
                    raise ContMergeError(f"rank 0 of {self.size} failed while {what} ({payload}); this rank stopped too. "
                                         "Nothing of that step was published; rerun with --resume to finish.")
        # fn runs in this (main) thread, as it would alone (signals, KeyboardInterrupt); a thread beats meanwhile
        stop = threading.Event()
        beat_error: list[BaseException] = []

        def beat() -> None:
            try:
                while not stop.wait(self.beat_s):
                    say(("working", None))
            except BaseException as e:  # a rank gone: rank 0 learns it when fn is done
                beat_error.append(e)

        beater = threading.Thread(target=beat, name="hf-contmerge-heartbeat", daemon=True)
        beater.start()
        try:
            result = fn()
        except BaseException as e:
            stop.set()
            beater.join()
            if not beat_error:
                try:
                    say(("failed", f"{type(e).__name__}: {e}"))
                except Exception:  # the others gone too: this rank's own error is the one to show
                    pass
            raise
        stop.set()
        beater.join()
        if beat_error:
            raise ContMergeError(f"rank 0 lost the other ranks while {what} ({beat_error[0]}); nothing of that step was "
                                 "published. Rerun with --resume to finish.") from None
        say(("done", result))
        return result

    def close(self) -> None:
        # this world's own group (a new one per world: an API run makes a world a step); the job's default group
        # stays for the next world, a process ending tears it down (end_job)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group(self._beats)


HEARTBEAT_S = 5.0  # how often rank 0 tells the others, during its own work, that it is alive


def world_from_env(device: str, timeout_s: float) -> World:
    """The job this process belongs to: :class:`DistributedWorld` under a launcher (``WORLD_SIZE > 1``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return DistributedWorld(device, timeout_s)
    return World()


def end_job() -> None:
    """At the end of a process that ran a job (the CLI's ``merge``): tear its default process group down here,
    not in the interpreter's exit, where gloo's threads made one rank in three abort ("terminate called
    without an active exception", SIGABRT) after its work was done. A script using the API keeps its group
    (it may have more to do with it, and a default group cannot be started again in the same job)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(world: World, what: str, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0, its result on every rank; a failure there fails every rank (:meth:`World.on_main`)."""
    return world.on_main(what, fn)
