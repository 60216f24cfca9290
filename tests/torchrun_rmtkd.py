"""Run by test_rmtkd under ``torchrun``: RMT-KD on the planted task, widths per round to JSON."""

import json
import os
import sys

import torch
import torch.distributed as dist

import fxcompress
from planted import task, trained


def main(path):
    dist.init_process_group("gloo")
    train, val = task()
    config = fxcompress.RMTKDConfig(compress=fxcompress.CompressConfig(rule="mp-robust", round_to=1),
                                    distill=fxcompress.DistillConfig(epochs=1, progress=False),
                                    max_drop=0.05, target_reduction=0.99, max_passes=1)
    result = fxcompress.rmtkd(trained(depth=2), train, val, config)
    widths = [r.widths for r in result.rounds]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, widths)
    if dist.get_rank() == 0:
        with open(path, "w") as fh:
            json.dump({"widths": widths, "stop": result.stop, "ranks_agree": all(w == widths for w in every)}, fh)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without an
    # active exception", about one run in six here) after every result is written: skip it
    sys.stdout.flush()
    os._exit(0)
