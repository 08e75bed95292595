"""What a page written afresh costs on this machine: the same file write right after freeing as much
memory, and after a pause. A virtual machine that hands freed guest memory back to its host (free page
reporting, ~2 s after the free) makes every page touched afresh after that a host fault; writes that
reuse pages freed a moment before do not pay it. ``bench_stream.py`` settles before every timed
operation because of it (its docstring).

    python benchmarks/first_touch.py [--gb 0.97] [--pauses 0 1 2 3 5] [--scratch /work/bench-scratch]

Prints, per pause: the wall and CPU seconds (this process: user + system) of writing and fsyncing
``--gb`` GB into a new file, right after writing and deleting a file of that size, then pausing.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

BLOCK = 16 * 2**20


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write(path: Path, blocks: int, buf: bytes) -> tuple[float, float]:
    """Write ``blocks`` copies of ``buf`` to ``path``, fsync; (wall s, CPU s)."""
    t, c = time.perf_counter(), cpu_seconds()
    with open(path, "wb", buffering=0) as f:
        for _ in range(blocks):
            f.write(buf)
        os.fsync(f.fileno())
    return time.perf_counter() - t, cpu_seconds() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=0.97)
    parser.add_argument("--pauses", type=float, nargs="+", default=[0, 1, 2, 3, 5])
    parser.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"))
    args = parser.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    buf, blocks = os.urandom(BLOCK), max(1, round(args.gb * 1e9 / BLOCK))
    first, second = args.scratch / "first-touch-a.bin", args.scratch / "first-touch-b.bin"
    print(f"| pause before the write (s) | write {blocks * BLOCK / 1e9:.2f} GB + fsync: wall s | CPU s |\n|---|---|---|")
    for pause in args.pauses:
        write(first, blocks, buf)
        first.unlink()  # its page-cache pages are free now
        time.sleep(pause)
        wall, cpu = write(second, blocks, buf)
        second.unlink()
        print(f"| {pause:g} | {wall:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
