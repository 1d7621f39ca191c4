"""Benchmark: ranker training with torch DDP on several GPUs of one host against one GPU, in the same run.

Every figure is `train_ranker` itself (models/ranker_training.py: the loop the refresh and Ray Train run), on the same
synthetic frame (bench_ranker.py's shapes: 100k items, history 50, zipf popularity), samples/s over the epochs'
training steps (validation excluded), and the steady rate (the last epoch's: the first holds graph capture and
DDP's warm-up). One GPU: the eager step and the CUDA-graph step (train_ranker's default there).
N GPUs (one process each, NCCL): DDP ranks run the eager step (train_ranker's default under DDP); "same global
batch" splits 4096 rows over the ranks, "same batch per GPU" gives each rank 4096 rows (global 4096 x N), the usual
weak-scaling figure; the last rows ask train_ranker for the CUDA-graph step under DDP (cuda_graph=True), once per
DDP variant (--variants: plain = DDP's defaults; bucket-view = gradient_as_bucket_view; bf16 = gradients
all-reduced in bf16; one-bucket = every gradient in one bucket; no-buffer-sync = broadcast_buffers=False, as
train_ranker's callers wrap it, since the ranker's buffers are constant item tables; no-buffer-sync-bf16). The
eager DDP rows use DDP's defaults; --graph-only leaves them out.

--overhead needs one GPU: DDP over a one-rank NCCL group, so no bytes cross a link, against the same step without
DDP; what DDP itself costs a step (its reducer, bucket copies, the collective's launch), per variant.

  python bench/bench_ddp.py [--gpus 2] [--events 1000000] [--epochs 3] [--variants plain,no-buffer-sync] [--out DIR] [--tag T]
  python bench/bench_ddp.py --overhead [--tag ddp_overhead_h200]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from harness import RESULTS, write

from semalign.models.ranker import Frame, ItemTables, RankerConfig
from semalign.models.ranker_training import DDP_OPTIONS, train_ranker

ITEMS, HIST = 100_000, 50


def data(events: int):
    rng = np.random.default_rng(0)
    vocab = np.r_[0, np.arange(1, ITEMS + 1)]
    vocab[int(0.8 * ITEMS):] = 0
    content = rng.standard_normal((ITEMS + 1, 128)).astype(np.float32)
    tables = ItemTables(id_vocab=vocab, content=content, raw=rng.standard_normal((ITEMS + 1, 448)).astype(np.float32),
                        codes=rng.integers(0, 256, (ITEMS + 1, 3)), n_codes=256)

    def frame(n):
        cand = rng.zipf(1.3, n) % ITEMS + 1
        hist = rng.zipf(1.3, (n, HIST)) % ITEMS + 1
        y = (content[cand, 0] + rng.standard_normal(n) > 0).astype(np.float32)
        return Frame(user_feats=rng.standard_normal((n, 2)).astype(np.float32), cand=cand, hist=hist, label=y)
    return tables, frame(events), frame(20_000)


def config(batch: int, epochs: int) -> RankerConfig:
    return RankerConfig(variant="full", batch_size=batch, max_epochs=epochs, patience=epochs)


# DDP's keyword arguments per variant; "plain" is DDP's defaults, "no-buffer-sync" the ranker's own (DDP_OPTIONS)
VARIANTS = {"plain": {}, "bucket-view": {"gradient_as_bucket_view": True}, "bf16": {"hook": "bf16"},
            "one-bucket": {"bucket_cap_mb": 64}, "no-buffer-sync": DDP_OPTIONS,
            "no-buffer-sync-bf16": {**DDP_OPTIONS, "hook": "bf16"}}


def wrap_ddp(rank: int, variant: str):
    from torch.nn.parallel import DistributedDataParallel

    opts = dict(VARIANTS[variant])
    hook = opts.pop("hook", None)

    def wrap(model):
        ddp_model = DistributedDataParallel(model, device_ids=[rank], **opts)
        if hook == "bf16":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp_model.register_comm_hook(None, default_hooks.bf16_compress_hook)
        return ddp_model
    return wrap


def rank_main(rank: int, world: int, batch: int, args, port: int, out_file: str, graph: bool, variant: str):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if graph:  # NCCL's async error handling polls events a graph capture forbids (PyTorch's CUDA graph notes)
        os.environ.update(TORCH_NCCL_ASYNC_ERROR_HANDLING="0", NCCL_ASYNC_ERROR_HANDLING="0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world)
    try:
        tables, train, val = data(args.events)
        res = train_ranker(config(batch, args.epochs), tables, train, val, f"cuda:{rank}",
                           distributed=wrap_ddp(rank, variant), rank=rank,
                           world_size=world, cuda_graph=graph, compile_model=False)
        if rank == 0:  # every rank steps the same number of rows: the global rate is the rank's x world
            Path(out_file).write_text(json.dumps(
                {"per_rank_samples_per_s": res.samples_per_s, "samples_per_s": res.samples_per_s * world,
                 "steady_samples_per_s": res.epoch_samples_per_s[-1] * world,
                 "epoch_samples_per_s": [r * world for r in res.epoch_samples_per_s],
                 "best_val_auc": res.best_val_auc, "step_mode": res.step_mode, "ddp": variant}))
    finally:
        dist.destroy_process_group()


def ddp(world: int, batch: int, args, tag: str, graph: bool = False, variant: str = "plain") -> dict:
    import tempfile

    import torch.multiprocessing as mp

    out_file = os.path.join(tempfile.mkdtemp(), f"{tag}.json")
    port = 29500 + world + batch % 97 + int(graph) + 3 * list(VARIANTS).index(variant)
    mp.spawn(rank_main, args=(world, batch, args, port, out_file, graph, variant), nprocs=world, join=True)
    return json.loads(Path(out_file).read_text())


def one_gpu(args, tables, train, val, graph: bool) -> dict:
    r = train_ranker(config(args.batch, args.epochs), tables, train, val, "cuda:0", cuda_graph=graph,
                     compile_model=False)
    return {"samples_per_s": r.samples_per_s, "steady_samples_per_s": r.epoch_samples_per_s[-1],
            "epoch_samples_per_s": r.epoch_samples_per_s, "best_val_auc": r.best_val_auc,
            "step_mode": r.step_mode, "ddp": "-"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--variants", default="plain,no-buffer-sync", help=f"DDP variants of the graphed rows, from {list(VARIANTS)}")
    ap.add_argument("--eager-only", action="store_true", help="no DDP + CUDA graph rows")
    ap.add_argument("--graph-only", action="store_true", help="no eager DDP rows")
    ap.add_argument("--overhead", action="store_true", help="one GPU: DDP over one rank against no DDP")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        raise SystemExit(f"unknown DDP variants {sorted(unknown)}: expected some of {list(VARIANTS)}")
    args.tag = args.tag or ("ddp_overhead_h200" if args.overhead else "ddp_h200x2")
    n = 1 if args.overhead else args.gpus
    if torch.cuda.device_count() < n:
        raise SystemExit(f"needs {n} GPUs, sees {torch.cuda.device_count()}")
    tables, train, val = data(args.events)
    rows = {"1 GPU, eager step": one_gpu(args, tables, train, val, False),
            "1 GPU, CUDA-graph step (train_ranker's default)": one_gpu(args, tables, train, val, True)}
    del tables, train, val
    emit(args, rows, {})
    if args.overhead:  # the same step inside DDP over one rank: DDP's own cost, no link crossed
        rows["DDP over 1 rank, eager step"] = ddp(1, args.batch, args, "overhead-eager")
        emit(args, rows, {})
        for v in variants:
            rows[f"DDP over 1 rank ({v}), CUDA-graph step"] = ddp(1, args.batch, args, f"overhead-{v}", True, v)
            emit(args, rows, {})
        return
    if not args.graph_only:
        rows[f"{n} GPUs DDP, same global batch ({args.batch // n} a GPU)"] = ddp(n, args.batch, args, "strong")
        rows[f"{n} GPUs DDP, same batch per GPU ({args.batch} a GPU)"] = ddp(n, args.batch * n, args, "weak")
        emit(args, rows, {})
    if not args.eager_only:  # written after each row: a hung or failed graphed run leaves the rows before it
        errors = {}
        for v in variants:
            try:
                rows[f"{n} GPUs DDP ({v}), CUDA-graph step, {args.batch} a GPU"] = ddp(n, args.batch * n, args,
                                                                                     f"graph-{v}", True, v)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors[f"ddp_graph_error_{v}"] = repr(e)[:300]
            emit(args, rows, errors)


def emit(args, rows: dict, extra: dict) -> None:
    eager = rows["1 GPU, eager step"]
    graph = rows["1 GPU, CUDA-graph step (train_ranker's default)"]
    res = {"events": args.events, "epochs": args.epochs, "items": ITEMS, "hist": HIST, "rows": rows, **extra}
    md = ["| ranker training (train_ranker), full variant | step | samples/s (all epochs) | steady (last epoch) | "
          "vs 1 GPU eager | vs 1 GPU graph | steady vs 1 GPU graph steady | best val AUC |",
          "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        md.append(f"| {name} | {r['step_mode']} | {r['samples_per_s']:,.0f} | {r['steady_samples_per_s']:,.0f} | "
                  f"{r['samples_per_s'] / eager['samples_per_s']:.2f} | {r['samples_per_s'] / graph['samples_per_s']:.2f} | "
                  f"{r['steady_samples_per_s'] / graph['steady_samples_per_s']:.2f} | {r['best_val_auc']:.4f} |")
    for key, err in extra.items():
        md.append(f"\n{key}: `{err}`")
    md.append(f"\n{args.events:,} training events, {args.epochs} epochs, {ITEMS:,} items (20% cold), history {HIST}, "
              "3x256 SIDs; samples/s over the training steps (validation excluded); the steady rate is the last "
              "epoch's (the first holds warm-up and graph capture). Multi-GPU rows: global samples/s (a rank's x ranks).")
    write(args.tag, res, md, "Ranker training with DDP against one GPU", args.out)


if __name__ == "__main__":
    main()
