"""A torchrun worker for tests/test_gpt2_distributed.py: runs the GPT-2 driver on its
command line and records the size of every tensor that Python code hands to
``torch.distributed.all_reduce`` (DDP's own bucketed all-reduce runs in its C++
reducer, not through this function), into ``$RECORD_DIR/all_reduce_rank{RANK}.json``.
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sizes = []
_all_reduce = dist.all_reduce


def recording_all_reduce(tensor, *args, **kwargs):
    sizes.append(tensor.numel())
    return _all_reduce(tensor, *args, **kwargs)


dist.all_reduce = recording_all_reduce

from scalegrad.gpt2.driver import run  # noqa: E402
from scalegrad.gpt2.options import parse_args  # noqa: E402

if __name__ == "__main__":
    result = run(parse_args(sys.argv[1:]))
    assert result.train.status == "finished", result.train
    record = Path(os.environ["RECORD_DIR"]) / f"all_reduce_rank{os.environ['RANK']}.json"
    record.write_text(json.dumps(sizes))
