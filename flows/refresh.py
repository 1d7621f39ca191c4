"""The `refresh` flow (design section 6): ingest + validate -> encoder -> codebook (champion's as parent) ->
publish SIDs -> train ranker -> evaluate against the champion on the same window -> drift / quality / churn
gates -> log to MLflow -> promote. One Prefect task per stage.

Re-running on unchanged input trains nothing and publishes nothing: the encoder and codebook stages are keyed
by input hashes, a published codebook version is immutable, and a ranker whose input key is already registered
is reused with its recorded verdict. A refresh holds a lock so two runs never publish at once.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semalign import atomic, state
from semalign.config import Settings
from semalign.errors import ConflictError, InvalidInputError, SemalignError
from semalign.checkpoints import checkpoint
from semalign.progress import Reporter


class RefreshError(SemalignError, RuntimeError):
    pass


class InputValidationError(RefreshError, InvalidInputError):
    http_status = 422


class RefreshLockedError(RefreshError, ConflictError):
    http_status = 409


# ---------------------------------------------------------------- lock

@contextmanager
def refresh_lock(settings: Settings):
    """One refresh per project at a time. A lock left by a dead process on this host is taken over."""
    import sqlalchemy as sa

    eng = state.engine(settings.resolved_state_url())
    name = f"refresh:{settings.feast_project}"
    me = f"{socket.gethostname()}:{os.getpid()}"
    with eng.begin() as c:
        row = c.execute(sa.select(state.locks).where(state.locks.c.name == name)).first()
        if row is not None:
            host, _, pid = row.owner.rpartition(":")
            alive = True
            if host == socket.gethostname():
                try:
                    os.kill(int(pid), 0)
                except (ProcessLookupError, ValueError):
                    alive = False
                except PermissionError:
                    alive = True
            if alive:
                raise RefreshLockedError(f"another refresh of project '{settings.feast_project}' is running "
                                         f"({row.owner}, since {time.ctime(row.acquired_at)}); try again later")
            c.execute(state.locks.delete().where(state.locks.c.name == name))
        c.execute(state.locks.insert().values(name=name, owner=me, acquired_at=time.time()))
    try:
        yield
    finally:
        with eng.begin() as c:
            c.execute(state.locks.delete().where(state.locks.c.name == name, state.locks.c.owner == me))


def remove_dead_temporaries(settings: Settings) -> list[str]:
    """Temp folders (`.<name>.tmp-<pid>`) that killed runs left under encoders/, codebooks/ and rankers/:
    nothing reads them; they only take disk. Those of live processes (a server downloading a ranker) stay."""
    import shutil

    removed = []
    for sub in (settings.encoders_dir, settings.codebooks_dir, settings.home / "rankers"):
        for tmp in sub.glob(".*.tmp-*") if sub.exists() else []:
            pid = tmp.name.rsplit("-", 1)[-1]
            try:
                os.kill(int(pid), 0)
                continue
            except (ProcessLookupError, ValueError):
                pass
            except PermissionError:
                continue
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


# ---------------------------------------------------------------- stages (plain functions; the flow wraps them)

def ingest_and_validate(settings: Settings, data):
    from semalign.flows.semantic_ids import ingest
    from semalign.validation.suites import input_suite

    ds = ingest(settings, data)
    verdict = input_suite(ds.items, ds.interactions)
    if not verdict.passed:
        raise InputValidationError(f"input validation failed, nothing was published: {verdict.summary()}")
    return ds, verdict


def champion_lineage(registry) -> dict:
    from semalign.deploy.registry import CHAMPION

    mv = registry.version_by_alias(CHAMPION)
    if mv is None:
        return {}
    return {"version": str(mv.version), "run_id": mv.run_id, **{k: mv.tags.get(k) for k in
            ("codebook_version", "encoder_version", "data_hash", "input_key")}}


@dataclass
class RankerOut:
    input_key: str
    folder: Path
    registered: str | None       # a version already registered for these inputs
    fit: dict


def ranker_input_key(settings: Settings, ds, cb_version: str) -> str:
    from dataclasses import asdict

    from semalign.flows.semantic_ids import _hash
    from semalign.spec import ranker_config

    return "rk-" + _hash(ds.content_hash(), cb_version, settings.split, settings.seed, settings.cold_item_share,
                         settings.val_cold_item_share, settings.hist_len, asdict(ranker_config(settings)))


def train_ranker_stage(settings: Settings, ds, split, cb, enc, feats, registry, rep: Reporter) -> RankerOut:
    from semalign.deploy.scoring import save_ranker
    from semalign.features import N_USER_FEATS, build_frames, item_tables, user_features
    from semalign.flows.semantic_ids import load_codebook
    from semalign.models.ranker import train_ranker
    from semalign.spec import ranker_config

    key = ranker_input_key(settings, ds, cb.version)
    folder = settings.home / "rankers" / key
    mv = registry.version_by_input(key)
    if mv is not None:
        return RankerOut(key, folder, str(mv.version), {"reused": True})
    meta_file = folder / "ranker.json"   # a run that stopped after training (the folder lands whole, by rename)
    if meta_file.exists():
        import json

        meta = json.loads(meta_file.read_text())
        if meta.get("input_key") == key:
            return RankerOut(key, folder, None, {"reused": True, "best_epoch": meta.get("best_epoch"),
                                                 "val_auc": meta.get("val_auc")})
    codebook = load_codebook(settings, cb.version)
    sid_cols = [f"sid_{lvl}" for lvl in range(codebook.levels)]
    codes = cb.sids[sid_cols].to_numpy()
    aligned = np.stack(cb.sids["embedding"].to_numpy()).astype(np.float32)
    seen = split.train_items
    cfg = ranker_config(settings)
    # the text-tower vectors the store serves beside the aligned ones (`content` of the embedding view)
    tables = item_tables(ds, split, aligned, feats.text if cfg.keep_raw_content else None, codes, codebook.codes)
    frames = build_frames(split, user_features(split, ds.n_users), settings.hist_len)
    with rep.stage("ranker", cfg.max_epochs) as adv:
        res = train_ranker(cfg, tables, frames["train"], frames["val"], settings.resolved_device(),
                           on_epoch=lambda r: adv(1, val_auc=f"{r['val_auc']:.4f}"))
    train = split.part("train")
    meta = {"codebook_version": cb.version, "encoder_version": enc.version, "levels": codebook.levels,
            "n_codes": codebook.codes, "content_dim": int(aligned.shape[1]), "n_user_feats": N_USER_FEATS,
            "raw_dim": int(feats.text.shape[1]) if cfg.keep_raw_content else 0,
            "label_prior": float(train["label"].mean()), "hist_len": settings.hist_len,
            "feast_project": settings.feast_project, "data_hash": ds.content_hash(), "input_key": key,
            "best_epoch": res.best_epoch, "val_auc": res.best_val_auc}
    with atomic.building(folder) as tmp:  # a stopped run's folder lands whole or not at all
        save_ranker(res.model, tmp, meta, ds.items["item_id"].iloc[seen].tolist())
    return RankerOut(key, folder, None, {"reused": False, "best_epoch": res.best_epoch, "val_auc": res.best_val_auc,
                                         "train_samples_per_s": res.samples_per_s})


def publish_users(settings: Settings, ds, split) -> int:
    """Each user's training-window positives (most recent last) and smoothed positive rate, for serving."""
    from semalign.feature_repo.store import SemanticIdStore
    from semalign.features import user_table

    return SemanticIdStore(settings).publish_users(user_table(ds, split, settings.hist_len), batch=ds.content_hash()[:16])


