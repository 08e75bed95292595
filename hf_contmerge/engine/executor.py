"""Running a pass's work units: reads ahead and writes behind in threads of their own, kernels in order.

Reads and writes each keep the planned order (one thread each), and every kernel and every
statistic runs in the calling thread, in order, so the bytes are the same as a sequential run.
Both threads spend their time in ``preadv``/``write``, which release the GIL.

Thread policy: memory-bound units (elementwise kernels on slices, rows of factored weights) run
with ``elementwise_threads`` torch threads, leaving cores to the reader and writer threads, which
each keep one busy copying pages; whole-matrix kernels (``WorkUnit.heavy``: SVDs, QRs) get every
thread torch was started with. On 2 cores that is 1 and 2 (measured in ``benchmarks/RESULTS.md``:
one OMP thread made elementwise merges faster while the I/O threads run).

``HF_CONTMERGE_FAILPOINT`` crash points live here too (:func:`failpoint`).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .plan import WorkUnit

# Reads run ahead, and writes queue behind, by at most this many chunks' worth of bytes (at least
# one item each way): a whole 11008 x 4096 matrix (unsliced kernels) then waits alone, not two deep.
PIPELINE_CHUNKS = 2
IO_THREADS = 2  # the reader and the writer

Write = tuple[Any, str, torch.Tensor]  # (writer, tensor name, chunk)


def failpoint(name: str) -> None:
    """Crash tests' hook: ``HF_CONTMERGE_FAILPOINT=<name>`` kills this process (SIGKILL) right here.

    Points: ``step-T:tensor-N`` (the N-th tensor of a pass of step T is about to be computed; the
    first pass that reaches N), ``step-T:evaluate`` (``--eval``: scored, its files written in the
    partial step, its record not yet) and ``step-T:publish`` (everything written, just before the
    rename that makes step T visible). ``HF_CONTMERGE_FAILPOINT_RANK=R``: only rank ``R`` of a
    multi-process run stops there.
    """
    rank = os.environ.get("HF_CONTMERGE_FAILPOINT_RANK")
    if rank is not None and os.environ.get("RANK", "0") != rank:
        return
    if os.environ.get("HF_CONTMERGE_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def elementwise_threads(threads: int) -> int:
    """torch threads for memory-bound units, out of the ``threads`` torch was started with."""
    return max(1, threads - IO_THREADS)


class ThreadPolicy:
    """Switches torch's thread count between heavy and memory-bound units; restores it on exit."""

    def __init__(self) -> None:
        self.heavy = torch.get_num_threads()
        self.light = elementwise_threads(self.heavy)
        self._now = self.heavy

    def use(self, heavy: bool) -> None:
        want = self.heavy if heavy else self.light
        if want != self._now:
            torch.set_num_threads(want)
            self._now = want

    def __enter__(self) -> ThreadPolicy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.use(True)


def run_units(units: Sequence[WorkUnit], load: Callable[[WorkUnit], Any], handle: Callable[[WorkUnit, Any], list[Write]],
              *, step: int, budget: int, progress: Callable[[WorkUnit], None] = lambda _: None) -> None:
    """Run ``handle(unit, load(unit))`` on every unit in order; append the ``(writer, name, chunk)``
    triples it returns to their writers in the writer thread. ``load`` runs in the reader thread, at
    most ``budget`` float32-equivalent bytes ahead; writes queue at most ``budget`` bytes behind."""
    with ThreadPoolExecutor(1, thread_name_prefix="contmerge-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="contmerge-write") as writer, ThreadPolicy() as threads:
        loads: deque = deque()
        writes: deque = deque()
        next_load, read_ahead, written_behind = 0, 0, 0

        def fill() -> None:
            nonlocal next_load, read_ahead
            while next_load < len(units) and (not loads or read_ahead < budget):
                u = units[next_load]
                size = 0 if u.form == "factored" else 4 * u.numel
                loads.append((u, size, reader.submit(load, u)))
                read_ahead += size
                next_load += 1

        n_key, last_key = 0, None
        fill()
        while loads:
            u, size, future = loads.popleft()
            read_ahead -= size
            if u.key != last_key:
                n_key, last_key = n_key + 1, u.key
                failpoint(f"step-{step}:tensor-{n_key}")
            fill()  # the reader moves on while this chunk is computed
            threads.use(u.heavy)
            out = [(wr, name, t.cpu()) for wr, name, t in handle(u, future.result())]
            nbytes = sum(t.numel() * t.element_size() for _, _, t in out)
            writes.append((nbytes, writer.submit(_store, out)))
            written_behind += nbytes
            del out  # this chunk's buffers go once written, not when the next chunk replaces them
            while len(writes) > 1 and written_behind > budget:
                done_bytes, done = writes.popleft()
                done.result()
                written_behind -= done_bytes
            progress(u)
        for _, future in writes:
            future.result()


def _store(writes: list[Write]) -> None:
    """Writer thread: append chunks to their writers, in the order they were queued."""
    for w, name, tensor in writes:
        w.write(name, tensor)
