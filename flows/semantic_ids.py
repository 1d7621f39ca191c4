"""Stages from raw data to behavior-aligned embeddings and versioned semantic IDs.

Each stage is keyed by a hash of its inputs and config, and returns what is on disk when that key was
already built, so re-running on unchanged input does no repeated work and publishes nothing new.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from semalign import artifacts, atomic
from semalign.config import Settings
from semalign.data import Dataset, Split, load_for_settings, mine_pairs, settings_split
from semalign.errors import InvalidInputError, NotFoundError, reading
from semalign.hashing import digest
from semalign.progress import Reporter


def _hash(*parts) -> str:
    return digest(*parts, length=12)


@dataclass
class TowerFeatures:
    text: np.ndarray           # [n_items, d_text]
    image: np.ndarray | None   # [n_items, d_image] or None when images are off / absent
    has_image: np.ndarray      # [n_items] bool
    text_model: str
    image_model: str | None
    computed: dict             # items embedded this run (0 on a warm cache)

    def hash(self) -> str:
        parts = [self.text.tobytes(), self.has_image.tobytes()]
        if self.image is not None:
            parts.append(self.image.tobytes())
        return _hash(*parts)


def ingest(settings: Settings, data: str | Path | None = None, on_bad_rows: str | None = None) -> Dataset:
    return load_for_settings(settings, data, on_bad_rows)  # a folder, s3:// or a database; sampling settings


def tower_features(settings: Settings, ds: Dataset, rep: Reporter | None = None, engine=None) -> TowerFeatures:
    """Every item's text-tower (and image-tower) vector, from the cache where the same content was embedded with the
    same model before; the rest computed by `engine` (flows/engines.py)."""
    from semalign.flows.engines import compute_engine
    from semalign.models.towers import FeatureCache, file_key, text_fingerprint, text_key

    rep = rep or Reporter(quiet=True)
    engine = engine or compute_engine(settings)
    texts = ds.items["text"].tolist()

    def text_compute(missing):
        with rep.stage(engine.stage_name("text tower"), len(missing)) as adv:
            v = engine.text_vectors([texts[i] for i in missing], progress=adv)
        return v, np.ones(len(missing), bool)

    tfp = text_fingerprint(settings.resolved_text_model())  # model dir identity, no weights loaded
    text, _, n_text = FeatureCache(settings.cache_dir, tfp).get_or_compute([text_key(t) for t in texts], text_compute)

    image, has_image, n_img, image_fp = None, np.zeros(ds.n_items, bool), 0, None
    paths = ds.items["image_path"].tolist()
    if settings.use_images and any(p is not None for p in paths):
        image_fp = engine.image_tower().fingerprint

        def image_compute(missing):
            with rep.stage(engine.stage_name("image tower"), len(missing)) as adv:
                return engine.image_vectors([paths[i] for i in missing], progress=adv)

        image, has_image, n_img = FeatureCache(settings.cache_dir, image_fp).get_or_compute(
            [file_key(p) for p in paths], image_compute)
        unreadable = int(sum(p is not None for p in paths) - has_image.sum())
        if unreadable:
            ds.report["unreadable_images"] = unreadable
    return TowerFeatures(text=text, image=image, has_image=has_image, text_model=tfp, image_model=image_fp,
                         computed={"text": n_text, "image": n_img})


@dataclass
class EncoderOutput:
    version: str
    embeddings: np.ndarray      # [n_items, d], every item (cold ones from content)
    metrics: dict
    reused: bool


def encoder_stage(settings: Settings, ds: Dataset, split: Split, feats: TowerFeatures,
                  rep: Reporter | None = None, parent: str | None = None, move_latest: bool = False,
                  engine=None) -> EncoderOutput:
    """Trains (or reuses) the encoder. With `parent` ("latest" or a version) a retrain starts from the parent's
    weights and image PCA, so item embeddings move only as far as behavior changed: that is what keeps
    semantic IDs stable across refreshes."""
    from semalign.flows.engines import compute_engine
    from semalign.models.encoder import load_encoder, save_encoder, train_encoder
    from semalign.spec import encoder_config

    rep = rep or Reporter(quiet=True)
    device = settings.resolved_device()
    pairs = mine_pairs(split.part("train"), settings.pair_window, settings.pair_max_gap_s)
    val_pairs = mine_pairs(split.part("val"), settings.pair_window, settings.pair_max_gap_s)
    test_pairs = mine_pairs(split.part("test"), settings.pair_window, settings.pair_max_gap_s)
    cfg = encoder_config(settings, text_dim=feats.text.shape[1],
                         image_dim=feats.image.shape[1] if feats.image is not None else 0)
    input_key = _hash(feats.hash(), pairs.tobytes(), val_pairs.tobytes(), asdict(cfg))
    latest_p = settings.encoders_dir / "LATEST"
    parent_version = (latest_p.read_text().strip() if latest_p.exists() else None) if parent == "latest" else parent
    parent_model, parent_meta = None, {}
    if parent_version:
        if not (settings.encoders_dir / parent_version / "encoder.json").exists():
            raise NotFoundError(f"unknown parent encoder '{parent_version}' under {settings.encoders_dir}")
        with reading(settings.encoders_dir / parent_version):
            parent_model, parent_meta = load_encoder(settings.encoders_dir / parent_version, device)
    if parent_meta.get("input_key") == input_key:  # same inputs as the parent: the parent is the result
        version, model, meta, parent_model = parent_version, parent_model, parent_meta, None
    elif parent_model is not None and parent_model.cfg == cfg:  # warm start; a different shape cannot
        version = "enc-" + _hash(input_key, parent_version)
    else:
        version, parent_model = "enc-" + input_key, None
    folder = settings.encoders_dir / version
    reused = (folder / "encoder.json").exists()
    if reused and version != parent_version:
        with reading(folder):
            model, meta = load_encoder(folder, device)
    elif not reused:
        with rep.stage("encoder" + (" (from parent)" if parent_model is not None else ""), cfg.epochs) as adv:
            res = train_encoder(feats.text, feats.image, feats.has_image, pairs, val_pairs, cfg, device,
                                on_epoch=lambda r: adv(1, val_hit30=f"{r['val_hit']:.3f}"), init=parent_model)
        model = res.model
        meta = {"version": version, "input_key": input_key, "parent": parent_version if parent_model is not None else None,
                "best_epoch": res.best_epoch, "history": res.history,
                "train_pairs": int(len(pairs)), "val_pairs": int(len(val_pairs)), "split": split.kind}
    emb = (engine or compute_engine(settings)).item_embeddings(model, feats.text, feats.image, feats.has_image)
    metrics = {"train_pairs": int(len(pairs)), "val_pairs": int(len(val_pairs)), "best_epoch": meta["best_epoch"],
               **encoder_metrics(emb, feats, split, test_pairs, cfg.eval_k, device)}
    if not reused:  # into a temp folder, then one rename: a run that dies here leaves no partial version
        with atomic.building(folder) as tmp:
            save_encoder(model, tmp, {**meta, "metrics": metrics})
    if move_latest:
        settings.encoders_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(latest_p, version)
    return EncoderOutput(version=version, embeddings=emb, metrics=metrics, reused=reused)


def encoder_metrics(emb: np.ndarray, feats: TowerFeatures, split: Split, test_pairs: np.ndarray, k: int,
                    device: str = "cpu") -> dict:
    """hit@k of the encoder against the raw towers on the test window's behavior pairs: all, those with a cold
    item, and those whose items both have images."""
    from functools import partial

    from semalign.models.encoder import hit_at_k

    hit_at_k = partial(hit_at_k, device=device)
    test_pairs = np.asarray(test_pairs, dtype=np.int64).reshape(-1, 2)
    cold_pairs = test_pairs[np.isin(test_pairs, split.cold_items).any(1)]
    both_img = test_pairs[feats.has_image[test_pairs].all(1)] if len(test_pairs) else test_pairs
    hits = {"encoder": hit_at_k(emb, test_pairs, k), "raw_text": hit_at_k(feats.text, test_pairs, k),
            "encoder_cold_pairs": hit_at_k(emb, cold_pairs, k), "raw_text_cold_pairs": hit_at_k(feats.text, cold_pairs, k)}
    out = {"test_pairs": int(len(test_pairs)), "test_pairs_with_cold_item": int(len(cold_pairs)), f"hit@{k}": hits}
    if feats.image is not None and len(both_img):
        hits.update(encoder_image_pairs=hit_at_k(emb, both_img, k), raw_image_image_pairs=hit_at_k(feats.image, both_img, k),
                    raw_text_image_pairs=hit_at_k(feats.text, both_img, k))
        out["test_pairs_both_images"] = int(len(both_img))
    return out


# ---------------------------------------------------------------- codebooks

def latest_codebook_version(settings: Settings) -> str | None:
    return artifacts.latest_version(settings)


def load_codebook(settings: Settings, version: str):
    folder = artifacts.codebook_folder(settings, version)
    if not folder.path.exists():
        known = artifacts.built_versions(settings)
        from semalign.feature_repo.errors import UnknownVersionError

        raise UnknownVersionError(f"unknown codebook version '{version}' (known: {known or 'none'})")
    return folder.load_codebook()


def load_sids(settings: Settings, version: str) -> pd.DataFrame:
    return pd.read_parquet(artifacts.codebook_folder(settings, version).sids_file)


@dataclass
class CodebookOutput:
    version: str
    parent: str | None
    metrics: dict
    churn: dict | None
    reused: bool
    sids: pd.DataFrame


def codebook_stage(settings: Settings, ds: Dataset, split: Split, enc: EncoderOutput, parent: str | None = "latest",
                   method: str | None = None, levels: int | None = None, codes: int | None = None,
                   rep: Reporter | None = None, move_latest: bool = True) -> CodebookOutput:
    """Fits the codebook on the training items' embeddings, assigns every item (cold ones included),
    adds the dedup level, and records churn against the parent's published SIDs."""
    from scipy.optimize import linear_sum_assignment

    from semalign.models.codebook import build_codebook, default_codes, embeddings_hash

    rep = rep or Reporter(quiet=True)
    method = method or settings.codebook_method
    levels = levels or settings.codebook_levels
    fit_items = split.train_items
    codes = codes or settings.codebook_codes or default_codes(len(fit_items))
    parent_version = latest_codebook_version(settings) if parent == "latest" else parent
    parent_cb = load_codebook(settings, parent_version) if parent_version else None
    parent_folder = artifacts.codebook_folder(settings, parent_cb.version) if parent_cb is not None else None
    item_ids = ds.items["item_id"].tolist()
    embeddings, rot = _align_to_parent(settings, parent_folder, item_ids, enc.embeddings)
    data_hash = embeddings_hash(embeddings, item_ids) + "-" + _hash(fit_items.tobytes())
    # same embeddings + same config as the parent: the parent *is* the result; nothing new is written
    want = {"method": method, "levels": levels, "codes": codes, "iters": settings.kmeans_iters,
            "seed": settings.seed, "dim": int(embeddings.shape[1])}
    if parent_cb is not None and parent_cb.data_hash == data_hash and \
            {k: parent_cb.config.get(k) for k in want} == want:
        return CodebookOutput(version=parent_cb.version, parent=parent_cb.parent, metrics=parent_cb.metrics,
                              churn=parent_folder.churn(), reused=True, sids=load_sids(settings, parent_cb.version))
    # fit pairs re-indexed into the fit subset (RQ-VAE's contrastive term)
    pairs = mine_pairs(split.part("train"), settings.pair_window, settings.pair_max_gap_s)
    pos = -np.ones(ds.n_items, dtype=np.int64)
    pos[fit_items] = np.arange(len(fit_items))
    fit_pairs = pos[pairs]
    fit_pairs = fit_pairs[(fit_pairs >= 0).all(1)]
    with rep.stage(f"codebook {method} {levels}x{codes}", levels) as adv:
        cb = build_codebook(embeddings[fit_items], levels=levels, codes=codes, method=method,
                            iters=settings.kmeans_iters, seed=settings.seed, parent=parent_cb, pairs=fit_pairs,
                            data_hash=data_hash, on_level=lambda lvl: adv(1), solve_assignment=linear_sum_assignment)
    sids, cb.metrics = sid_table(cb, item_ids, embeddings, rotated=rot is not None)
    churn = _churn(settings, parent_folder, sids, levels)
    # write into a temp folder, then rename: readers never see a half-written version
    # (an existing folder was built before by a run that later changed LATEST: identical content, kept)
    with atomic.building(artifacts.codebook_folder(settings, cb.version).path, replace=False) as tmp:
        cb.save(tmp)
        sids.to_parquet(artifacts.CodebookFolder(tmp).sids_file, index=False)
        if churn is not None:
            artifacts.write_churn(tmp, churn)
        # what onboarding needs to embed a new item into this codebook's space: the encoder, then the rotation
        artifacts.write_lineage(tmp, enc.version, rot)
    if move_latest:
        artifacts.set_latest(settings, cb.version)
    return CodebookOutput(version=cb.version, parent=cb.parent, metrics=cb.metrics, churn=churn, reused=False,
                          sids=sids)


