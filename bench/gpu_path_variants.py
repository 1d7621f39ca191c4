"""Where SID assignment and the text tower lose time on the GPU: the variants tried, each timed in one process
(CUDA events via synchronize, median of repeats) and printed as one JSON line. Parts (arguments): sid (assignment
variants against the bare matmul), text (the tower's pieces: tokenizing, forward only, reference), textprof
(tokenizer processes x batch size), refreshtext (refresh-shaped texts, batch 64 / 1024 / 2048), kernelcheck (the
Triton kernel against the GEMM path on odd shapes), textgraph / textpipe / hostprof (the tower's CUDA-graph forward:
speed, agreement, where the host's time goes), refreshgraph (refresh-shaped texts, graphs on and off), rankerprof
(CUDA time by kernel of a ranker step), ddpprof (what DDP adds to the graphed step, over one rank), rankergraph
(train_ranker eager vs graphed vs compiled + graphed). Needs CUDA; SEMALIGN_TEXT_MODEL names the text model folder
(bench/device_scaling.sh builds MiniLM's shape with zeroed weights on the device machine). Results:
bench/results/gpu_path_variants_h200.md."""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_encoder_quantizer import device_batches, forward_only, synthetic  # noqa: E402
from models.codebook import build_codebook  # noqa: E402
from models.kmeans import _augment_centroids, _augment_torch, assign_levels  # noqa: E402

dev = "cuda"


def tm(fn, rep=5):
    fn()
    ts = []
    for _ in range(rep):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def out(**kw):
    print(json.dumps(kw), flush=True)


def assign_chunked(x, cents, chunk):
    d, ra = x.shape[1], _augment_torch(x)
    res = torch.empty((len(cents), len(x)), dtype=torch.long, device=x.device)
    for lvl, c in enumerate(cents):
        ca = _augment_centroids(c, ra)
        for s in range(0, len(ra), chunk):
            torch.argmin(ra[s: s + chunk] @ ca.T, 1, out=res[lvl, s: s + chunk])
        if lvl + 1 < len(cents):
            ra[:, :d] -= c[res[lvl]]
    return res.T


def assign_chunked_local(x, cents, chunk):
    """residual updated chunk by chunk right after its argmin (block still in L2)"""
    d = x.shape[1]
    ra = _augment_torch(x)
    cas = [_augment_centroids(c, ra).T.contiguous() for c in cents]
    res = torch.empty((len(x), len(cents)), dtype=torch.long, device=x.device)
    for s in range(0, len(ra), chunk):
        r = ra[s: s + chunk]
        for lvl, (c, caT) in enumerate(zip(cents, cas)):
            idx = torch.argmin(r @ caT, 1)
            res[s: s + chunk, lvl] = idx
            if lvl + 1 < len(cents):
                r[:, :d] -= c[idx]
    return res


def assign_addmm(x, cents, chunk):
    r = x.clone()
    res = torch.empty((len(cents), len(x)), dtype=torch.long, device=x.device)
    for lvl, c in enumerate(cents):
        cm = (-2.0 * c).T.contiguous()
        cn = (c * c).sum(1)
        for s in range(0, len(r), chunk):
            torch.argmin(torch.addmm(cn, r[s: s + chunk], cm), 1, out=res[lvl, s: s + chunk])
        if lvl + 1 < len(cents):
            r -= c[res[lvl]]
    return res.T


