"""RQ-VAE: an encoder/decoder around residual vector quantization, trained with a contrastive term on behavior
pairs (an ablation against RQ-KMeans; design section 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kmeans import _assign, kmeans


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