def _align_to_parent(settings: Settings, parent_folder, item_ids: list[str], embeddings: np.ndarray):
    """(embeddings, rotation or None): a retrained encoder can come out rotated, so its output is rotated onto
    the parent's published space (orthogonal Procrustes on the shared items) when that is not the identity."""
    from semalign.models.kmeans import procrustes

    if parent_folder is None or not parent_folder.sids_file.exists():
        return embeddings, None
    old = load_sids(settings, parent_folder.version).set_index("item_id")["embedding"]
    pos = {iid: i for i, iid in enumerate(item_ids)}
    common = [iid for iid in old.index if iid in pos]
    old_emb = np.stack(old.loc[common].to_numpy()) if common else None
    if old_emb is None or old_emb.shape[1] != embeddings.shape[1] or len(common) < embeddings.shape[1]:
        return embeddings, None
    new_common = embeddings[[pos[i] for i in common]]
    rot = procrustes(new_common, old_emb)
    # unchanged embeddings must stay bit-identical, or a rerun would mint a new version
    if np.array_equal(new_common, old_emb) or np.abs(rot - np.eye(len(rot))).max() <= 1e-4:
        return embeddings, None
    embeddings = (embeddings @ rot).astype(np.float32)
    rows = [pos[i] for i in common]
    if np.allclose(embeddings[rows], old_emb, rtol=0, atol=1e-5):
        # the parent's own encoder output, up to the rotation's float noise: keep the parent's bits, or
        # re-running the champion's input would mint a new version
        embeddings[rows] = old_emb
    return embeddings, rot


