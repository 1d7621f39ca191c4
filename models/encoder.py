"""Behavior-aware multimodal item encoder: a trainable fusion/projection over frozen tower features,
trained with symmetric InfoNCE (in-batch negatives, learnable temperature) on behavior pairs.

A content-preservation term (the batch's cosine-similarity matrix kept close to the frozen text
tower's) stops the encoder from forgetting content while it learns behavior, so unseen items keep a
meaningful position. Imports only torch and numpy.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kmeans import GPU_SCORES_BUDGET


@dataclass
class EncoderConfig:
    text_dim: int = 384
    image_dim: int = 0          # 0 = text only
    image_pca: int = 128        # frozen PCA of the image features before the trainable layer (cost, not quality)
    hidden: int = 256
    out_dim: int = 128
    dropout: float = 0.1
    epochs: int = 12
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    content_weight: float = 1.0  # weight of the content-preservation term
    anchor_weight: float = 1.0   # when fine-tuning from a parent: pull items toward the parent's embedding
    init_temperature: float = 0.07
    seed: int = 0
    eval_k: int = 30
    hard_negative_share: float = 0.0  # share of each batch drawn from one first-level cluster of the current
                                      # embedding (in-batch negatives from the same code): 0 = random batches
    hard_negative_codes: int = 0      # clusters for that grouping (0 = the catalogue-sized first SID level)

    def __post_init__(self):
        if not 0.0 <= self.hard_negative_share <= 1.0:
            raise ValueError("hard_negative_share is a share of the batch: expected 0..1")


class FusionEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.text_in = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, cfg.hidden))
        self.image_in = None
        if cfg.image_dim:
            k = min(cfg.image_pca, cfg.image_dim)
            self.register_buffer("image_mean", torch.zeros(cfg.image_dim))
            self.register_buffer("image_basis", torch.eye(cfg.image_dim)[:, :k].contiguous())
            self.image_in = nn.Sequential(nn.LayerNorm(k), nn.Linear(k, cfg.hidden))
        self.mlp = nn.Sequential(nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.hidden, cfg.out_dim))
        self.skip = nn.Linear(cfg.text_dim, cfg.out_dim, bias=False)  # linear content path, kept beside the MLP
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def reduce_image(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.image_mean) @ self.image_basis

    def forward(self, text: torch.Tensor, image: torch.Tensor | None = None,
                has_image: torch.Tensor | None = None, image_reduced: bool = False) -> torch.Tensor:
        h = self.text_in(text)
        if self.image_in is not None and image is not None:
            img = image if image_reduced else self.reduce_image(image)
            h = h + self.image_in(img) * has_image.unsqueeze(-1).to(h.dtype)
        z = self.mlp(h) + self.skip(text)
        return F.normalize(z.float(), dim=-1)


@torch.no_grad()
def fit_image_pca(model: FusionEncoder, feats: np.ndarray) -> None:
    x = torch.as_tensor(feats, dtype=torch.float32)
    mean = x.mean(0)
    k = model.image_basis.shape[1]
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    basis = v[:k].T
    if basis.shape[1] < k:  # fewer images than components
        basis = torch.cat([basis, torch.zeros(basis.shape[0], k - basis.shape[1])], 1)
    model.image_mean.copy_(mean.to(model.image_mean.device))
    model.image_basis.copy_(basis.to(model.image_basis.device))


def info_nce(za: torch.Tensor, zb: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    scale = log_scale.clamp(max=math.log(100.0)).exp()
    logits = scale * za @ zb.T
    target = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def content_preservation(z: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    c = F.normalize(content.float(), dim=-1)
    return F.mse_loss(z @ z.T, c @ c.T)


# pairs a Hit@k evaluation scores at most: above it, a fixed-seed sample (standard error under 0.3 points), so
# the cost grows with the catalogue, not with catalogue x pairs (quadratic: the pairs grow with the catalogue). Both
# development catalogues stay under it (Beauty: 13k validation / 22k test pairs), so their figures are exact.
MAX_EVAL_PAIRS = 50_000


@torch.no_grad()
def hit_at_k(emb: np.ndarray | torch.Tensor, pairs: np.ndarray, k: int = 30, chunk: int = 2048,
             max_pairs: int | None = MAX_EVAL_PAIRS, device: str = "cpu") -> float:
    """Item-to-item Hit@k on pairs (both directions): is b among the k nearest items (cosine) of a,
    a itself excluded, over the whole catalogue (on a fixed-seed sample of `max_pairs` pairs where there are more).
    On a GPU the scores are computed there (1M items: seconds instead of minutes); float rounding can then move
    exact ties."""
    if len(pairs) == 0:
        return float("nan")
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs[np.sort(np.random.default_rng(0).choice(len(pairs), max_pairs, replace=False))]
    e = F.normalize(torch.as_tensor(emb if isinstance(emb, torch.Tensor) else np.asarray(emb),
                                    dtype=torch.float32).to(device), dim=-1)
    # the [chunk, items] scores stay under 64 MB on the CPU, 1 GB on a GPU
    budget = GPU_SCORES_BUDGET if e.device.type == "cuda" else (1 << 24)
    chunk = max(1, min(chunk, budget // max(1, len(e))))
    q = torch.as_tensor(np.concatenate([pairs[:, 0], pairs[:, 1]]), device=e.device)
    t = torch.as_tensor(np.concatenate([pairs[:, 1], pairs[:, 0]]), device=e.device)
    hits = torch.zeros((), dtype=torch.long, device=e.device)  # summed where the scores are: one sync at the end
    for s in range(0, len(q), chunk):
        qi, ti = q[s: s + chunk], t[s: s + chunk]
        rows = torch.arange(len(qi), device=e.device)
        sim = e[qi] @ e.T
        sim[rows, qi] = -float("inf")
        target = sim[rows, ti].unsqueeze(1)
        rank = (sim > target).sum(1)
        hits += (rank < k).sum()
    return int(hits) / len(q)


@dataclass
class EncoderResult:
    model: FusionEncoder
    history: list[dict]
    best_epoch: int
    best_val_hit: float


def _features(text, image, has_image, device):
    t = torch.as_tensor(text, dtype=torch.float32, device=device)
    i = torch.as_tensor(image, dtype=torch.float32, device=device) if image is not None else None
    m = torch.as_tensor(has_image, dtype=torch.bool, device=device) if has_image is not None else None
    return t, i, m


@torch.no_grad()
def embed_items(model: FusionEncoder, text: np.ndarray, image: np.ndarray | None = None,
                has_image: np.ndarray | None = None, device: str = "cpu", batch: int = 8192) -> np.ndarray:
    model.eval()
    t, i, m = _features(text, image, has_image, device)
    out = []
    for s in range(0, len(t), batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            out.append(model(t[s:s + batch], None if i is None else i[s:s + batch],
                             None if m is None else m[s:s + batch]).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.out_dim), np.float32)


def hard_negative_order(pairs: np.ndarray, emb: np.ndarray, cfg: EncoderConfig, gen: torch.Generator,
                        epoch: int) -> torch.Tensor:
    """An epoch's pair order whose every batch holds `hard_negative_share` pairs whose first items share one
    first-level cluster of the current embedding (k-means, as the codebook's first level would cut it), the rest
    drawn at random: in-batch negatives then include items the codebook would give the same first code."""
    from .codebook import default_codes
    from .kmeans import assign_levels, kmeans

    n, bs = len(pairs), cfg.batch_size
    k = cfg.hard_negative_codes or default_codes(len(emb))
    x = torch.as_tensor(emb, dtype=torch.float32)
    centroids = kmeans(x, min(k, len(x)), iters=10, seed=cfg.seed * 1000 + epoch)
    cluster = assign_levels(x, [centroids])[:, 0]  # chunked: no [items, codes] distance matrix
    perm = torch.randperm(n, generator=gen)
    n_hard = int(round(cfg.hard_negative_share * n))
    hard, easy = perm[:n_hard], perm[n_hard:]
    # hard pairs grouped by their first item's cluster, clusters in a random order (a stable sort keeps the
    # random order within a cluster)
    rank = torch.randperm(len(centroids), generator=gen)
    hard = hard[torch.sort(rank[cluster[torch.as_tensor(pairs[hard.numpy(), 0])]], stable=True).indices]
    per_batch = max(1, int(round(cfg.hard_negative_share * bs)))
    out, h, e = [], 0, 0
    while h < len(hard) or e < len(easy):
        take_h = min(per_batch, len(hard) - h)
        take_e = min(bs - take_h, len(easy) - e)
        if take_h + take_e < bs and h + take_h < len(hard):  # easy pairs ran out: fill with hard ones
            take_h = min(bs - take_e, len(hard) - h)
        out += [hard[h: h + take_h], easy[e: e + take_e]]
        h, e = h + take_h, e + take_e
    return torch.cat(out)


def train_encoder(text: np.ndarray, image: np.ndarray | None, has_image: np.ndarray | None, pairs: np.ndarray,
                  val_pairs: np.ndarray, cfg: EncoderConfig, device: str = "cpu",
                  on_epoch: Callable[[dict], None] | None = None, init: FusionEncoder | None = None) -> EncoderResult:
    """Trains on `pairs` (item indices); keeps the epoch with the best Hit@k on `val_pairs`. With `init`, starts
    from that model's weights and keeps its image PCA (a fine-tune that keeps the embedding space in place)."""
    if len(pairs) == 0:
        raise ValueError("no behavior pairs to train the encoder on (training window has no co-engaged items)")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = FusionEncoder(cfg).to(device)
    anchor = None
    if init is not None:
        model.load_state_dict(init.state_dict())
        if cfg.anchor_weight > 0:  # where each item sat under the parent: moving it costs (stable SIDs)
            anchor = torch.as_tensor(embed_items(init, text, image if cfg.image_dim else None,
                                                 has_image if cfg.image_dim else None, device), device=device)
    elif cfg.image_dim and has_image is not None and has_image.sum() > 1:
        fit_image_pca(model, image[has_image])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    t, i, m = _features(text, image if cfg.image_dim else None, has_image if cfg.image_dim else None, device)
    if i is not None:
        i = model.reduce_image(i)  # the PCA is frozen: project once, not every step
    pairs_t = torch.as_tensor(pairs, dtype=torch.long)
    steps = max(1, math.ceil(len(pairs) / cfg.batch_size))
    total_steps = cfg.epochs * steps
    # one-cycle needs room for its warm-up; tiny datasets just keep the base rate
    sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.1)
             if total_steps >= 20 else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))
    best = (-1.0, -1, None)
    history = []
    emb = None
    for epoch in range(cfg.epochs):
        if cfg.hard_negative_share > 0:
            if emb is None:
                emb = embed_items(model, text, image if cfg.image_dim else None, has_image if cfg.image_dim else None,
                                  device)
            perm = hard_negative_order(pairs, emb, cfg, gen, epoch)
        else:
            perm = torch.randperm(len(pairs_t), generator=gen)
        model.train()
        total = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            pb = pairs_t[perm[s: s + cfg.batch_size]].to(device)
            a, b = pb[:, 0], pb[:, 1]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                za = model(t[a], None if i is None else i[a], None if m is None else m[a], image_reduced=True)
                zb = model(t[b], None if i is None else i[b], None if m is None else m[b], image_reduced=True)
            loss = info_nce(za, zb, model.log_scale)
            if cfg.content_weight > 0:
                loss = loss + cfg.content_weight * 0.5 * (content_preservation(za, t[a]) + content_preservation(zb, t[b]))
            if anchor is not None:
                loss = loss + cfg.anchor_weight * 0.5 * (((za - anchor[a]) ** 2).sum(1).mean()
                                                         + ((zb - anchor[b]) ** 2).sum(1).mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(pb)
        emb = embed_items(model, text, image if cfg.image_dim else None, has_image if cfg.image_dim else None, device)
        val = hit_at_k(emb, val_pairs, cfg.eval_k, device=device) if len(val_pairs) else float("nan")
        rec = {"epoch": epoch + 1, "loss": total / len(pairs), "val_hit": val,
               "temperature": float(1.0 / model.log_scale.detach().exp())}
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
        score = val if not math.isnan(val) else -rec["loss"]
        if score > best[0] or best[2] is None:
            best = (score, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    model.eval()
    return EncoderResult(model=model, history=history, best_epoch=best[1], best_val_hit=best[0])


def save_encoder(model: FusionEncoder, folder, meta: dict) -> None:
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".encoder.safetensors.tmp"
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / "encoder.safetensors")
    (folder / ".encoder.json.tmp").write_text(json.dumps({"config": asdict(model.cfg), **meta}, indent=2))
    os.replace(folder / ".encoder.json.tmp", folder / "encoder.json")


def load_encoder(folder, device: str = "cpu") -> tuple[FusionEncoder, dict]:
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "encoder.json").read_text())
        model = FusionEncoder(EncoderConfig(**meta["config"]))
        model.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, tampered or foreign files: say which folder, never guess
        raise ValueError(f"{folder}: not a loadable encoder ({type(e).__name__}: {str(e)[:200]}); refusing to load") from e
    return model.to(device).eval(), meta