def evaluate(settings: Settings, ds, split, ranker_folder: Path, onboard_missing: bool = False) -> dict:
    """AUC / GAUC per item bucket on the test window, scored through the serving path: features from the store,
    pinned to the ranker's codebook version; histories are the leakage-free ones the ranker trained with."""
    from semalign.data import ALL_BUCKETS, item_buckets, user_histories
    from semalign.deploy.scoring import RankerScorer
    from semalign.feature_repo.store import SemanticIdStore
    from semalign.features import user_features
    from semalign.models.metrics import metric_set

    scorer = RankerScorer(ranker_folder, settings)
    test = split.part("test")
    item_ids = ds.items["item_id"].to_numpy()
    cands = item_ids[test["item_idx"].to_numpy()].tolist()
    if onboard_missing:  # the champion serves catalogue items it never saw by onboarding them into its version
        store: SemanticIdStore = scorer.store
        _, found, _, _ = store.read_online(sorted(set(cands)), scorer.codebook_version, scorer.levels)
        missing = [i for i, f in zip(sorted(set(cands)), found) if not f]
        if missing:
            rows = ds.items.set_index("item_id").loc[missing].reset_index()
            store.onboard(rows[[c for c in ("item_id", "text", "image_path") if c in rows]], version=scorer.codebook_version)
    hist, _ = user_histories(test, split.part("train"), settings.hist_len)
    histories = [[item_ids[r - 1] for r in row if r > 0] for row in hist]
    ufeat = user_features(split, ds.n_users)[test["user_idx"].to_numpy()]
    p = scorer.score_rows(ufeat, cands, histories)
    y = test["label"].to_numpy()
    users = test["user_idx"].to_numpy()
    buckets = item_buckets(split.train_counts)[test["item_idx"].to_numpy()]
    out = {}
    for b in ALL_BUCKETS:
        sel = np.ones(len(y), bool) if b == "all" else buckets == b
        if sel.sum() and len(np.unique(y[sel])) == 2:
            ms = metric_set(y[sel], p[sel], users[sel])
            out[b] = {"auc": float(ms["auc"]), "gauc": float(ms["gauc"]), "n_events": int(sel.sum())}
    return out


