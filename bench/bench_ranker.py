"""Benchmark: ranker training throughput (samples/s), batch 4096, history 50, d 64, full variant.

Reference in the same process: a plain-torch DIN with the same shapes (four concat-MLP target attentions
over gathered history embeddings, same DNN), i.e. what one writes without semalign's tricks (per-item
key projections, per-row view tables). Ratio > 1 means semalign trains faster. On CUDA it also times the step
as train_ranker runs it there (models.ranker_training.TrainStep: one CUDA graph, then compiled + graph) against the plain
DIN's step captured as one CUDA graph.
Runs unchanged on a GPU box with only torch (bf16 autocast on cuda).

  python bench/bench_ranker.py [--device cpu|cuda] [--steps N] [--items N]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from harness import RESULTS, write
from torch import nn

from semalign.models.ranker import ItemTables, Ranker, RankerConfig
from semalign.models.ranker_training import TrainStep


class PlainDIN(nn.Module):
    """The reference: textbook DIN attention (MLP over [q, k, q-k, q*k] per history slot)."""

    def __init__(self, n_items, content, codes, n_codes, d=64, n_user=2):
        super().__init__()
        self.register_buffer("content", content)
        self.register_buffer("codes", codes)
        self.id_emb = nn.Embedding(n_items + 1, d)
        self.proj = nn.Linear(content.shape[1], d)
        self.align = nn.ModuleList(nn.Embedding(n_codes, 32) for _ in range(codes.shape[1]))
        self.fusion = nn.Sequential(nn.Linear(32 * codes.shape[1], d), nn.GELU(), nn.Linear(d, d))
        self.att = nn.ModuleList(nn.Sequential(nn.Linear(4 * d, 32), nn.GELU(), nn.Linear(32, 1)) for _ in range(4))
        self.dnn = nn.Sequential(nn.Linear(n_user + 6 * d, 128), nn.GELU(), nn.Linear(128, 64), nn.GELU(), nn.Linear(64, 1))

    def views(self, idx):
        m = self.proj(self.content[idx]) + self.fusion(torch.cat([t(self.codes[idx, i]) for i, t in enumerate(self.align)], -1))
        return m, self.id_emb(idx)

    def attend(self, mlp, q, k, v, mask):
        qe = q.unsqueeze(1).expand_as(k)
        s = mlp(torch.cat([qe, k, qe - k, qe * k], -1)).squeeze(-1).masked_fill(~mask, -1e4)
        return (torch.softmax(s, 1).unsqueeze(-1) * v * mask.unsqueeze(-1)).sum(1)

    def forward(self, u, c, h):
        mask = h > 0
        mc, bc = self.views(c)
        mh, bh = self.views(h)
        outs = [self.attend(self.att[0], mc, mh, mh, mask), self.attend(self.att[1], mc, mh, bh, mask),
                self.attend(self.att[2], bc, bh, mh, mask), self.attend(self.att[3], bc, bh, bh, mask)]
        return self.dnn(torch.cat([u, mc, bc, *outs], -1)).squeeze(-1)


FUSED_ADAM = False  # --fused-adam: one fused kernel for the optimizer step on CUDA (both models alike)


def throughput(model, batches, device, steps, warmup=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=FUSED_ADAM or None)
    model.train()

    def step(i):
        u, c, h, y = batches[i % len(batches)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            logit = model(u, c, h)
        loss = F.binary_cross_entropy_with_logits(logit.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batches[0][1].shape[0] / (time.perf_counter() - t)


def graphed_reference(model, batches, steps, warmup=3):
    """The plain DIN's step captured as one CUDA graph the textbook way (static batch, capturable Adam), so the
    graph rows compare like with like."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
    model.train()
    static = [t.clone() for t in batches[0]]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            logit = model(*static[:3])
        loss = F.binary_cross_entropy_with_logits(logit.float(), static[3])
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    def run(i):
        for s, t in zip(static, batches[i % len(batches)]):
            s.copy_(t)
        graph.replay()
    for i in range(warmup):
        run(i)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(steps):
        run(i)
    torch.cuda.synchronize()
    return steps * batches[0][1].shape[0] / (time.perf_counter() - t)


WARMUP_S: dict[str, float] = {}  # warm-up + capture (+ compile) seconds of semalign's graphed step


