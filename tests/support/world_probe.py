"""Run by tests/engine/test_distributed.py on two ranks: rank 0 works alone (``World.on_main``) in the
way ``sys.argv[1]`` names, with a 2-second ``--dist-timeout``; each rank prints what it got.

slow: rank 0 works 6 s (three timeouts) and returns 42; raise: rank 0 raises; hang: rank 0 stops
itself (SIGSTOP) mid-work, as a hung process would.
"""

import os
import signal
import sys
import time

import torch.distributed as dist

from hf_contmerge.engine.distributed import DistributedWorld
from hf_contmerge.errors import ContMergeError


def work(mode: str) -> int:
    if mode == "raise":
        raise ValueError("no such dataset")
    if mode == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(6)
    return 42


world = DistributedWorld("cpu", 2.0)
start = time.monotonic()
try:
    result = world.on_main("probing", lambda: work(sys.argv[1]))
    print(f"rank {world.rank}: got {result}", flush=True)
except (ContMergeError, ValueError) as e:
    print(f"rank {world.rank}: failed after {time.monotonic() - start:.1f} s: {e}", flush=True)
    sys.exit(3)
finally:  # gloo's threads stopped before the interpreter ends (else an abort at exit, seen once)
    dist.destroy_process_group()