def _drift_plot(path: Path, reference: dict, profile: dict) -> None:
    """Reference window vs new window: item popularity bins, label rate, first SID level's code usage."""
    import matplotlib.pyplot as plt

    panels = [("item popularity (log2 bins)", reference["pop_weights"], profile["pop_weights"])]
    first = next(iter(sorted(reference.get("sid_weights", {}))), None)
    if first and first in profile.get("sid_weights", {}):
        k = min(len(reference["sid_weights"][first]), len(profile["sid_weights"][first]))
        panels.append((f"{first} code usage", reference["sid_weights"][first][:k], profile["sid_weights"][first][:k]))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3))
    for ax, (title, ref, new) in zip(axes, panels):
        xs = np.arange(len(ref))
        ax.bar(xs - 0.2, ref, 0.4, label="champion window")
        ax.bar(xs + 0.2, new, 0.4, label="new window")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    axes[-1].bar(["champion", "new"], [reference["label_rate"], profile["label_rate"]], color=["C0", "C1"])
    axes[-1].set_title("label rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _prefect_artifacts(summary: dict) -> None:
    """The refresh's verdict and AUC table as Prefect artifacts (shown in the Prefect UI); best effort."""
    try:
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        v = summary.get("verdict") or {}
        create_markdown_artifact(key="refresh-verdict", description="semalign refresh verdict", markdown=(
            f"**model version {summary.get('model_version')}**, codebook `{summary['codebook']['version']}`: "
            f"{'promoted' if summary.get('promoted') else 'not promoted'}\n\n{v.get('summary', '')}"))
        ev = summary.get("evaluation") or {}
        rows = [{"bucket": b, "challenger_auc": round(m["auc"], 4),
                 "champion_auc": round(((ev.get("champion") or {}).get(b) or {}).get("auc", float("nan")), 4)}
                for b, m in (ev.get("challenger") or {}).items()]
        if rows:
            create_table_artifact(key="refresh-auc", table=rows, description="AUC per item bucket, test window")
    except Exception:
        pass


def _plots(folder: Path, challenger: dict, champion: dict | None, cb_metrics: dict) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from semalign.data import ALL_BUCKETS

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    buckets = [b for b in ALL_BUCKETS if b in challenger]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = np.arange(len(buckets))
    ax.bar(xs - 0.2, [challenger[b]["auc"] for b in buckets], 0.4, label="challenger")
    if champion:
        ax.bar(xs + 0.2, [champion.get(b, {}).get("auc", np.nan) for b in buckets], 0.4, label="champion")
    ax.set_xticks(xs, buckets)
    ax.set_ylim(0.5, max(0.8, max(challenger[b]["auc"] for b in buckets) + 0.02))
    ax.set_ylabel("AUC (test window)")
    ax.set_title("AUC per item bucket")
    ax.legend()
    fig.tight_layout()
    out["auc_per_bucket.png"] = folder / "auc_per_bucket.png"
    fig.savefig(out["auc_per_bucket.png"], dpi=110)
    plt.close(fig)
    util = cb_metrics.get("utilisation") or cb_metrics.get("utilization")
    if util:
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.bar(range(len(util)), util)
        ax.set_xlabel("level")
        ax.set_ylabel("share of codes used")
        ax.set_ylim(0, 1.05)
        ax.set_title("Codebook utilisation")
        fig.tight_layout()
        out["codebook_utilisation.png"] = folder / "codebook_utilisation.png"
        fig.savefig(out["codebook_utilisation.png"], dpi=110)
        plt.close(fig)
    return out


# ---------------------------------------------------------------- the flow

def _tasks():
    """Prefect task wrappers, built lazily so importing this module stays cheap."""
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    def t(fn, name, retries=0):
        return task(fn, name=name, retries=retries, retry_delay_seconds=2, cache_policy=NO_CACHE)

    from semalign.flows.semantic_ids import codebook_stage, encoder_stage, publish_stage, tower_features

    return {
        "ingest": t(ingest_and_validate, "ingest + validate"),
        "towers": t(tower_features, "tower features"),
        "encoder": t(encoder_stage, "train encoder"),
        "codebook": t(codebook_stage, "build codebook"),
        "publish": t(publish_stage, "publish semantic IDs", retries=2),
        "users": t(publish_users, "publish user features", retries=2),
        "ranker": t(train_ranker_stage, "train ranker"),
        "evaluate": t(evaluate, "evaluate"),
    }


def refresh_job(settings: Settings, data=None, rep: Reporter | None = None) -> dict:
    """The body of the `refresh` flow. Returns a summary (what was built, reused, the verdict, the champion)."""
    from dataclasses import asdict

    from semalign.data import settings_split
    from semalign.deploy.registry import Registry
    from semalign.spec import ranker_config
    from semalign.validation.suites import Verdict, churn_gate, drift_suite, quality_gate, window_profile

    rep = rep or Reporter(quiet=True)
    T = _tasks()
    t0 = time.perf_counter()
    at = _Stage()
    with at, refresh_lock(settings):
        remove_dead_temporaries(settings)  # under the lock: no other refresh is writing them
        at("registry lookup")
        registry = Registry(settings)
        champ = champion_lineage(registry)
        at.champion = champ.get("version")
        ds, input_verdict = at.run("ingest", T["ingest"], settings, data)
        split = settings_split(ds, settings)
        feats = at.run("towers", T["towers"], settings, ds, rep)
        enc = at.run("encoder", T["encoder"], settings, ds, split, feats, rep, parent=champ.get("encoder_version"),
                     move_latest=True)
        cb = at.run("codebook", T["codebook"], settings, ds, split, enc, parent=champ.get("codebook_version"), rep=rep,
                    move_latest=True)
        pub = at.run("publish", T["publish"], settings, ds, cb, enc, make_current=not champ, feats=feats)  # readers move at promotion
        at.run("users", T["users"], settings, ds, split)
        rk = at.run("ranker", T["ranker"], settings, ds, split, cb, enc, feats, registry, rep)
        summary = {"dataset": ds.name, "data": ds.report, "input_validation": input_verdict.as_dict(),
                   "encoder": {"version": enc.version, "reused": enc.reused, "parent": champ.get("encoder_version"),
                               **{k: v for k, v in enc.metrics.items() if k.startswith("hit@")}},
                   "codebook": {"version": cb.version, "parent": cb.parent, "reused": cb.reused, "churn": cb.churn},
                   "feature_store": pub, "ranker": {"input_key": rk.input_key, **rk.fit}}
        if rk.registered is not None:  # these exact inputs were refreshed before: keep that outcome
            mv = registry.get_version(rk.registered)
            passed = mv.tags.get("gate") == "passed"
            summary.update(model_version=rk.registered, promoted=False, verdict={"passed": passed, "reused": True},
                           note="unchanged input: nothing retrained, published or promoted")
            if passed and _interrupted_before_promotion(registry, mv, champ.get("version")):
                at("promote")  # a run on these inputs passed its gates and died before promoting: finish it
                if not any(h["subject"].endswith(f"/{mv.version}") for h in registry.history(actions=("gate",),
                                                                                               limit=10_000)):
                    verdict = registry.run_artifact_json(mv.run_id, "validation_report.json") or {}
                    registry.record_gate(str(mv.version), {**verdict, "passed": True})  # it died before this row
                summary["promoted"] = _promote(settings, registry, mv, f"resumed: v{mv.version} passed its gates "
                                               "in a refresh that stopped before promotion")
                summary["note"] = "finished the promotion of an interrupted refresh on the same input"
            elif champ.get("version") == str(mv.version):  # finishes a promotion a crash cut after the alias move
                summary["promoted"] = registry.promote(str(mv.version), reason="re-run")["moved"]
            summary["champion"] = champion_lineage(registry).get("version")
            summary["wall_s"] = round(time.perf_counter() - t0, 2)
            return summary

        at("evaluate")
        challenger = T["evaluate"](settings, ds, split, rk.folder)
        champion_metrics, champ_dir = None, None
        if champ:
            champ_dir = registry.download_ranker(registry.get_version(champ["version"]),
                                                 settings.home / "rankers" / (champ.get("input_key") or f"v{champ['version']}"))
            champion_metrics = T["evaluate"](settings, ds, split, champ_dir, onboard_missing=True)
        at.done("evaluate")
        at("gates")
        train = split.part("train")
        emb = np.stack(cb.sids["embedding"].to_numpy())
        profile = window_profile(train, ds.n_items, cb.sids, emb)
        verdicts, reference = [], None
        if champ:
            reference = registry.run_artifact_json(champ["run_id"], "reference_profile.json")
            if reference is not None:
                verdicts.append(drift_suite(reference, train, ds.n_items, cb.sids, emb,
                                            label_rate_tol=settings.drift_label_rate_tolerance,
                                            volume_ratio=(settings.drift_volume_min_ratio, settings.drift_volume_max_ratio),
                                            kl_max=settings.drift_popularity_kl, sid_kl_max=settings.drift_sid_kl))
            verdicts.append(quality_gate(challenger, champion_metrics, settings.gate_auc_tolerance,
                                         settings.gate_cold_auc_tolerance))
            verdicts.append(churn_gate(cb.churn if cb.churn and cb.churn.get("parent") == champ.get("codebook_version")
                                       else None, settings.gate_max_level0_churn))
        else:
            verdicts.append(Verdict("first model"))  # nothing to compare against: the first ranker is promoted
        passed = all(v.passed for v in verdicts)
        verdict = {"passed": passed, "gates": [v.as_dict() for v in verdicts],
                   "summary": "; ".join(v.summary() for v in verdicts)}
        run_dir = settings.home / "runs" / rk.input_key
        _plots(run_dir / "plots", challenger, champion_metrics, cb.metrics)
        if champ and reference is not None:
            _drift_plot(run_dir / "plots" / "drift.png", reference, profile)
        def key(b):  # MLflow metric names allow no '+'
            return b.replace("+", "plus")

        metrics = {f"challenger_{m}_{key(b)}": v[m] for b, v in challenger.items() for m in ("auc", "gauc")}
        if champion_metrics:
            metrics.update({f"champion_{m}_{key(b)}": v[m] for b, v in champion_metrics.items() for m in ("auc", "gauc")})
        metrics.update({f"encoder_{k.replace('@', '_at_')}_{k2}": v2 for k, v in enc.metrics.items()
                        if k.startswith("hit@") for k2, v2 in v.items()})
        if cb.churn:
            metrics["sid_churn"] = cb.churn["churn"]
            metrics.update({f"sid_churn_level{i}": c for i, c in enumerate(cb.churn["per_level"])})
        for k in ("catalogue_collision_rate", "relative_recon_error"):
            if isinstance(cb.metrics.get(k), (int, float)):
                metrics[f"codebook_{k}"] = cb.metrics[k]
        tags = {"codebook_version": cb.version, "encoder_version": enc.version, "data_hash": ds.content_hash(),
                "gate": "passed" if passed else "failed", "dataset": ds.name,
                "feature_service": f"{settings.model_name.replace('-', '_')}_{rk.input_key}"}
        params = {"split": settings.split, "seed": settings.seed, "cold_item_share": settings.cold_item_share,
                  "ranker_epochs": settings.ranker_epochs, "hist_len": settings.hist_len,
                  "codebook_method": settings.codebook_method, "codebook_levels": settings.codebook_levels,
                  "encoder_epochs": settings.encoder_epochs, "text_model": feats.text_model,
                  "image_model": feats.image_model, "champion_before": champ.get("version"),
                  "feast_project": settings.feast_project, "online_store": settings.feast_online,
                  "val_cold_item_share": settings.val_cold_item_share,
                  # the ranker specification the experiment measures and this run trained
                  **{f"ranker.{k}": v for k, v in asdict(ranker_config(settings)).items()}}
        artifacts = {"plots": run_dir / "plots", "encoder": settings.encoders_dir / enc.version,
                     "codebook": settings.codebooks_dir / cb.version}
        json_art = {"validation_report.json": {"input": input_verdict.as_dict(), **verdict},
                    "reference_profile.json": profile,
                    "evaluation.json": {"challenger": challenger, "champion": champion_metrics}}
        at("log to MLflow")
        with rep.stage("log to MLflow", None):
            run_id, version = registry.log_refresh(params=params, metrics=metrics, tags=tags, ranker_dir=rk.folder,
                                                   artifacts=artifacts, json_artifacts=json_art, input_key=rk.input_key)
        registry.record_gate(version, verdict)
        checkpoint("refresh.before_promote")
        promoted = False
        if passed:
            at("promote")
            promoted = _promote(settings, registry, registry.get_version(version),
                                "first model" if not champ else f"refresh passed gates: {verdict['summary']}")
        summary.update(model_version=version, run_id=run_id, verdict=verdict, promoted=promoted,
                       evaluation={"challenger": challenger, "champion": champion_metrics},
                       champion=champion_lineage(registry).get("version"))
        summary["wall_s"] = round(time.perf_counter() - t0, 2)
        at("done")
        _prefect_artifacts(summary)
        return summary


class _Stage:
    """Which stage a refresh is in, so a failure says where it stopped and whether anything moved. The end of
    each stage is a checkpoint (a kill point for the fault-injection tests)."""

    def __init__(self):
        self.name, self.champion = "take the refresh lock", None

    def __call__(self, name: str) -> None:
        self.name = name

    def done(self, name: str) -> None:
        checkpoint(f"refresh.after_{name.replace(' ', '_')}")

    def run(self, name: str, fn, *args, **kwargs):
        self.name = name
        out = fn(*args, **kwargs)
        self.done(name)
        return out

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, RefreshError) or not isinstance(err, Exception):
            return False
        champ = f"champion v{self.champion}" if self.champion else "the champion"
        if self.name in ("promote", "done"):
            after = ("promotion may be partly done; `semalign status` shows where the champion and the current "
                     "codebook stand and re-running the refresh finishes it")
        else:
            after = f"nothing was promoted ({champ} and the semantic IDs it serves are unchanged)"
        raise RefreshError(f"refresh failed at stage '{self.name}': {type(err).__name__}: "
                           f"{_first_line(err)}; {after}") from err


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else repr(err))[:500]