def assign_tf32_rerank(x, cents, chunk, k):
    d, ra = x.shape[1], _augment_torch(x)
    res = torch.empty((len(cents), len(x)), dtype=torch.long, device=x.device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for lvl, c in enumerate(cents):
            ca = _augment_centroids(c, ra)
            for s in range(0, len(ra), chunk):
                rc = ra[s: s + chunk]
                top = torch.topk(rc @ ca.T, k, 1, largest=False, sorted=False).indices
                exact = (rc[:, None, :] * ca[top]).sum(-1)  # elementwise: fp32 whatever the matmul flag
                res[lvl, s: s + chunk] = top.gather(1, exact.argmin(1, keepdim=True))[:, 0]
            if lvl + 1 < len(cents):
                ra[:, :d] -= c[res[lvl]]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return res.T


def triton_variant():
    import triton
    import triton.language as tl

    @triton.jit
    def nn_kernel(X, C, CN, OUT, R, n, lvl_stride, K: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, PREC: tl.constexpr, RESID: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BM + tl.arange(0, BM)
        rmask = rows < n
        dk = tl.arange(0, D)
        x = tl.load(X + rows[:, None] * D + dk[None, :], mask=rmask[:, None], other=0.0)
        best = tl.full([BM], float("inf"), tl.float32)
        besti = tl.zeros([BM], tl.int32)
        for j in range(0, K, BN):
            cols = j + tl.arange(0, BN)
            c = tl.load(C + cols[None, :] * D + dk[:, None])
            s = tl.dot(x, c, input_precision=PREC)
            s = tl.load(CN + cols)[None, :] - 2.0 * s
            m = tl.min(s, 1)
            mi = tl.argmin(s, 1) + j
            upd = m < best
            best = tl.where(upd, m, best)
            besti = tl.where(upd, mi, besti)
        tl.store(OUT + rows * lvl_stride, besti.to(tl.int64), mask=rmask)
        if RESID:
            cg = tl.load(C + besti[:, None] * D + dk[None, :])
            tl.store(R + rows[:, None] * D + dk[None, :], x - cg, mask=rmask[:, None])

    def run(x, cents, prec="ieee", BM=64, BN=64, warps=4, stages=2):
        n, d = x.shape
        r = x.contiguous().clone()
        res = torch.empty((n, len(cents)), dtype=torch.long, device=x.device)
        for lvl, c in enumerate(cents):
            cc = c.contiguous()
            cn = (cc * cc).sum(1)
            last = lvl + 1 == len(cents)
            nn_kernel[(triton.cdiv(n, BM),)](r, cc, cn, res[:, lvl], r, n, len(cents), K=len(c), D=d, BM=BM,
                                             BN=BN, PREC=prec, RESID=not last, num_warps=warps, num_stages=stages)
        return res
    return run


def sid_part():
    n = 1_000_000
    x = torch.as_tensor(synthetic(n), device=dev)
    cb = build_codebook(x, levels=3, codes=256, iters=20, device=dev, data_hash="given")
    cents = [c.to(dev).float() for c in cb.centroids]
    exact = assign_levels(x, cents, kernel="torch")

    def mm():
        for c in cents:
            x @ c.T
    t_mm = tm(mm)
    out(variant="bare_matmul", s=t_mm)
    t_cur = tm(lambda: assign_levels(x, cents, kernel="torch"))
    out(variant="gemm_path", s=t_cur, vs_matmul=t_mm / t_cur)
    t_fused = tm(lambda: assign_levels(x, cents))
    out(variant="assign_levels_default", s=t_fused, vs_matmul=t_mm / t_fused)
    cases = []
    for ch in (8192, 16384, 32768, 65536, 131072, 262144):
        cases.append((f"chunked_{ch}", lambda ch=ch: assign_chunked(x, cents, ch)))
        cases.append((f"chunked_local_{ch}", lambda ch=ch: assign_chunked_local(x, cents, ch)))
    for ch in (32768, 1_000_000):
        cases.append((f"addmm_{ch}", lambda ch=ch: assign_addmm(x, cents, ch)))
        for k in (2, 4):
            cases.append((f"tf32_top{k}_{ch}", lambda ch=ch, k=k: assign_tf32_rerank(x, cents, ch, k)))
    try:
        tr = triton_variant()
        for prec in ("ieee", "tf32", "tf32x3"):
            for BM, BN, w, st in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 2), (32, 64, 4, 2)):
                cases.append((f"triton_{prec}_{BM}x{BN}_w{w}", lambda p=prec, a=BM, b=BN, w=w, st=st: tr(x, cents, p, a, b, w, st)))
    except Exception as e:  # noqa: BLE001
        out(variant="triton", error=repr(e)[:300])
    for name, fn in cases:
        try:
            codes = fn()
            mism = int((codes != exact).any(1).sum())
            t = tm(fn)
            out(variant=name, s=t, vs_matmul=t_mm / t, rows_differing=mism)
        except Exception as e:  # noqa: BLE001
            out(variant=name, error=repr(e)[:400])
    torch.backends.cuda.matmul.allow_tf32 = True
    t_mm32 = tm(mm)
    torch.backends.cuda.matmul.allow_tf32 = False
    out(variant="bare_matmul_tf32", s=t_mm32)