def sid_table(cb, item_ids: list[str], embeddings: np.ndarray, rotated: bool) -> tuple[pd.DataFrame, dict]:
    """Every item's SID (dedup level included) and aligned vector, and the codebook's metrics extended with the
    whole catalogue's (cold items included: what serving sees)."""
    from semalign.models.sids import dedup_level

    assigned = cb.assign(embeddings)
    tie = np.argsort(np.argsort(np.array(item_ids, dtype=object), kind="stable"), kind="stable")
    dedup = dedup_level(assigned, tie_order=tie)
    sids = pd.DataFrame({"item_id": item_ids})
    for lvl in range(assigned.shape[1]):
        sids[f"sid_{lvl}"] = assigned[:, lvl]
    sids["sid_dedup"] = dedup
    sids["embedding"] = list(embeddings.astype(np.float32))
    metrics = dict(cb.metrics)
    metrics["rotated_to_parent"] = rotated
    _, counts = np.unique(assigned, axis=0, return_counts=True)
    metrics["catalogue_collision_rate"] = float(counts[counts > 1].sum() / len(assigned))
    metrics["catalogue_collision_rate_after_dedup"] = float(
        len(assigned) - len(np.unique(np.c_[assigned, dedup], axis=0))) / len(assigned)
    metrics["max_dedup"] = int(dedup.max()) if len(dedup) else 0
    return sids, metrics


