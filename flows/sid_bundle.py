"""The SID tokenizer bundle of a published codebook version: its encoder, codebook and item -> SID table (published
and onboarded items) in one folder that a bare torch + numpy Python loads (models/sid_tokenizer.py)."""
from __future__ import annotations

from pathlib import Path

from semalign.config import Settings


def export_sid_bundle(settings: Settings, version: str | None, dest: Path, store=None) -> dict:
    """Writes the bundle of `version` (default: the current one) to `dest`, whole or not at all."""
    from semalign import atomic
    from semalign.artifacts import codebook_folder
    from semalign.feature_repo.store import SemanticIdStore
    from semalign.models.encoder import load_encoder
    from semalign.models.sid_tokenizer import write_bundle
    from semalign.models.towers import text_fingerprint

    store = store or SemanticIdStore(settings)
    row = store.catalogue.published(version)
    version = row["version"]
    folder = codebook_folder(settings, version)
    cb = folder.load_codebook()
    enc_version = folder.encoder_version()
    if enc_version is None:
        from semalign.errors import InvalidInputError

        raise InvalidInputError(f"codebook {version} does not record its encoder: it has no tokenizer bundle")
    from semalign.errors import reading

    with reading(settings.encoders_dir / enc_version):
        encoder, _ = load_encoder(settings.encoders_dir / enc_version, "cpu")
    item_ids, codes = store.catalogue.sid_table(version, cb.levels)
    meta = {"codebook_version": version, "encoder_version": enc_version, "method": cb.method, "levels": cb.levels,
            "codes": cb.codes, "dim": cb.dim, "text_model": text_fingerprint(settings.resolved_text_model()),
            "items": len(item_ids), "feast_project": settings.feast_project}
    with atomic.building(Path(dest)) as tmp:
        write_bundle(tmp, encoder, encoder.cfg.text_dim, encoder.cfg.image_dim,
                     [c.detach().float().numpy() for c in cb.centroids], folder.rotation(),
                     cb.vae.enc if cb.vae is not None else None, item_ids, codes, meta)
    return {"bundle": str(Path(dest).resolve()), **meta}