def synthetic_titles(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = "the of a dark night love story man city war last return house girl blue red king".split()
    return [" ".join(rng.choice(words, rng.integers(2, 7))) for _ in range(n)]


def text_part():
    from models.towers import TextTower, length_batches
    m, texts = Path(os.environ["SEMALIGN_TEXT_MODEL"]), synthetic_titles(200_000)
    n = len(texts)
    for bs in (2048, 4096):
        tower = TextTower(m, device=dev, batch_size=bs, max_length=32, tokenize_workers=0)  # the one-thread path
        tower.encode(texts[:bs])
        t = tm(lambda: tower.encode(texts), rep=3)
        out(part="text", what="encode", batch=bs, per_s=n / t)
        batches = length_batches(texts, bs)
        t_tok = tm(lambda: [tower.tokenize([texts[i] for i in idx]) for idx in batches], rep=3)
        out(part="text", what="tokenize_only_sequential", batch=bs, per_s=n / t_tok)
        t_all = tm(lambda: tower._fast.encode_batch_fast(texts), rep=3)
        out(part="text", what="encode_batch_fast_all_at_once", per_s=n / t_all)
        toks = device_batches(tower, texts, bs)
        t_f = tm(lambda: forward_only(tower, toks), rep=3)
        out(part="text", what="forward_pool_only_on_device_tokens", batch=bs, per_s=n / t_f,
            mean_len=float(np.mean([b["input_ids"].shape[1] for b in toks])))
        tok = tower.tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")

        @torch.inference_mode()
        def plain():
            for s in range(0, n, bs):
                tower.model(input_ids=tok["input_ids"][s:s + bs].to(dev),
                            attention_mask=tok["attention_mask"][s:s + bs].to(dev))
        t_p = tm(plain, rep=3)
        out(part="text", what="reference_plain_32", batch=bs, per_s=n / t_p)
        # sdpa / compile of the forward
        try:
            cm = torch.compile(tower.model, dynamic=True)

            @torch.inference_mode()
            def fwdc():
                for b in toks:
                    cm(**b).last_hidden_state
            fwdc()
            out(part="text", what="compiled_forward_only", batch=bs, per_s=n / tm(fwdc, rep=3))
        except Exception as e:  # noqa: BLE001
            out(part="text", what="compile", error=repr(e)[:300])
        out(part="text", attn=str(getattr(tower.model.config, "_attn_implementation", "?")))


def textprof_part():
    from models.towers import TextTower, length_batches
    m, texts = Path(os.environ["SEMALIGN_TEXT_MODEL"]), synthetic_titles(400_000)
    n = len(texts)
    for bs in (2048, 8192, 16384):
        for workers in (0, 4, 8, 14):
            tower = TextTower(m, device=dev, batch_size=bs, max_length=32, tokenize_workers=workers)
            tower.encode(texts[: 4 * bs])
            batches = length_batches(texts, bs)
            t0 = time.perf_counter()
            for _ in tower._token_batches(texts, batches, 1024, pin=True):
                pass
            t_tok = time.perf_counter() - t0
            t = tm(lambda: tower.encode(texts), rep=2)
            out(part="textprof", batch=bs, workers=workers, tokens_only_per_s=n / t_tok, encode_per_s=n / t)
            if workers == 0:
                toks = device_batches(tower, texts, bs)
                out(part="textprof", batch=bs, forward_only_per_s=n / tm(lambda: forward_only(tower, toks), rep=2))
            tower.close()


def refresh_texts(n: int = 100_000) -> list[str]:
    """Refresh-shaped texts: a title and a 10-80 word description each."""
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(300)] + "the of a dark night love story man city war last return house".split()
    return [" ".join(rng.choice(vocab, rng.integers(2, 7))) + ". " + " ".join(rng.choice(vocab, rng.integers(10, 80)))
            for _ in range(n)]


def refreshtext_part():
    from models.towers import TextTower
    m = Path(os.environ["SEMALIGN_TEXT_MODEL"])
    texts = refresh_texts()
    n = len(texts)
    for bs in (64, 1024, 2048):
        for workers in (0, None):
            tower = TextTower(m, device=dev, batch_size=bs, tokenize_workers=workers)
            tower.encode(texts[: 4 * bs])
            t = tm(lambda: tower.encode(texts), rep=1)
            out(part="refreshtext", batch=bs, workers=tower.tokenize_workers, max_length=tower.max_length,
                encode_per_s=n / t, peak_gb=torch.cuda.max_memory_allocated() / 2**30)
            tower.close()


