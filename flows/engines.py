"""Where the heavy compute runs, behind one small interface: tower inference (texts, images), the encoder's item
embeddings and ranker training. `compute_engine(settings)` chooses once: the local engine (this process, the
embedded default) or, with SEMALIGN_RAY_ADDRESS set, the Ray engine (flows/ray_engine.py), which computes the same
things on a cluster and returns the same bits (ranker training: the same weights with one train worker). The stages
never ask which one they have."""
from __future__ import annotations

from typing import Callable

import numpy as np

from semalign.config import Settings
from semalign.progress import Reporter

ProgressFn = Callable[[int], None]


class LocalEngine:
    """Computes in this process, on the settings' device; towers are loaded on first use and kept."""

    name = "local"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._text_tower = self._image_tower = None

    def connect(self) -> dict | None:
        """What the refresh reports about where it computes (None: here, nothing to report)."""
        return None

    def jobs(self) -> list[dict] | None:
        return None

    def stage_name(self, what: str) -> str:
        return what

    def image_tower(self):
        from semalign.models.towers import ImageTower

        self._image_tower = self._image_tower or ImageTower(device=self.settings.resolved_device())
        return self._image_tower

    def text_vectors(self, texts: list[str], progress: ProgressFn | None = None) -> np.ndarray:
        from semalign.models.towers import TextTower

        self._text_tower = self._text_tower or TextTower(self.settings.resolved_text_model(),
                                                         device=self.settings.resolved_device())
        return self._text_tower.encode(texts, progress=progress)

    def image_vectors(self, paths: list[str | None], progress: ProgressFn | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
        return self.image_tower().encode(paths, progress=progress)

    def item_embeddings(self, model, text: np.ndarray, image: np.ndarray | None,
                        has_image: np.ndarray | None) -> np.ndarray:
        from semalign.models.encoder import embed_items

        return embed_items(model, text, image, has_image, self.settings.resolved_device())

    def train_ranker(self, cfg, tables, train, val, rep: Reporter):
        from semalign.models.ranker_training import train_ranker

        with rep.stage("ranker", cfg.max_epochs) as adv:
            return train_ranker(cfg, tables, train, val, self.settings.resolved_device(),
                                on_epoch=lambda r: adv(1, val_auc=f"{r['val_auc']:.4f}"))


def compute_engine(settings: Settings):
    """The engine the settings choose: Ray when SEMALIGN_RAY_ADDRESS is set (Ray is imported only then), else
    local."""
    if settings.ray_address:
        from semalign.flows.ray_engine import RayEngine

        return RayEngine(settings)
    return LocalEngine(settings)
