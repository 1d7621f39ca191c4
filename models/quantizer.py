"""Semantic IDs by residual quantization: RQ-KMeans (default) and RQ-VAE, a dedup level for collisions,
stable rebuilds against a parent codebook, and the versioned `Codebook` artifact (safetensors + JSON).

Imports only torch and numpy (plus stdlib; safetensors ships with transformers).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT_VERSION = 1


def default_codes(n_items: int) -> int:
    """Codes per level sized to the catalogue: a power of two near sqrt(n), between 8 and 256."""
    k = 2 ** round(math.log2(max(1.0, math.sqrt(max(1, n_items)))))
    return int(min(256, max(8, k)))


# ---------------------------------------------------------------- k-means

def _nearest_cpu(xa: np.ndarray, c: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """argmin_j ||x - c_j||^2 as argmax_j [x, 1] . [c_j, -||c_j||^2 / 2]: one GEMM per chunk, no extra pass.
    numpy's BLAS is used on CPU because it beats torch's GEMM on some CPUs (measured in bench/)."""
    ca = np.concatenate([c, -0.5 * (c * c).sum(1, keepdims=True)], 1).T.astype(np.float32, copy=False)
    ca = np.ascontiguousarray(ca)
    codes = np.empty(len(xa), dtype=np.int64)
    buf = np.empty((min(chunk, len(xa)), ca.shape[1]), dtype=np.float32)
    for s in range(0, len(xa), chunk):
        xs = xa[s: s + chunk]
        d = np.matmul(xs, ca, out=buf[: len(xs)])
        codes[s: s + chunk] = d.argmax(1)
    return codes


def _augment(x: torch.Tensor) -> np.ndarray:
    xa = np.empty((len(x), x.shape[1] + 1), dtype=np.float32)
    xa[:, :-1] = x.detach().float().numpy()
    xa[:, -1] = 1.0
    return xa


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536, xa: np.ndarray | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest centroid (squared L2) per row; matmul-bound, chunked to bound memory. The second value
    (squared distances) is only computed on GPU; CPU callers that need it use `_sq_dist`."""
    if x.device.type == "cpu":
        xa = _augment(x) if xa is None else xa
        return torch.from_numpy(_nearest_cpu(xa, c.detach().float().numpy())), None
    c_sq = (c * c).sum(1)
    codes = torch.empty(len(x), dtype=torch.long, device=x.device)
    dist = torch.empty(len(x), dtype=x.dtype, device=x.device)
    for s in range(0, len(x), chunk):
        xs = x[s: s + chunk]
        d = torch.addmm(c_sq.unsqueeze(0), xs, c.T, alpha=-2.0)  # ||c||^2 - 2 x.c
        m, idx = d.min(1)
        codes[s: s + chunk] = idx
        dist[s: s + chunk] = m + (xs * xs).sum(1)
    return codes, dist


def _sq_dist(x: torch.Tensor, c: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return ((x - c[codes]) ** 2).sum(1)


class _single_thread:
    def __init__(self, on: bool):
        self.on, self.prev = on, torch.get_num_threads()

    def __enter__(self):
        if self.on:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.prev)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding; the sampling runs where x lives (no host round trip per centroid on GPU)."""
    n = len(x)
    dev_gen = gen if x.device.type == "cpu" else torch.Generator(device=x.device).manual_seed(int(gen.initial_seed()))
    first = int(torch.randint(n, (1,), generator=gen))
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    idx[0] = first
    d2 = ((x - x[first]) ** 2).sum(1)
    for j in range(1, k):
        p = d2.clamp_min(0) + 1e-12  # never all-zero: duplicate points stay drawable
        nxt = torch.multinomial(p, 1, generator=dev_gen)
        idx[j] = nxt[0]
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[idx].clone()


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, init: torch.Tensor | None = None,
           init_sample: int = 16) -> torch.Tensor:
    """Lloyd's k-means on all points. Init: given centroids (warm start from a parent) or k-means++ on a
    sample of `init_sample * k` points. Empty clusters are re-seeded with the worst-fit points."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    if n < k:
        raise ValueError(f"k-means: {n} points cannot fill {k} codes; use fewer codes per level")
    if init is not None:
        c = init.to(x.device, x.dtype).clone()
    else:
        sample = x if n <= init_sample * k else x[torch.randperm(n, generator=gen)[: init_sample * k].to(x.device)]
        c = _kmeanspp(sample, k, gen)
    xa = _augment(x) if x.device.type == "cpu" else None  # built once per call, reused every iteration
    for _ in range(iters):
        codes, dist = _assign(x, c, xa=xa)
        with _single_thread(x.device.type == "cpu"):  # BLAS threads still spin after the GEMM: don't fight them
            counts = torch.bincount(codes, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, codes, x)
        empty = counts == 0
        c = torch.where(empty.unsqueeze(1), c, sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype))
        if bool(empty.any()):
            dist = _sq_dist(x, c, codes) if dist is None else dist
            worst = torch.topk(dist, int(empty.sum())).indices
            c[empty] = x[worst]
    return c