def refreshgraph_part():
    """Refresh-shaped texts with the tower's CUDA graphs on and off, in the main process's tokenizer processes
    (the refresh) and in one thread (a Ray actor)."""
    from models.towers import TextTower
    m = Path(os.environ["SEMALIGN_TEXT_MODEL"])
    texts = refresh_texts()
    n = len(texts)
    for bs in (1024, 2048):
        for workers in (0, None):
            for graphs in (False, True):
                tower = TextTower(m, device=dev, batch_size=bs, tokenize_workers=workers, cuda_graphs=graphs)
                tower.encode(texts[: 4 * bs])
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                tower.encode(texts)  # the first pass captures each width's graph
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                t = tm(lambda: tower.encode(texts), rep=1)
                out(part="refreshgraph", batch=bs, workers=tower.tokenize_workers, cuda_graphs=graphs,
                    first_pass_per_s=n / first, encode_per_s=n / t)
                tower.close()


def switchinterval_part():
    """The GIL's switch interval during encode (the main process's forward and the pool's result threads share
    one GIL; the default interval is 5 ms)."""
    from models.towers import TextTower
    m, texts = Path(os.environ["SEMALIGN_TEXT_MODEL"]), synthetic_titles(400_000)
    default = sys.getswitchinterval()
    for workers in (8, 14):
        tower = TextTower(m, device=dev, batch_size=2048, max_length=32, tokenize_workers=workers)
        tower.encode(texts)
        for interval in (default, 0.001, 0.0002):
            sys.setswitchinterval(interval)
            try:
                out(part="switchinterval", workers=workers, interval_s=interval,
                    encode_per_s=len(texts) / tm(lambda: tower.encode(texts), rep=2))
            finally:
                sys.setswitchinterval(default)
        tower.close()


@torch.no_grad()
def randomized(tower):
    """Seeded random weights: the device's model folder holds zeros (the weights cannot travel), whose vectors are
    all zero, so agreement between two towers would be vacuous."""
    torch.manual_seed(0)
    for name, p in tower.model.named_parameters():
        p.normal_(0.0, 0.05) if p.dim() > 1 else p.normal_(0.0 if name.endswith("bias") else 1.0, 0.02)
    return tower


def textgraph_part():
    """The tower with its forward as CUDA graph replays (one per padded width) against the eager tower: speed per
    batch size, tokenizer processes and width multiple, and the vectors' agreement."""
    from models.towers import TextTower
    m, texts = Path(os.environ["SEMALIGN_TEXT_MODEL"]), synthetic_titles(400_000)
    n = len(texts)
    eager = randomized(TextTower(m, device=dev, batch_size=2048, max_length=32, cuda_graphs=False))
    want = eager.encode(texts)
    out(part="textgraph", what="eager", batch=2048, workers=eager.tokenize_workers,
        per_s=n / tm(lambda: eager.encode(texts), rep=2))
    eager.close()
    default = TextTower.graph_pad
    for bs, pad, workers in ((2048, 16, None), (2048, 8, None), (4096, 16, None), (2048, 16, 14), (8192, 16, None)):
        TextTower.graph_pad = pad
        tower = randomized(TextTower(m, device=dev, batch_size=bs, max_length=32, tokenize_workers=workers))
        got = tower.encode(texts)
        t = tm(lambda: tower.encode(texts), rep=3)
        row = dict(part="textgraph", what="graphed", batch=bs, pad=pad, workers=tower.tokenize_workers,
                   graphs=len(tower._graphs), graphed=tower.cuda_graphs, per_s=n / t)
        if bs == 2048:
            row["min_cos_vs_eager"] = float((got * want).sum(1).min())
            row["same_bits_again"] = bool(np.array_equal(tower.encode(texts), got))
            toks = device_batches(tower, texts, bs)

            @torch.inference_mode()
            def replay_only():
                for b in toks:
                    if b["input_ids"].shape[0] == bs and b["input_ids"].shape[1] in tower._graphs:
                        tower._graphs[b["input_ids"].shape[1]][0].replay()
            row["replay_only_per_s"] = n / tm(replay_only, rep=3)
        out(**row)
        tower.close()
    TextTower.graph_pad = default


