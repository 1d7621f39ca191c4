"""The item embedder: an item's content (text, optional image) -> frozen towers -> the behavior-aware encoder of
a codebook version -> that codebook's space (its rotation). Handed to the feature store for onboarding and to
serving for on-the-fly candidates (`store.open_store`), so the store itself runs no model. It lives beside the
store, not in flows/, so that serving (deploy/) reaches it without importing the flows: models are imported
lazily, on the first item embedded."""
from __future__ import annotations

import threading

import numpy as np
import pandas as pd

from semalign.artifacts import codebook_folder
from semalign.config import Settings
from semalign.errors import InvalidInputError
from semalign.feature_repo.errors import FeatureStoreError


class ItemEmbedder:
    """Holds the towers and the encoder of one codebook version, so one new item costs one forward pass."""

    def __init__(self, settings: Settings, version: str, encoder_version: str | None = None):
        folder = codebook_folder(settings, version)
        self.version = version
        self.encoder_version = encoder_version or folder.encoder_version()
        self.rotation = folder.rotation()
        self.settings = settings
        self._text = self._image = self._encoder = None
        self._loading = threading.Lock()  # the service embeds from threads: one loads the models, the others wait

    def embed(self, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(aligned vectors [n, d], text-tower vectors [n, dt]) of items' content."""
        from semalign.models.encoder import embed_items
        from semalign.models.towers import TextTower

        if self.encoder_version is None:
            raise FeatureStoreError(f"codebook {self.version} does not record its encoder; pass embeddings")
        text = items["text"] if "text" in items else pd.Series(None, index=items.index, dtype=object)
        empty = text.isna() | (text.astype(str).str.strip() == "")
        if empty.any():
            raise InvalidInputError(f"onboarding needs a non-empty 'text' for every item; missing for "
                                    f"{items.loc[empty, 'item_id'].tolist()[:5]}")
        dev = self.settings.resolved_device()
        with self._loading:
            if self._text is None:
                if self._encoder is None:
                    self._encoder = self._load_encoder(dev)
                # onboarding batches are small and this may run inside the scoring server (threads): no forked
                # tokenizer processes, and no CUDA graphs (a replay's input and output tensors are shared by every
                # caller)
                self._text = TextTower(self.settings.resolved_text_model(), device=dev, tokenize_workers=0,
                                       cuda_graphs=False)
        text = self._text.encode(items["text"].astype(str).tolist())
        image, has_image = self._images(items, dev)
        emb = embed_items(self._encoder, text, image, has_image, dev)
        if self.rotation is not None:
            emb = (emb @ self.rotation).astype(np.float32)
        return emb, np.asarray(text, np.float32)

    def embed_text_vectors(self, text: np.ndarray) -> np.ndarray:
        """Aligned vectors [n, d] of items known only by their text-tower vectors [n, dt] (no image): how items
        onboarded under another codebook version are carried into this one."""
        from semalign.models.encoder import embed_items

        if self.encoder_version is None:
            raise FeatureStoreError(f"codebook {self.version} does not record its encoder")
        dev = self.settings.resolved_device()
        with self._loading:
            if self._encoder is None:
                self._encoder = self._load_encoder(dev)
        image = np.zeros((len(text), self._encoder.cfg.image_dim), np.float32) if self._encoder.cfg.image_dim else None
        emb = embed_items(self._encoder, np.asarray(text, np.float32), image, np.zeros(len(text), bool), dev)
        return (emb @ self.rotation).astype(np.float32) if self.rotation is not None else emb

    def _load_encoder(self, dev: str):
        from semalign.errors import reading
        from semalign.models.encoder import load_encoder

        folder = self.settings.encoders_dir / self.encoder_version
        with reading(folder):  # a damaged encoder file: DamagedFileError naming it (the service answers 500)
            return load_encoder(folder, dev)[0]

    def _images(self, items: pd.DataFrame, dev) -> tuple[np.ndarray | None, np.ndarray]:
        """Image-tower features [n, di] (zeros where an item has none) and which items have one."""
        from semalign.models.towers import ImageTower

        has_image = np.zeros(len(items), bool)
        if not self._encoder.cfg.image_dim:
            return None, has_image
        image = np.zeros((len(items), self._encoder.cfg.image_dim), np.float32)
        paths = items["image_path"].tolist() if "image_path" in items else [None] * len(items)
        sel = [j for j, p in enumerate(paths) if isinstance(p, str) and p]
        if self.settings.use_images and sel:
            self._image = self._image or ImageTower(device=dev)
            vec, ok = self._image.encode([paths[j] for j in sel])
            image[sel] = vec
            has_image[sel] = ok
        return image, has_image


def item_embedders(settings: Settings):
    """The factory the store takes: (catalogue row of a published version) -> ItemEmbedder."""
    return lambda row: ItemEmbedder(settings, row["version"], row.get("encoder_version"))