# ---------------------------------------------------------------- matching a rebuild to its parent

# solves the linear assignment problem like scipy.optimize.linear_sum_assignment: cost [n, n] -> (rows, cols).
# `models/` imports only torch and numpy, so the caller hands the solver in (flows/ passes scipy's).
AssignmentSolver = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def match_to_parent(new: torch.Tensor, parent: torch.Tensor, solve: AssignmentSolver) -> torch.Tensor:
    """Permute `new` centroids so that slot j is the new centroid closest (jointly, minimum total distance) to
    parent slot j."""
    cost = torch.cdist(parent.double(), new.double()).cpu().numpy()
    rows, cols = solve(cost)  # parent slot rows[i] -> new centroid cols[i]
    col_of_row = np.empty(len(cost), dtype=np.int64)
    col_of_row[np.asarray(rows)] = np.asarray(cols)
    return new[torch.as_tensor(col_of_row, device=new.device)]


def procrustes(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Orthogonal R minimising ||new @ R - old|| over paired rows. A retrained encoder may land in a rotated
    copy of the old space; rotating it back (cosines unchanged) lets the parent's centroids still fit."""
    u, _, vt = np.linalg.svd(np.asarray(new, np.float64).T @ np.asarray(old, np.float64))
    return (u @ vt).astype(np.float32)


# ---------------------------------------------------------------- dedup, metrics, churn

def dedup_level(codes: np.ndarray, tie_order: np.ndarray | None = None,
                taken: dict[tuple, int] | None = None) -> np.ndarray:
    """Extra level that makes every full SID unique: within a group of identical codes, items get 0, 1, ...
    in `tie_order` (e.g. rank of the item id). `taken` maps already-published code tuples to the next free
    dedup index, so onboarded items never reuse one."""
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    _, inv = np.unique(_row_keys(codes), return_inverse=True)
    order = np.lexsort((np.arange(n) if tie_order is None else np.asarray(tie_order), inv))
    g = inv[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1]
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    out = np.empty(n, dtype=np.int64)
    out[order] = rank
    if taken:
        offset = np.array([taken.get(tuple(int(c) for c in row), 0) for row in codes], dtype=np.int64)
        out = out + offset
    return out


def sid_churn(old: np.ndarray, new: np.ndarray) -> dict:
    """Share of items whose SID changed (overall and per level); rows must be the same items."""
    if old.shape != new.shape:
        raise ValueError(f"churn needs the same items and levels: {old.shape} vs {new.shape}")
    if len(old) == 0:
        return {"churn": 0.0, "per_level": []}
    diff = old != new
    return {"churn": float(diff.any(1).mean()), "per_level": [float(d) for d in diff.mean(0)]}


def _row_keys(codes: np.ndarray) -> np.ndarray:
    """One int64 per SID row (rows of small codes pack exactly; otherwise fall back to row-unique ids)."""
    codes = np.asarray(codes, dtype=np.int64)
    base = int(codes.max()) + 1 if codes.size else 1
    if base ** codes.shape[1] < 2 ** 62:
        return (codes * (base ** np.arange(codes.shape[1] - 1, -1, -1, dtype=np.int64))).sum(1)
    return np.unique(codes, axis=0, return_inverse=True)[1].reshape(-1)


def code_metrics(codes: np.ndarray, k: int, relative_recon_error: float) -> dict:
    _, counts = np.unique(_row_keys(codes), return_counts=True)
    shared = counts[counts > 1].sum()
    util = [float(len(np.unique(codes[:, lvl])) / k) for lvl in range(codes.shape[1])]
    ent = []
    for lvl in range(codes.shape[1]):
        p = np.bincount(codes[:, lvl], minlength=k) / len(codes)
        p = p[p > 0]
        ent.append(float(np.exp(-(p * np.log(p)).sum())))
    return {"utilisation": util, "perplexity": ent, "collision_rate": float(shared / len(codes)),
            "max_collision_group": int(counts.max()), "unique_sids": int(len(counts)),
            "relative_recon_error": relative_recon_error}


# ---------------------------------------------------------------- RQ-VAE

@dataclass
class RQVAEConfig:
    dim: int = 128
    latent: int = 64
    hidden: int = 256
    levels: int = 3
    codes: int = 32
    beta: float = 0.25
    contrastive_weight: float = 0.5
    temperature: float = 0.1
    epochs: int = 60
    batch_size: int = 512
    lr: float = 1e-3
    seed: int = 0


class RQVAE(nn.Module):
    def __init__(self, cfg: RQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.enc = nn.Sequential(nn.Linear(cfg.dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.latent))
        self.dec = nn.Sequential(nn.Linear(cfg.latent, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.dim))
        self.codebooks = nn.Parameter(torch.zeros(cfg.levels, cfg.codes, cfg.latent))

    def quantize(self, z: torch.Tensor):
        r, zq = z, torch.zeros_like(z)
        codes, commit = [], z.new_zeros(())
        for lvl in range(self.cfg.levels):
            c = self.codebooks[lvl]
            idx = torch.cdist(r.detach(), c.detach()).argmin(1)
            q = c[idx]
            commit = commit + F.mse_loss(r, q.detach()) * self.cfg.beta + F.mse_loss(q, r.detach())
            zq = zq + q
            r = r - q.detach()
            codes.append(idx)
        zq_st = z + (zq - z).detach()  # straight-through
        return zq_st, torch.stack(codes, 1), commit

    def forward(self, x):
        z = self.enc(x)
        zq, codes, commit = self.quantize(z)
        return self.dec(zq), codes, commit, z


def train_rqvae(x: torch.Tensor, pairs: np.ndarray, cfg: RQVAEConfig, init: RQVAE | None = None,
                on_epoch: Callable[[dict], None] | None = None) -> RQVAE:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = RQVAE(cfg)
    if init is not None and init.cfg == cfg:
        model.load_state_dict(init.state_dict())
    else:
        with torch.no_grad():  # k-means init of every level on the encoder's residuals
            r = model.enc(x)
            for lvl in range(cfg.levels):
                c = kmeans(r, cfg.codes, iters=10, seed=cfg.seed + lvl)
                model.codebooks[lvl].copy_(c)
                r = r - c[_assign(r, c)[0]]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pairs_t = torch.as_tensor(pairs, dtype=torch.long)
    n = len(x)
    for epoch in range(cfg.epochs):
        model.train()
        usage = torch.zeros(cfg.levels, cfg.codes)
        perm = torch.randperm(n, generator=gen)
        pperm = torch.randperm(len(pairs_t), generator=gen) if len(pairs_t) else None
        steps = math.ceil(n / cfg.batch_size)
        tot = {"recon": 0.0, "commit": 0.0, "contrastive": 0.0}
        for s in range(steps):
            xb = x[perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]]
            xr, codes, commit, _ = model(xb)
            recon = F.mse_loss(xr, xb)
            loss = recon + commit
            for lvl in range(cfg.levels):
                usage[lvl] += torch.bincount(codes[:, lvl], minlength=cfg.codes).float()
            if pperm is not None and cfg.contrastive_weight > 0:
                pb = pairs_t[pperm[(s * cfg.batch_size) % len(pperm):][: cfg.batch_size]]
                da = F.normalize(model(x[pb[:, 0]])[0], dim=-1)
                db = F.normalize(model(x[pb[:, 1]])[0], dim=-1)
                logits = da @ db.T / cfg.temperature
                tgt = torch.arange(len(pb))
                con = 0.5 * (F.cross_entropy(logits, tgt) + F.cross_entropy(logits.T, tgt))
                loss = loss + cfg.contrastive_weight * con
                tot["contrastive"] += con.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot["recon"] += recon.item()
            tot["commit"] += commit.item()
        with torch.no_grad():  # dead-code reset: unused codes restart at random residuals
            dead = usage == 0
            if bool(dead.any()):
                r = model.enc(x[torch.randperm(n, generator=gen)[: cfg.codes * 4]])
                for lvl in range(cfg.levels):
                    nd = int(dead[lvl].sum())
                    if nd:
                        model.codebooks.data[lvl][dead[lvl]] = r[torch.randint(len(r), (nd,), generator=gen)]
                    r = r - model.codebooks[lvl][_assign(r, model.codebooks[lvl])[0]]
        if on_epoch:
            on_epoch({"epoch": epoch + 1, **{k: v / steps for k, v in tot.items()}, "dead_codes": int(dead.sum())})
    return model.eval()


# ---------------------------------------------------------------- the artifact

def embeddings_hash(emb: np.ndarray, keys: list[str] | None = None) -> str:
    h = hashlib.sha256(np.ascontiguousarray(emb, dtype=np.float32).tobytes())
    if keys is not None:
        h.update("\0".join(keys).encode())
    return h.hexdigest()[:16]


@dataclass
class Codebook:
    method: str                      # "rqkmeans" | "rqvae"
    centroids: list[torch.Tensor]    # per level [K, d] (RQ-VAE: in its latent space)
    config: dict
    version: str
    parent: str | None
    data_hash: str
    metrics: dict = field(default_factory=dict)
    vae: RQVAE | None = None
    created_at: float = field(default_factory=time.time)

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def codes(self) -> int:
        return int(self.centroids[0].shape[0])

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    def _check(self, emb) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(emb, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"codebook {self.version} expects embeddings of width {self.dim}, got shape "
                             f"{tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("embeddings contain NaN or infinite values")
        return x

    @torch.no_grad()
    def assign(self, emb) -> np.ndarray:
        """Deterministic SIDs [n, levels] (no dedup level; see `dedup_level`)."""
        x = self._check(emb)
        r = self.vae.enc(x) if self.vae is not None else x
        out = []
        for c in self.centroids:
            idx, _ = _assign(r, c)
            out.append(idx)
            r = r - c[idx]
        return torch.stack(out, 1).numpy().astype(np.int64) if out else np.zeros((len(x), 0), np.int64)

    @torch.no_grad()
    def reconstruct(self, codes: np.ndarray) -> torch.Tensor:
        codes_t = torch.as_tensor(codes, dtype=torch.long)
        z = sum(c[codes_t[:, lvl]] for lvl, c in enumerate(self.centroids))
        return self.vae.dec(z) if self.vae is not None else z

    # --- persistence: tensors in safetensors, the rest in JSON (no pickle anywhere)
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"level_{i}": c.contiguous().float() for i, c in enumerate(self.centroids)}
        if self.vae is not None:
            tensors.update({f"vae.{k}": v.contiguous() for k, v in self.vae.state_dict().items()})
        tmp = folder / ".codebook.safetensors.tmp"
        save_file(tensors, str(tmp))
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, folder / "codebook.safetensors")
        meta = {"format": FORMAT_VERSION, "method": self.method, "version": self.version, "parent": self.parent,
                "data_hash": self.data_hash, "config": self.config, "levels": self.levels, "codes": self.codes,
                "metrics": self.metrics, "created_at": self.created_at, "weights_sha256": digest,
                "vae_config": asdict(self.vae.cfg) if self.vae is not None else None}
        (folder / ".codebook.json.tmp").write_text(json.dumps(meta, indent=2))
        os.replace(folder / ".codebook.json.tmp", folder / "codebook.json")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Codebook":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta_p, w_p = folder / "codebook.json", folder / "codebook.safetensors"
        if not meta_p.exists() or not w_p.exists():
            raise FileNotFoundError(f"no codebook in {folder} (expected codebook.json + codebook.safetensors)")
        try:
            meta = json.loads(meta_p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_p}: not valid JSON ({e})") from e
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{meta_p}: unsupported codebook format {meta.get('format')!r}")
        digest = hashlib.sha256(w_p.read_bytes()).hexdigest()
        if digest != meta.get("weights_sha256"):
            raise ValueError(f"{w_p}: checksum mismatch (file changed since it was written); refusing to load")
        tensors = load_file(str(w_p))
        cents = [tensors.get(f"level_{i}") for i in range(int(meta.get("levels", -1)))]
        held = sorted(k for k in tensors if k.startswith("level_"))
        if (not cents or any(c is None or c.ndim != 2 or c.shape[0] != meta.get("codes") for c in cents)
                or len(held) != len(cents)):
            raise ValueError(f"{meta_p}: says {meta.get('levels')} levels of {meta.get('codes')} codes but {w_p.name} "
                             f"holds {[tuple(tensors[k].shape) for k in held]}; refusing to load")
        vae = None
        if meta["method"] == "rqvae":
            vae = RQVAE(RQVAEConfig(**meta["vae_config"]))
            vae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("vae.")})
            vae.eval()
        return cls(method=meta["method"], centroids=cents, config=meta["config"], version=meta["version"],
                   parent=meta["parent"], data_hash=meta["data_hash"], metrics=meta.get("metrics", {}), vae=vae,
                   created_at=meta.get("created_at", 0.0))