def _churn(settings: Settings, parent_folder, sids: pd.DataFrame, levels: int) -> dict | None:
    """SID churn of the items the parent also held, overall and per level."""
    from semalign.models.sids import sid_churn

    if parent_folder is None or not parent_folder.sids_file.exists():
        return None
    old = load_sids(settings, parent_folder.version).set_index("item_id")
    cols = [f"sid_{lvl}" for lvl in range(levels)]
    common = [i for i in sids["item_id"] if i in old.index]
    if not common or not all(c in old.columns for c in cols):
        return None
    new = sids.set_index("item_id").loc[common, cols].to_numpy()
    return {"parent": parent_folder.version, "items": len(common), **sid_churn(old.loc[common, cols].to_numpy(), new)}


def item_rows(ds: Dataset, item_ids, holder: str) -> np.ndarray:
    """Row in `ds.items` of each of `item_ids` (those `holder` holds); refuses ids the dataset lacks."""
    rows = pd.Index(ds.items["item_id"]).get_indexer(pd.Index(item_ids))
    if (rows < 0).any():
        missing = pd.Index(item_ids)[rows < 0].tolist()[:5]
        raise InvalidInputError(f"{holder} holds items the dataset {ds.name} lacks ({missing}); nothing was published")
    return rows


def publish_stage(settings: Settings, ds: Dataset, cb: CodebookOutput, enc: EncoderOutput,
                  make_current: bool = True, feats: TowerFeatures | None = None, store=None) -> dict:
    """Publishes a codebook version's SIDs, aligned vectors and text-tower vectors (the ranker reads both) to the
    feature store (a no-op when that exact version is already published). Offline rows are stamped with the
    item's `available_at` where known. Without `feats` the tower features are read (from their cache)."""
    feats = feats or tower_features(settings, ds)
    res = _publish(settings, cb.version, cb.sids, enc.version, make_current, ds, feats, store)
    return {"version": res.version, "items": res.items, "published_now": res.published, "current": res.current,
            "project": settings.feast_project, "online_store": settings.feast_online,
            "repo": str(settings.feature_repo_dir), "wall_s": round(res.wall_s, 2)}