def textpipe_part():
    """The graphed tower end to end by width multiple and tokenizer processes, and the tokens alone."""
    from models.towers import TextTower, length_batches
    m, texts = Path(os.environ["SEMALIGN_TEXT_MODEL"]), synthetic_titles(400_000)
    n, bs = len(texts), 2048
    batches = length_batches(texts, bs)
    default = TextTower.graph_pad
    for pad, workers in ((8, 8), (8, 14), (4, 8), (4, 14), (8, 0)):
        TextTower.graph_pad = pad
        tower = randomized(TextTower(m, device=dev, batch_size=bs, max_length=32, tokenize_workers=workers))
        tower.encode(texts)
        t0 = time.perf_counter()
        for _ in tower._token_batches(texts, batches, 1024, pin=True):
            pass
        tok = n / (time.perf_counter() - t0)
        out(part="textpipe", pad=pad, workers=workers, graphs=len(tower._graphs), tokens_only_per_s=tok,
            encode_per_s=n / tm(lambda: tower.encode(texts), rep=3))
        tower.close()
    TextTower.graph_pad = default


def hostprof_part():
    """cProfile of the graphed tower's encode (the main thread: where it waits, where it works)."""
    import cProfile
    import io
    import pstats

    from models.towers import TextTower
    m, texts = Path(os.environ["SEMALIGN_TEXT_MODEL"]), synthetic_titles(400_000)
    tower = randomized(TextTower(m, device=dev, batch_size=2048, max_length=32, tokenize_workers=14))
    tower.encode(texts)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    t = time.perf_counter()
    prof.enable()
    tower.encode(texts)
    prof.disable()
    out(part="hostprof", encode_per_s=len(texts) / (time.perf_counter() - t))
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    print(buf.getvalue()[-3500:], flush=True)
    tower.close()


def ranker_rows(rows: int):
    """The ranker benches' shapes: 100k items (20% cold), 3x256 SIDs, zipf candidates and histories of 50; `rows`
    training rows on the GPU as (user features, candidate, history, label)."""
    from models.ranker import ItemTables
    rng = np.random.default_rng(0)
    n, k, hl = 100_000, 256, 50
    vocab = np.r_[0, np.arange(1, n + 1)]
    vocab[int(0.8 * n):] = 0
    tables = ItemTables(id_vocab=vocab, content=rng.standard_normal((n + 1, 128)).astype(np.float32),
                        raw=rng.standard_normal((n + 1, 448)).astype(np.float32), codes=rng.integers(0, k, (n + 1, 3)),
                        n_codes=k)
    pop = rng.zipf(1.3, (rows, hl + 1)) % n + 1
    return tables, (torch.randn(rows, 2, device=dev), torch.as_tensor(pop[:, 0], device=dev),
                    torch.as_tensor(pop[:, 1:], device=dev), torch.randint(0, 2, (rows,), device=dev).float())


def ddpprof_part():
    """Where DDP's cost in the graphed training step goes: TrainStep (batch 4096) with and without DDP over a one-rank
    NCCL group (no bytes cross a link); ms a step from CUDA events over 200 replays, then CUDA time by kernel."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.profiler import ProfilerActivity, profile

    from models.ranker import Ranker, RankerConfig
    from models.ranker_training import TrainStep, wrap_for_graph
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29650", TORCH_NCCL_ASYNC_ERROR_HANDLING="0",
                      NCCL_ASYNC_ERROR_HANDLING="0")
    dist.init_process_group("nccl", rank=0, world_size=1)
    tables, data = ranker_rows(4096 * 50)
    cfg = RankerConfig(variant="full", batch_size=4096)
    batches = torch.randint(0, len(data[3]), (250, 4096), device=dev)
    for wrap in (False, True):
        torch.manual_seed(0)
        model = Ranker(cfg, tables, 2).to(dev)
        # as train_ranker builds it for a graphed DDP step (DDP's defaults: what it adds at one rank)
        step_model = wrap_for_graph(lambda m: DistributedDataParallel(m, device_ids=[0]), model) if wrap else None
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True, capturable=True)
        step = TrainStep(model, opt, cfg, data, dev, step_model=step_model, cuda_graph=True)
        for i in range(20):  # warm-up and capture
            step(batches[i])
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(20, 220):
            step(batches[i])
        end.record()
        torch.cuda.synchronize()
        out(part="ddpprof", ddp=wrap, graphed=step.graph is not None, ms_per_step=start.elapsed_time(end) / 200)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(220, 250):
                step(batches[i])
            torch.cuda.synchronize()
        print(f"ddp={wrap}, 30 graphed steps", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)
    dist.destroy_process_group()


def rankerprof_part():
    """CUDA time by kernel of the full ranker's training step (eager, batch 4096, history 50, 100k items)."""
    from models.ranker import Ranker, RankerConfig
    tables, (u, c, h, y) = ranker_rows(4096)
    model = Ranker(RankerConfig(variant="full"), tables, 2).to(dev).train()
    model.view_rows = "static"
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(u, c, h).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=70), flush=True)