def train_step_throughput(make_model, tables, batches, device, steps, compile_model=False, warmup=5):
    """semalign's own training step (models.ranker_training.TrainStep, as train_ranker runs it: CUDA graph on CUDA) over
    the same four batches, laid end to end as one device-resident frame."""
    cfg = RankerConfig(variant="full", batch_size=batches[0][1].shape[0])
    model = make_model()
    u, c, h, y = (torch.cat([b[k] for b in batches]) for k in range(4))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True, capturable=True)
    step = TrainStep(model, opt, cfg, (u, c, h, y), device, cuda_graph=True, compile_model=compile_model)
    model.train()
    idx = [torch.arange(k * cfg.batch_size, (k + 1) * cfg.batch_size, device=device) for k in range(len(batches))]
    t = time.perf_counter()
    for i in range(warmup):
        step(idx[i % len(idx)])
    torch.cuda.synchronize()
    WARMUP_S["compiled" if compile_model else "graph"] = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(steps):
        step(idx[i % len(idx)])
    torch.cuda.synchronize()
    if step.graph is None:
        raise RuntimeError("the training step was not captured as a CUDA graph")
    return steps * cfg.batch_size / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--hist", type=int, default=50)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--fused-adam", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    global FUSED_ADAM
    FUSED_ADAM = args.fused_adam
    dev = args.device
    gpu = dev.startswith("cuda")
    steps = args.steps or (200 if gpu else 8)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, L, K = args.items, 3, 256
    content = rng.standard_normal((n + 1, 128)).astype(np.float32)
    raw = rng.standard_normal((n + 1, 448)).astype(np.float32)
    codes = rng.integers(0, K, (n + 1, L))
    vocab = np.r_[0, np.arange(1, n + 1)]
    vocab[int(0.8 * n):] = 0  # 20% cold items share the OOV row
    tables = ItemTables(id_vocab=vocab, content=content, raw=raw, codes=codes, n_codes=K)
    batches = []
    for _ in range(4):
        pop = rng.zipf(1.3, (args.batch, args.hist + 1)) % n + 1  # long-tailed popularity, like real histories
        h = torch.as_tensor(pop[:, 1:], device=dev)
        h[: args.batch // 10, : args.hist // 2] = 0  # short histories
        batches.append((torch.randn(args.batch, 2, device=dev), torch.as_tensor(pop[:, 0], device=dev), h,
                        torch.randint(0, 2, (args.batch,), device=dev).float()))
    ours = Ranker(RankerConfig(variant="full"), tables, 2).to(dev)
    ref = PlainDIN(n, torch.as_tensor(content), torch.as_tensor(codes), K).to(dev)
    res = {"torch_threads": torch.get_num_threads(), "batch": args.batch, "hist": args.hist, "items": n, "d": 64, "steps": steps}
    res["reference_samples_per_s"] = throughput(ref, batches, dev, steps)
    res["semalign_samples_per_s"] = throughput(ours, batches, dev, steps)
    res["ratio"] = res["semalign_samples_per_s"] / res["reference_samples_per_s"]
    if gpu:
        try:
            comp = torch.compile(Ranker(RankerConfig(variant="full"), tables, 2).to(dev))
            res["semalign_compiled_samples_per_s"] = throughput(comp, batches, dev, steps, warmup=5)
            refc = torch.compile(PlainDIN(n, torch.as_tensor(content), torch.as_tensor(codes), K).to(dev))
            res["reference_compiled_samples_per_s"] = throughput(refc, batches, dev, steps, warmup=5)
        except Exception as e:  # report, don't hide: compile support varies by box
            res["compile_error"] = repr(e)[:300]
        make = lambda: Ranker(RankerConfig(variant="full"), tables, 2).to(dev)  # noqa: E731
        for key, fn in (("reference_graph_samples_per_s",
                         lambda: graphed_reference(PlainDIN(n, torch.as_tensor(content), torch.as_tensor(codes), K).to(dev),
                                                   batches, steps)),
                        ("semalign_graph_samples_per_s", lambda: train_step_throughput(make, tables, batches, dev, steps)),
                        ("semalign_compiled_graph_samples_per_s",
                         lambda: train_step_throughput(make, tables, batches, dev, steps, compile_model=True))):
            try:
                res[key] = fn()
            except Exception as e:  # noqa: BLE001 - reported in the table, not hidden
                res[key.replace("_samples_per_s", "_error")] = repr(e)[:300]
    md = ["| ranker training, full variant | samples/s | vs plain-torch DIN |", "|---|---|---|",
          f"| plain-torch DIN (reference) | {res['reference_samples_per_s']:,.0f} | 1.00 |",
          f"| semalign Ranker | {res['semalign_samples_per_s']:,.0f} | {res['ratio']:.2f} |"]
    if "semalign_compiled_samples_per_s" in res:
        md += [f"| plain-torch DIN, torch.compile | {res['reference_compiled_samples_per_s']:,.0f} | "
               f"{res['reference_compiled_samples_per_s'] / res['reference_samples_per_s']:.2f} |",
               f"| semalign Ranker, torch.compile | {res['semalign_compiled_samples_per_s']:,.0f} | "
               f"{res['semalign_compiled_samples_per_s'] / res['reference_samples_per_s']:.2f} |"]
    for key, label in (("reference_graph", "plain-torch DIN, step as one CUDA graph"),
                       ("semalign_graph", "semalign TrainStep (train_ranker's step on CUDA: one CUDA graph)"),
                       ("semalign_compiled_graph", "semalign TrainStep, torch.compile + CUDA graph")):
        if f"{key}_samples_per_s" in res:
            md.append(f"| {label} | {res[f'{key}_samples_per_s']:,.0f} | "
                      f"{res[f'{key}_samples_per_s'] / res['reference_samples_per_s']:.2f} |")
        elif f"{key}_error" in res:
            md.append(f"| {label} | failed: `{res[f'{key}_error'][:120]}` | - |")
    if WARMUP_S:
        res["semalign_graph_warmup_s"] = WARMUP_S
        md.append("\nwarm-up before the timed steps (eager steps, capture" + (", compile" if "compiled" in WARMUP_S else "")
                  + "): " + ", ".join(f"{k} {v:.1f} s" for k, v in WARMUP_S.items()) + ".")
    md.append(f"\nbatch {args.batch}, history {args.hist}, d 64, {n:,} items (20% cold), 3x{K} SIDs, {steps} timed steps.")
    write(args.tag or f"ranker_{'h100' if gpu else 'cpu'}", res, md, "Ranker training throughput", args.out)


if __name__ == "__main__":
    main()
