"""The versioned `Codebook` artifact (safetensors + JSON) and `build_codebook`: RQ-KMeans (default) or RQ-VAE,
with stable rebuilds against a parent codebook. Imports only torch and numpy (plus stdlib; safetensors ships with
transformers)."""
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

from .kmeans import AssignmentSolver, _assign, assign_levels, kmeans, match_to_parent
from .rqvae import RQVAE, RQVAEConfig, train_rqvae
from .sids import code_metrics

FORMAT_VERSION = 1


def default_codes(n_items: int) -> int:
    """Codes per level sized to the catalogue: a power of two near sqrt(n), between 8 and 256."""
    k = 2 ** round(math.log2(max(1.0, math.sqrt(max(1, n_items)))))
    return int(min(256, max(8, k)))



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
        return assign_levels(r, self.centroids).numpy().astype(np.int64)

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
        cents, assigned = _residual_kmeans(x, levels, codes, iters, seed, parent if use_parent else None,
                                           solve_assignment, on_level)
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
    if isinstance(assigned, torch.Tensor) and assigned.device.type == "cpu":
        assigned = assigned.numpy()  # counted by numpy on CPU, as before; a GPU build counts on the GPU
    cb.metrics = code_metrics(assigned, codes, recon_err)
    cb.metrics["parent_matched"] = bool(use_parent)
    return cb


def _residual_kmeans(x: torch.Tensor, levels: int, codes: int, iters: int, seed: int, parent: Codebook | None,
                     solve_assignment: AssignmentSolver | None, on_level: Callable[[int], None] | None):
    """RQ-KMeans: k-means on the residual at each level (warm-started from and matched to `parent`'s centroids
    where given). Returns (centroids per level on CPU, codes [n, levels] as a tensor where x lives: what `assign`
    would give)."""
    r, cents, level_codes = x, [], []
    for lvl in range(levels):
        init = parent.centroids[lvl] if parent is not None else None
        c = kmeans(r, codes, iters=iters, seed=seed + lvl, init=init)
        if parent is not None:
            c = match_to_parent(c, parent.centroids[lvl].to(c.device), solve_assignment)
        idx, _ = _assign(r, c)
        r = r - c[idx]
        cents.append(c.cpu())
        level_codes.append(idx)
        if on_level:
            on_level(lvl)
    return cents, torch.stack(level_codes, 1)  # where x lives: metrics are counted there
