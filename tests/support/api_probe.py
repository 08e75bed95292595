"""Run by tests/engine/test_distributed.py on two ranks: the Python API inside a script's own job.

``argv``: mode, base, out, items…. ``own``: the script starts its own process group first; ``fresh``: it has
none, the first step starts one and the later steps use it. Either way the API writes one step per item (an
``Engine`` a step, so a world a step); ``own``: the script's group still works after (an all-reduce). Each
rank prints what it got.
"""

import sys

import torch
import torch.distributed as dist

from hf_contmerge import ContinualMerger

mode, base, out, *items = sys.argv[1:]
if mode == "own":
    dist.init_process_group("gloo")
merger = ContinualMerger(base=base, method="task_arithmetic", out=out)
for item in items:
    merger.step(item)
if mode == "own":
    total = torch.ones(1)
    dist.all_reduce(total)
    print(f"rank {dist.get_rank()}: all-reduce {int(total.item())}", flush=True)
    dist.destroy_process_group()
print(f"steps {len(items)} done", flush=True)