def build_codebook(emb: np.ndarray, levels: int = 3, codes: int | None = None, method: str = "rqkmeans",
                   iters: int = 20, seed: int = 0, parent: Codebook | None = None, pairs: np.ndarray | None = None,
                   data_hash: str | None = None, rqvae: RQVAEConfig | None = None, device: str = "cpu",
                   on_level: Callable[[int], None] | None = None,
                   solve_assignment: AssignmentSolver | None = None) -> Codebook:
    """Builds a codebook. With `parent`, each level is warm-started from the parent's centroids and then
    matched to them (a minimum-cost assignment on centroid distances, solved by `solve_assignment`, e.g.
    scipy.optimize.linear_sum_assignment), so items whose embedding barely moved keep their IDs."""
    x = (emb.to(device=device, dtype=torch.float32) if isinstance(emb, torch.Tensor)
         else torch.as_tensor(np.asarray(emb, dtype=np.float32), device=device))
    codes = codes or default_codes(len(x))
    use_parent = (parent is not None and parent.method == method and parent.levels == levels
                  and parent.codes == codes and parent.dim == x.shape[1])
    if use_parent and solve_assignment is None:
        raise ValueError("a rebuild matched to its parent needs solve_assignment (e.g. scipy.optimize."
                         "linear_sum_assignment)")
    config = {"method": method, "levels": levels, "codes": codes, "iters": iters, "seed": seed, "dim": int(x.shape[1])}
    vae = None
    assigned = None
    if method == "rqkmeans":
        r, cents, level_codes = x, [], []
        for lvl in range(levels):
            init = parent.centroids[lvl] if use_parent else None
            c = kmeans(r, codes, iters=iters, seed=seed + lvl, init=init)
            if use_parent:
                c = match_to_parent(c, parent.centroids[lvl].to(c.device), solve_assignment)
            idx, _ = _assign(r, c)
            r = r - c[idx]
            cents.append(c.cpu())
            level_codes.append(idx.cpu())
            if on_level:
                on_level(lvl)
        assigned = torch.stack(level_codes, 1).numpy()  # what `assign` would give: same centroids, same order
    elif method == "rqvae":
        cfg = rqvae or RQVAEConfig(dim=int(x.shape[1]), levels=levels, codes=codes, seed=seed)
        cfg.dim, cfg.levels, cfg.codes = int(x.shape[1]), levels, codes
        config["rqvae"] = asdict(cfg)
        vae = train_rqvae(x.cpu(), pairs if pairs is not None else np.zeros((0, 2), np.int64), cfg,
                          init=parent.vae if use_parent else None)
        if use_parent:
            with torch.no_grad():
                for lvl in range(levels):
                    vae.codebooks.data[lvl] = match_to_parent(vae.codebooks.data[lvl], parent.vae.codebooks[lvl],
                                                              solve_assignment)
        cents = [vae.codebooks[lvl].detach().clone() for lvl in range(levels)]
    else:
        raise ValueError(f"unknown codebook method '{method}': expected 'rqkmeans' or 'rqvae'")
    data_hash = data_hash or embeddings_hash(x.cpu().numpy())
    vid = hashlib.sha256(json.dumps([data_hash, config, parent.version if parent else None],
                                    sort_keys=True).encode()).hexdigest()[:12]
    cb = Codebook(method=method, centroids=cents, config=config, version=f"{method}-{vid}",
                  parent=parent.version if parent else None, data_hash=data_hash, vae=vae)
    if assigned is None:
        assigned = cb.assign(x.cpu().numpy())
    if method == "rqkmeans":  # reconstruction error where x lives (GPU stays GPU)
        codes_t = torch.as_tensor(assigned, device=x.device)
        recon = sum(c.to(x.device)[codes_t[:, lvl]] for lvl, c in enumerate(cents))
        recon_err = float(((x - recon) ** 2).sum(1).mean() / (x ** 2).sum(1).mean().clamp_min(1e-12))
    else:
        xc = x.cpu()
        recon_err = float(((xc - cb.reconstruct(assigned)) ** 2).sum(1).mean() / (xc ** 2).sum(1).mean().clamp_min(1e-12))
    cb.metrics = code_metrics(assigned, codes, recon_err)
    cb.metrics["parent_matched"] = bool(use_parent)
    return cb
