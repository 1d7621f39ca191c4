"""The compact serving profile end to end: `semalign run` with SEMALIGN_SERVING_PROFILE=compact trains a ranker whose
items are their SID codes (variant `sid`, a bounded n-gram table), publishes no float vector online, and serves
exactly the model it measured; a new item is scored from its codes alone."""
import json

import numpy as np
import pandas as pd
import pytest

from conftest import SMALL_REFRESH, write_generic
from conftest import run_cli as _cli

COMPACT = {"SEMALIGN_SERVING_PROFILE": "compact", "SEMALIGN_RANKER_VARIANT": "sid", "SEMALIGN_RANKER_ID_BUCKETS": "60"}


@pytest.fixture(scope="module")
def compact(tmp_path_factory, movielens):
    root = tmp_path_factory.mktemp("compact")
    shop = write_generic(root / "shop", movielens, n_items=300)
    env = {"SEMALIGN_HOME": str(root / "home"), **COMPACT}
    out = json.loads(_cli("run", "--data", str(shop), "--json", env=env).stdout)
    return {"root": root, "shop": shop, "env": env, "run": out}


def _settings(compact):
    from semalign.config import Settings

    env = {**SMALL_REFRESH, **compact["env"]}
    return Settings(**{k[len("SEMALIGN_"):].lower(): v for k, v in env.items()})


def _champion(compact, tmp_path):
    from semalign.deploy.registry import Registry

    reg = Registry(_settings(compact))
    mv = reg.get_version(compact["run"]["model_version"])
    return reg.download_ranker(mv, tmp_path / "champion")


def test_compact_store_holds_codes_and_no_float_vectors(compact):
    from semalign.feature_repo.errors import FeatureStoreError
    from semalign.feature_repo.repo_config import EMB_VIEW
    from semalign.feature_repo.store import SemanticIdStore

    s = _settings(compact)
    store = SemanticIdStore(s)
    ids = pd.read_csv(compact["shop"] / "items.csv")["item_id"].astype(str).tolist()[:30]
    sids = store.semantic_ids(ids)
    assert (sids[["sid_0", "sid_1", "sid_2", "sid_dedup"]].to_numpy() >= 0).all()
    # Feast itself, asked for the vector view's features of those items, holds nothing
    rows = store.fs.get_online_features(features=[f"{EMB_VIEW}:embedding", f"{EMB_VIEW}:content"],
                                        entity_rows=[{"codebook_version": sids["codebook_version"][0], "item_id": i}
                                                     for i in ids]).to_dict()
    assert all(v is None for v in rows["embedding"]) and all(v is None for v in rows["content"])
    with pytest.raises(FeatureStoreError, match="compact profile"):
        store.read_online(ids, sids["codebook_version"][0], 3, with_embedding=True)


def test_served_scores_equal_the_measured_model_and_record_the_profile(compact, tmp_path):
    """The ranker `semalign experiment` builds from the spec (item_tables -> Ranker) scores the test window exactly
    as serving does from the compact store (hashing, codes and dedup levels agree)."""
    from safetensors.torch import load_file

    from semalign.data import load_dataset, settings_split
    from semalign.features import build_frames, item_tables, user_features
    from semalign.flows.ranker_stages import score_test
    from semalign.flows.semantic_ids import load_codebook, load_sids
    from semalign.models.ranker import Ranker, predict
    from semalign.spec import ranker_config

    s = _settings(compact)
    folder = _champion(compact, tmp_path)
    meta = json.loads((folder / "ranker.json").read_text())
    assert meta["serving_profile"] == "compact" and meta["config"]["variant"] == "sid"
    assert meta["config"]["id_buckets"] == 60 and meta["bytes_per_item"] <= 8
    ds = load_dataset(compact["shop"])
    split = settings_split(ds, s)
    cfg = ranker_config(s)
    sids = load_sids(s, meta["codebook_version"]).set_index("item_id").loc[ds.items["item_id"].astype(str)]
    codes = sids[["sid_0", "sid_1", "sid_2"]].to_numpy()
    tables = item_tables(ds, split, None, None, codes, load_codebook(s, meta["codebook_version"]).codes,
                         sids["sid_dedup"].to_numpy(), cfg,
                         [c.numpy() for c in load_codebook(s, meta["codebook_version"]).centroids])
    frames = build_frames(split, user_features(split, ds.n_users), s.hist_len)
    model = Ranker(cfg, tables, frames["test"].user_feats.shape[1])
    model.load_state_dict(load_file(str(folder / "ranker.safetensors")), strict=False)
    measured = predict(model, frames["test"])
    served = score_test(s, ds, split, folder)
    np.testing.assert_allclose(served, measured, rtol=1e-5, atol=1e-6)


def test_a_new_item_is_scored_from_its_codes_alone(compact, tmp_path):
    from semalign.deploy.scoring import RankerScorer
    from semalign.feature_repo.store import open_store

    s = _settings(compact)
    store = open_store(s)  # with the item embedder: content -> encoder -> codes
    new = pd.DataFrame({"item_id": ["brand-new-1"], "text": ["A quiet documentary about lighthouse keepers"]})
    out = store.onboard(new)
    assert bool(out["onboarded"].iloc[0])
    from semalign.feature_repo.repo_config import EMB_VIEW

    held = store.fs.get_online_features(features=[f"{EMB_VIEW}:embedding"], entity_rows=[
        {"codebook_version": out["codebook_version"][0], "item_id": "brand-new-1"}]).to_dict()
    assert held["embedding"] == [None]   # onboarding under the compact profile writes codes, no vector
    scorer = RankerScorer(_champion(compact, tmp_path), s, store=store)
    users = pd.read_csv(compact["shop"] / "interactions.csv")["user_id"].astype(str).unique()[:3].tolist()
    p = scorer.score(users, ["brand-new-1"] * 3)
    assert p.shape == (3,) and np.isfinite(p).all()
    # the same codes sent with the request (no store row, no vector) give the same score
    codes = out[["sid_0", "sid_1", "sid_2", "sid_dedup"]].to_numpy()[0]
    feats, hists, _ = scorer.user_rows(users)
    again = scorer.score_rows(feats, ["other-new"] * 3, hists, extra={"other-new": (codes, None, None)})
    np.testing.assert_allclose(again, p, rtol=1e-6)