def _publish(settings: Settings, version: str, sids: pd.DataFrame, encoder_version: str | None, make_current: bool,
             ds: Dataset | None = None, feats: TowerFeatures | None = None, store=None, stamp: bool = True):
    """One codebook version's rows to the store: SIDs and aligned vectors, and with the dataset and its tower
    features the text-tower vectors (and, with `stamp`, the offline rows' `available_at`)."""
    from semalign.feature_repo.store import open_store

    codebook = load_codebook(settings, version)
    if store is None or store.levels != codebook.levels:
        store = open_store(settings, levels=codebook.levels)
    avail = content = None
    if ds is not None:
        row_of = item_rows(ds, sids["item_id"], f"codebook {version}")
        if stamp and "available_at" in ds.items:
            avail = ds.items["available_at"].to_numpy()[row_of]
        content = feats.text[row_of]
    return store.publish(codebook, sids["item_id"].tolist(), np.stack(sids["embedding"].to_numpy()),
                         encoder_version=encoder_version, available_at=avail, make_current=make_current,
                         content=content)


def publish_version(settings: Settings, version: str | None = None, data: str | Path | None = None,
                    make_current: bool = True) -> dict:
    """`semalign ids publish`: a built codebook version (default: the latest) to the store, under the refresh lock
    (a refresh publishing and moving the current version meanwhile: wait). With `data`, the items' text-tower
    vectors too (the towers' cache), which the default ranker reads."""
    import json

    from semalign.flows.lock import refresh_lock
    from semalign.flows.pipeline import upstream

    version = version or latest_codebook_version(settings)
    if version is None:
        raise NotFoundError(f"no codebook built under {settings.codebooks_dir}: run `semalign run` first")
    load_codebook(settings, version)   # an unknown version is refused by name before anything else
    sids = load_sids(settings, version)
    lineage_p = settings.codebooks_dir / version / "lineage.json"
    enc_v = json.loads(lineage_p.read_text())["encoder_version"] if lineage_p.exists() else None
    up = upstream(settings, data, through="towers") if data is not None else None
    with refresh_lock(settings, "ids publish"):
        res = _publish(settings, version, sids, enc_v, make_current, up and up.ds, up and up.feats, stamp=False)
    return {"version": res.version, "items": res.items, "published_now": res.published, "current": res.current,
            "wall_s": round(res.wall_s, 3)}


def semantic_ids_job(settings: Settings, data: str | Path | None = None, rep: Reporter | None = None,
                     parent: str | None = "latest", publish: bool = True) -> dict:
    """`semalign codebook build`: the upstream pipeline (ingest -> towers -> encoder -> codebook -> SIDs, `parent`
    as both parents) and the publish; returns a summary."""
    from semalign.flows.pipeline import upstream

    t0 = time.perf_counter()
    rep = rep or Reporter(quiet=True)
    up = upstream(settings, data, rep, encoder_parent=parent, codebook_parent=parent, move_latest=True)
    ds, split, feats, enc, cb = up.ds, up.split, up.feats, up.enc, up.cb
    with rep.stage("publish semantic IDs", None):
        pub = publish_stage(settings, ds, cb, enc, feats=feats) if publish else None
    return {
        "dataset": ds.name, "data": ds.report, "split": split.kind, "cold_items": int(len(split.cold_items)),
        "towers": {"text_model": feats.text_model, "image_model": feats.image_model, "embedded_now": feats.computed},
        "encoder": {"version": enc.version, "reused": enc.reused, **enc.metrics},
        "codebook": {"version": cb.version, "parent": cb.parent, "reused": cb.reused, **cb.metrics, "churn": cb.churn},
        "feature_store": pub,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
