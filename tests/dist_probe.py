"""Run by tests/test_pytorchjob.py under torchrun on two 'nodes': joins the process group and checks the world."""

import json
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
print(json.dumps({"rank": dist.get_rank(), "world": dist.get_world_size(), "local_rank": int(os.environ["LOCAL_RANK"]),
                  "sum": value.item()}), flush=True)
dist.destroy_process_group()
