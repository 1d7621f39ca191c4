"""The SID tokenizer bundle's loader: one folder with the behavior-aware encoder (torch.export), the codebook
(centroids, the rotation onto the codebook's space) and the item -> SID table of one codebook version. Needs only
torch and numpy: this file is copied into every bundle, so a bare Python can use it without semalign.

    import sys; sys.path.insert(0, "path/to/bundle")
    from sid_tokenizer import SidTokenizer
    tok = SidTokenizer.load("path/to/bundle")
    tok.sids(["item-1"])                     # the SIDs the feature store holds (with the dedup level)
    tok.items("12-5")                        # reverse lookup by SID prefix
    tok.assign(text_vectors)                 # SIDs (no dedup level) of new items from their text-tower vectors

A new item's text-tower vector is the output of the bundle's text model (`meta["text_model"]`, mean-pooled and
normalised as sentence-transformers does); with images, pass the image-tower features and which items have one.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FORMAT = 1


class SidTokenizer:
    def __init__(self, folder: Path, meta: dict, encoder, centroids: np.ndarray, rotation: np.ndarray | None,
                 latent, item_ids: np.ndarray, codes: np.ndarray):
        self.folder, self.meta = folder, meta
        self.encoder, self.centroids, self.rotation, self.latent = encoder, centroids, rotation, latent
        self.item_ids, self.codes = item_ids, codes
        self._row = {str(i): k for k, i in enumerate(item_ids.tolist())}

    @classmethod
    def load(cls, folder) -> "SidTokenizer":
        folder = Path(folder)
        meta = json.loads((folder / "bundle.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder}: unsupported SID bundle format {meta.get('format')!r} (expected {FORMAT})")
        encoder = torch.export.load(str(folder / "encoder.pt2")).module()
        cb = np.load(folder / "codebook.npz")
        latent = torch.export.load(str(folder / "latent.pt2")).module() if (folder / "latent.pt2").exists() else None
        table = np.load(folder / "items.npz", allow_pickle=False)
        return cls(folder, meta, encoder, cb["centroids"], cb["rotation"] if "rotation" in cb else None, latent,
                   table["item_ids"], table["codes"])

    @property
    def version(self) -> str:
        return self.meta["codebook_version"]

    # ------------------------------------------------------------------ the table
    def sids(self, item_ids) -> np.ndarray:
        """Full SIDs [n, levels + 1] (the last column is the dedup level) of items the bundle holds; KeyError
        names the first it does not."""
        rows = []
        for i in item_ids:
            if str(i) not in self._row:
                raise KeyError(f"item {i!r} is not in codebook version {self.version}")
            rows.append(self._row[str(i)])
        return self.codes[rows]

    def items(self, prefix: str) -> list[str]:
        """Items whose SID starts with `prefix` ("12", "12-5", ... up to the full SID with its dedup level)."""
        want = [int(p) for p in str(prefix).split("-")]
        if not 1 <= len(want) <= self.codes.shape[1]:
            raise ValueError(f"'{prefix}' is not a SID prefix: 1 to {self.codes.shape[1]} codes joined by '-'")
        hit = (self.codes[:, : len(want)] == np.asarray(want)).all(1)
        return self.item_ids[hit].tolist()

    # ------------------------------------------------------------------ new items
    @torch.no_grad()
    def embed(self, text: np.ndarray, image: np.ndarray | None = None, has_image: np.ndarray | None = None,
              batch: int = 8192) -> np.ndarray:
        """Aligned vectors [n, d] in the codebook's space from text-tower vectors [n, dt] (and image features)."""
        t = torch.as_tensor(np.asarray(text, np.float32))
        image_dim = int(self.meta.get("image_dim") or 0)
        if image_dim:
            image = np.zeros((len(t), image_dim), np.float32) if image is None else image
            has_image = np.zeros(len(t), bool) if has_image is None else has_image
            i, m = torch.as_tensor(np.asarray(image, np.float32)), torch.as_tensor(np.asarray(has_image, bool))
        out = []
        for s in range(0, len(t), batch):
            args = (t[s:s + batch],) + ((i[s:s + batch], m[s:s + batch]) if image_dim else ())
            out.append(self.encoder(*args).float())
        emb = torch.cat(out).numpy() if out else np.zeros((0, int(self.meta["dim"])), np.float32)
        return (emb @ self.rotation).astype(np.float32) if self.rotation is not None else emb

    def assign(self, text: np.ndarray, image: np.ndarray | None = None, has_image: np.ndarray | None = None
               ) -> np.ndarray:
        """SIDs [n, levels] (no dedup level) of new items, as the feature store assigns them."""
        return self.assign_vectors(self.embed(text, image, has_image))

    @torch.no_grad()
    def assign_vectors(self, emb: np.ndarray) -> np.ndarray:
        """SIDs [n, levels] of aligned vectors: nearest centroid per level on the residual, computed as the
        codebook does (argmax of [x, 1] . [c, -|c|^2 / 2] in float32)."""
        x = np.asarray(emb, np.float32)
        r = self.latent(torch.as_tensor(x)).numpy() if self.latent is not None else x
        out = []
        for c in self.centroids:
            ca = np.ascontiguousarray(np.concatenate([c, -0.5 * (c * c).sum(1, keepdims=True)], 1).T
                                      .astype(np.float32, copy=False))
            ra = np.empty((len(r), r.shape[1] + 1), np.float32)
            ra[:, :-1], ra[:, -1] = r, 1.0
            idx = np.empty(len(r), np.int64)
            for s in range(0, len(r), 16384):
                idx[s:s + 16384] = np.matmul(ra[s:s + 16384], ca).argmax(1)
            out.append(idx)
            r = r - c[idx]
        return np.stack(out, 1) if out else np.zeros((len(x), 0), np.int64)


def write_bundle(folder, encoder: torch.nn.Module, text_dim: int, image_dim: int, centroids: list,
                 rotation: np.ndarray | None, latent: torch.nn.Module | None, item_ids: list[str],
                 codes: np.ndarray, meta: dict) -> Path:
    """Writes a bundle `SidTokenizer.load` reads: the encoder exported with torch.export (no Python class needed to
    load it), the codebook as arrays, the item -> SID table and this loader file. `codes`: [n, levels + 1]."""
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    example = (torch.zeros(4, text_dim),) + ((torch.zeros(4, image_dim), torch.zeros(4, dtype=torch.bool))
                                             if image_dim else ())
    with torch.no_grad():
        torch.export.save(torch.export.export(encoder.eval(), example, dynamic_shapes=tuple({0: batch} for _ in example)),
                          str(folder / "encoder.pt2"))
        if latent is not None:  # RQ-VAE codebooks quantize in a latent space: its encoder travels too
            torch.export.save(torch.export.export(latent.eval(), (torch.zeros(4, int(meta["dim"])),),
                                                  dynamic_shapes=({0: batch},)), str(folder / "latent.pt2"))
    arrays = {"centroids": np.stack([np.asarray(c, np.float32) for c in centroids])}
    if rotation is not None:
        arrays["rotation"] = np.asarray(rotation, np.float32)
    np.savez(folder / "codebook.npz", **arrays)
    np.savez(folder / "items.npz", item_ids=np.asarray([str(i) for i in item_ids]), codes=np.asarray(codes, np.int64))
    (folder / "bundle.json").write_text(json.dumps({"format": FORMAT, "text_dim": text_dim, "image_dim": image_dim,
                                                    **meta}, indent=2))
    shutil.copyfile(Path(__file__), folder / "sid_tokenizer.py")
    return folder