def _promote(settings: Settings, registry, mv, reason: str) -> bool:
    """The feature service for the new champion's codebook first (so nothing points at a missing service), then
    the alias and the store's current pointer."""
    from semalign.feature_repo.store import SemanticIdStore

    SemanticIdStore(settings).register_ranker_service(mv.tags["feature_service"], mv.tags["codebook_version"],
                                                      tags={"model": settings.model_name, "model_version": str(mv.version)})
    checkpoint("refresh.after_feature_service")
    return bool(registry.promote(str(mv.version), reason=reason)["moved"])


def _interrupted_before_promotion(registry, mv, champion: str | None) -> bool:
    """True when `mv` passed its gates against the current champion but was never champion (no promotion or
    rollback ever named it): its refresh stopped between recording the verdict and moving the alias."""
    if champion == str(mv.version):
        return False
    named = registry.history(actions=("promote", "rollback"), limit=10_000)
    if any(str(mv.version) in (h["to_value"], h["from_value"]) for h in named):
        return False
    before = registry.client.get_run(mv.run_id).data.params.get("champion_before")
    return before == str(champion)  # else its gates compared it with another champion: not valid today


def run_refresh(settings: Settings, data=None, rep: Reporter | None = None) -> dict:
    """`semalign run`: the refresh flow in-process (Prefect's ephemeral API under SEMALIGN_HOME unless a Prefect
    API is configured), with the progress shown here."""
    os.environ.setdefault("PREFECT_HOME", str((settings.home / "prefect").resolve()))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    # errors reach the user once, from the CLI; set PREFECT_LOGGING_LEVEL to see Prefect's own logs
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from prefect import flow
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    @flow(name="refresh", description="Refresh encoder, codebook, semantic IDs and ranker; promote behind gates.")
    def refresh_inprocess() -> dict:
        return refresh_job(settings, data, rep)

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        try:
            return refresh_inprocess()
        except RefreshError:
            raise
        except Exception as e:  # the orchestrator itself (its database, its server) failed around the flow
            raise RefreshError(f"the refresh flow could not run: {type(e).__name__}: {_first_line(e)}; "
                               "nothing was promoted") from e
