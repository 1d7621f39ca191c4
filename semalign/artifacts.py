"""The on-disk layout of codebook versions under SEMALIGN_HOME/codebooks/, known here only:

    codebooks/LATEST                  the version the last build made latest
    codebooks/<version>/codebook.json + codebook.safetensors   the codebook (models.codebook.Codebook)
    codebooks/<version>/sids.parquet  every item's SID and aligned vector at build time
    codebooks/<version>/lineage.json  the encoder that embeds new items into this space, and whether a rotation
    codebooks/<version>/rotation.npy  ... maps that encoder's output onto the parent's space
    codebooks/<version>/churn.json    SID churn against the parent
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semalign import atomic


@dataclass(frozen=True)
class CodebookFolder:
    path: Path

    @property
    def version(self) -> str:
        return self.path.name

    @property
    def sids_file(self) -> Path:
        return self.path / "sids.parquet"

    def exists(self) -> bool:
        return (self.path / "codebook.json").exists()

    def load_codebook(self):
        from semalign.errors import reading
        from semalign.models.codebook import Codebook

        with reading(self.path):  # tampered, truncated or edited by hand: DamagedFileError naming the folder
            return Codebook.load(self.path)

    def lineage(self) -> dict:
        p = self.path / "lineage.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def encoder_version(self) -> str | None:
        return self.lineage().get("encoder_version")

    def rotation(self) -> np.ndarray | None:
        p = self.path / "rotation.npy"
        return np.load(p, allow_pickle=False) if p.exists() else None

    def churn(self) -> dict | None:
        p = self.path / "churn.json"
        return json.loads(p.read_text()) if p.exists() else None


def write_lineage(folder: Path, encoder_version: str | None, rotation: np.ndarray | None = None) -> None:
    """Into a folder being built: what onboarding needs to embed a new item into this codebook's space."""
    (folder / "lineage.json").write_text(json.dumps({"encoder_version": encoder_version,
                                                     "rotated": rotation is not None}, indent=2))
    if rotation is not None:
        np.save(folder / "rotation.npy", rotation.astype(np.float32), allow_pickle=False)


def write_churn(folder: Path, churn: dict) -> None:
    (folder / "churn.json").write_text(json.dumps(churn, indent=2))


def codebooks_root(settings) -> Path:
    return settings.codebooks_dir


def codebook_folder(settings, version: str) -> CodebookFolder:
    return CodebookFolder(codebooks_root(settings) / version)


def built_versions(settings) -> list[str]:
    root = codebooks_root(settings)
    return sorted(p.parent.name for p in root.glob("*/codebook.json") if not p.parent.name.startswith(".")) \
        if root.exists() else []


def latest_version(settings) -> str | None:
    p = codebooks_root(settings) / "LATEST"
    return p.read_text().strip() if p.exists() else None


def set_latest(settings, version: str) -> None:
    codebooks_root(settings).mkdir(parents=True, exist_ok=True)
    atomic.write_text(codebooks_root(settings) / "LATEST", version)
