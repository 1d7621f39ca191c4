"""Bounded item tables and compact item representations.

- `hash_item_rows`: item IDs hashed (seeded) into a fixed number of ID-table rows, as production rankers do once a
  catalogue outgrows one row per item. Every item hashes, seen in training or not: a bounded table cannot know.
- `sid_ngram_rows`: the rows of an item's SID prefix n-grams (c1, c1c2, ..., the full SID with its dedup level) in
  the same bounded table, so rows are shared by meaning instead of by accident.
- `VectorCodec`: the aligned vector at fewer bytes (int8 with a per-vector scale, or product quantization at
  m bytes), for the matched-bytes comparison against SIDs.
Imports only torch, numpy and the standard library.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

HASH_PRIME = (1 << 31) - 1  # universal hashing ((a*x + b) mod p) mod B; x < p keeps a*x inside int64


def hash_item_rows(item_ids, buckets: int, seed: int) -> np.ndarray:
    """[n] int64 rows in 1..buckets for item ids (strings or ints, hashed by their text), seeded. Row 0 stays the
    padding / out-of-vocabulary row. Deterministic across processes and machines (no Python `hash`)."""
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    key = int(seed).to_bytes(8, "little", signed=True)
    out = np.empty(len(item_ids), np.int64)
    for k, iid in enumerate(item_ids):
        d = hashlib.blake2b(str(iid).encode(), digest_size=8, key=key).digest()
        out[k] = int.from_bytes(d, "little") % buckets + 1
    return out


def sid_ngram_params(levels: int, n_codes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mult [L+1], a [L+1], b [L+1]) for `sid_ngram_rows`: a prefix's value is sum_i c_i * K^i (unique per
    prefix; the full SID adds dedup * K^L), and each n-gram level has its own seeded hash, so c1 = 5 and c1c2 = 5
    land on unrelated rows. Derived from the seed alone: a loaded model recomputes them."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x51D])
    ab = rng.integers(1, HASH_PRIME, size=(levels + 1, 2))
    mult = torch.as_tensor([max(int(n_codes), 1) ** i for i in range(levels + 1)], dtype=torch.long)
    return mult, torch.as_tensor(ab[:, 0], dtype=torch.long), torch.as_tensor(ab[:, 1], dtype=torch.long)


def sid_ngram_rows(codes: torch.Tensor, dedup: torch.Tensor, mult: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   buckets: int) -> torch.Tensor:
    """Rows in 1..buckets of an item's SID prefix n-grams: prefixes of length 1..L of its codes [..., L], then the
    full SID with its dedup level [...] (L + 1 rows per item)."""
    levels = mult.shape[0] - 1
    full = torch.cat([codes[..., :levels], dedup.unsqueeze(-1)], -1)
    prefix = torch.cumsum(full * mult, -1)
    prefix = torch.cat([prefix[..., :levels], prefix[..., -1:]], -1) % HASH_PRIME
    return (prefix * a + b) % HASH_PRIME % buckets + 1


CODECS = ("float", "int8", "pq4", "pq8", "pq16", "pq32")


def codec_bytes(codec: str, dim: int) -> int:
    """Bytes per item of a `dim`-float vector under `codec` (int8: dim bytes + a float32 scale)."""
    if codec == "float":
        return 4 * dim
    if codec == "int8":
        return dim + 4
    return int(codec[2:])


class VectorCodec:
    """Lossy codes of vectors, fit on some rows and applied to all: `int8` (symmetric, one float32 scale per
    vector: dim + 4 bytes) or `pqM` (product quantization, M sub-vectors of dim/M floats, 256 centroids each:
    M bytes). `roundtrip` returns what a ranker serving the codes would read."""

    def __init__(self, codec: str, seed: int = 0, iters: int = 20):
        if codec not in CODECS:
            raise ValueError(f"unknown vector codec '{codec}': expected one of {CODECS}")
        self.codec, self.seed, self.iters = codec, seed, iters
        self.centroids: list[torch.Tensor] | None = None

    def fit(self, x: np.ndarray) -> "VectorCodec":
        if not self.codec.startswith("pq"):
            return self
        from .kmeans import kmeans

        m = int(self.codec[2:])
        if x.shape[1] % m:
            raise ValueError(f"{self.codec}: dim {x.shape[1]} is not a multiple of {m} sub-vectors")
        k = min(256, len(x))
        t = torch.as_tensor(np.asarray(x, np.float32))
        self.centroids = [kmeans(part.contiguous(), k, iters=self.iters, seed=self.seed + j)
                          for j, part in enumerate(t.chunk(m, dim=1))]
        return self

    def encode(self, x: np.ndarray):
        """int8: (codes [n, dim] int8, scales [n] float32); pqM: codes [n, M] uint8."""
        x = np.asarray(x, np.float32)
        if self.codec == "int8":
            scale = np.abs(x).max(1) / 127.0
            scale[scale == 0] = 1.0
            return np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8), scale.astype(np.float32)
        if self.centroids is None:
            raise ValueError(f"{self.codec}: fit the codec before encoding")
        t = torch.as_tensor(x)
        parts = [torch.cdist(part, c).argmin(1) for part, c in zip(t.chunk(len(self.centroids), dim=1), self.centroids)]
        return torch.stack(parts, 1).numpy().astype(np.uint8)

    def decode(self, codes) -> np.ndarray:
        if self.codec == "int8":
            q, scale = codes
            return q.astype(np.float32) * scale[:, None]
        c = torch.as_tensor(np.asarray(codes, np.int64))
        return torch.cat([cent[c[:, j]] for j, cent in enumerate(self.centroids)], 1).numpy()

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        if self.codec == "float":
            return np.asarray(x, np.float32)
        return self.decode(self.encode(x)).astype(np.float32)
