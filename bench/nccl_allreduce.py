"""The DDP bench's reference: one NCCL all-reduce of the ranker's gradient size (5.27M values: 21 MB fp32, 10.5 MB
bf16) between the GPUs of one host, alone (ms over 200 calls after 20 warm-up), so a DDP step's extra time can be
read against what the link needs. One process a GPU.

  NCCL_NVLS_ENABLE=0 python bench/nccl_allreduce.py [--gpus 2] [--values 5274629]
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, world: int, values: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29710")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(values, dtype=dtype, device=f"cuda:{rank}")
        for _ in range(20):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(200):
            dist.all_reduce(x)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / 200
        if rank == 0:
            mb = values * x.element_size() / 1e6
            print(json.dumps({"dtype": str(dtype), "mb": round(mb, 1), "ms": round(ms, 4),
                              "algbw_gb_s": round(mb / ms, 1)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--values", type=int, default=5_274_629)  # the full ranker's trainable parameters (bench_ddp)
    a = ap.parse_args()
    mp.spawn(rank_main, args=(a.gpus, a.values), nprocs=a.gpus, join=True)