def rankergraph_part():
    """train_ranker on CUDA with the graphed step against the eager one: same data, AUC and loss per epoch."""
    from models.ranker import Frame, ItemTables, RankerConfig
    from models.ranker_training import train_ranker
    rng = np.random.default_rng(0)
    n, k = 20_000, 256
    content = rng.standard_normal((n + 1, 64)).astype(np.float32)
    vocab = np.r_[0, np.arange(1, n + 1)]
    vocab[int(0.8 * n):] = 0
    tables = ItemTables(id_vocab=vocab, content=content, raw=content, codes=rng.integers(0, k, (n + 1, 3)), n_codes=k)

    def frame(m, seed):
        r = np.random.default_rng(seed)
        cand = r.zipf(1.3, m) % n + 1
        hist = r.zipf(1.3, (m, 50)) % n + 1
        y = (content[cand, 0] + 0.5 * r.standard_normal(m) > 0).astype(np.float32)
        return Frame(user_feats=r.standard_normal((m, 2)).astype(np.float32), cand=cand, hist=hist, label=y)
    train, val = frame(400_000, 1), frame(50_000, 2)
    for cold, graph, compiled in (("oov", False, False), ("oov", True, False), ("generated", False, False),
                                  ("generated", True, False), ("generated", True, True)):
        cfg = RankerConfig(variant="full", batch_size=4096, max_epochs=3, patience=5, cold_behavior=cold,
                           cold_view=0.5)
        t = time.perf_counter()
        res = train_ranker(cfg, tables, train, val, dev, cuda_graph=graph, compile_model=compiled)
        out(part="rankergraph", cold_behavior=cold, step_mode=res.step_mode, samples_per_s=res.samples_per_s,
            wall_s=time.perf_counter() - t, val_auc=[round(r["val_auc"], 4) for r in res.history],
            loss=[round(r["loss"], 4) for r in res.history])


def kernelcheck_part():
    from models.kmeans import assign_levels as al
    for d, k in [(8, 1), (100, 300), (128, 256), (256, 1000), (300, 64)]:
        g = torch.Generator().manual_seed(d + k)
        x = torch.randn(20_011, d, generator=g).cuda()
        cents = [torch.randn(k, d, generator=g).cuda() * s for s in (1.0, 0.5, 0.25)]
        cents[0][-1] = cents[0][0]
        try:
            fused = al(x, cents, kernel="triton")
        except Exception as e:  # noqa: BLE001
            out(part="kernelcheck", d=d, k=k, error=repr(e)[:200])
            fused = al(x, cents)
        gemm = al(x, cents, kernel="torch")
        out(part="kernelcheck", d=d, k=k, differing=float((fused != gemm).any(1).float().mean()),
            top_code_used=int((fused[:, 0] == k - 1).sum()))


if __name__ == "__main__":
    out(torch=torch.__version__, gpu=torch.cuda.get_device_name(0), cpus=os.cpu_count())
    for part in sys.argv[1:] or ["sid", "text"]:
        try:
            {"sid": sid_part, "text": text_part, "kernelcheck": kernelcheck_part, "textprof": textprof_part, "refreshtext": refreshtext_part, "refreshgraph": refreshgraph_part, "switchinterval": switchinterval_part,
             "textgraph": textgraph_part, "textpipe": textpipe_part, "hostprof": hostprof_part, "rankerprof": rankerprof_part, "ddpprof": ddpprof_part, "rankergraph": rankergraph_part}[part]()
        except Exception:  # noqa: BLE001 - one part failing should not hide the others' figures
            import traceback
            traceback.print_exc()
