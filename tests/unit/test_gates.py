"""Gates that see more than marginals (validation/suites.py): the label's relation to items and users, the
champion's own performance drift, and codebook health."""
import numpy as np
import pandas as pd

from semalign.models.sids import code_metrics
from semalign.validation.suites import codebook_health, label_relations, performance_drift_gate, relation_gate


def _window(seed: int, n: int = 40_000, shuffle: bool = False) -> pd.DataFrame:
    """Popular items and active users are liked more often: a relation a label shuffle destroys while the
    label rate, volume and popularity stay the same."""
    rng = np.random.default_rng(seed)
    item = np.minimum(rng.zipf(1.6, n), 500) - 1
    user = np.minimum(rng.zipf(1.8, n), 800) - 1
    pop = np.bincount(item, minlength=500)[item]
    act = np.bincount(user, minlength=800)[user]
    p = 0.25 + 0.3 * (np.log1p(pop) / np.log1p(pop).max()) + 0.2 * (np.log1p(act) / np.log1p(act).max())
    label = (rng.random(n) < p).astype(np.int8)
    if shuffle:
        label = rng.permutation(label)
    return pd.DataFrame({"item_idx": item, "user_idx": user, "label": label})


def test_a_label_shuffle_keeps_the_marginals_but_not_the_relation():
    ref = label_relations(_window(0), 500)
    clean = label_relations(_window(1), 500)
    shuffled_window = _window(1, shuffle=True)
    shuffled = label_relations(shuffled_window, 500)
    assert abs(shuffled_window["label"].mean() - _window(1)["label"].mean()) < 1e-12   # same label rate
    assert relation_gate(ref, clean, tol=0.05).passed
    v = relation_gate(ref, shuffled, tol=0.05)
    assert not v.passed and any(c["name"] == "label rate by item quartile" and not c["passed"] for c in v.checks)


def test_performance_drift_holds_for_a_human():
    ref = {"all": {"auc": 0.74}}
    assert performance_drift_gate({"all": {"auc": 0.72}}, ref, tol=0.05).passed
    v = performance_drift_gate({"all": {"auc": 0.61}}, ref, tol=0.05)
    assert not v.passed and "semalign promote" in v.checks[0]["expected"]
    assert performance_drift_gate(None, ref).passed and performance_drift_gate({"all": {"auc": 0.5}}, None).passed


def test_a_collapsed_codebook_is_refused():
    rng = np.random.default_rng(0)
    healthy = rng.integers(0, 16, (1000, 3))
    collapsed = np.c_[rng.integers(0, 2, 1000), rng.integers(0, 16, (1000, 2))]   # level 0: 2 of 16 codes
    assert codebook_health({**code_metrics(healthy, 16, 0.1), "catalogue_collision_rate": 0.1}, 16).passed
    v = codebook_health({**code_metrics(collapsed, 16, 0.1), "catalogue_collision_rate": 0.1}, 16)
    assert not v.passed and {c["name"] for c in v.checks if not c["passed"]} >= {"codes used per level",
                                                                                  "level-0 perplexity / codes"}


def test_the_quality_gate_tells_noise_from_a_worse_model():
    from semalign.validation.suites import quality_gate

    champion = {"all": {"auc": 0.72, "n_events": 900, "n_positive": 450}}
    small = {"all": {"auc": 0.70, "n_events": 900, "n_positive": 450}}       # 0.02 down on 900 events: noise
    assert quality_gate(small, champion, tol=0.005).passed
    big_champ = {"all": {"auc": 0.72, "n_events": 200_000, "n_positive": 100_000}}
    big = {"all": {"auc": 0.70, "n_events": 200_000, "n_positive": 100_000}}  # the same drop on 200k: real
    assert not quality_gate(big, big_champ, tol=0.005).passed
    assert not quality_gate({"all": {"auc": 0.60, "n_events": 900, "n_positive": 450}}, champion).passed


def test_too_few_fresh_events_hold_the_comparison_for_a_human():
    from semalign.validation.suites import quality_gate

    same = {"all": {"auc": 0.72, "n_events": 150, "n_positive": 75}}
    v = quality_gate(same, same, compared_events=150, min_events=200)
    assert not v.passed and v.checks[0]["name"] == "events the champion never trained on"
    assert quality_gate(same, same, compared_events=5000, min_events=200).passed


def test_replayed_days_raise_the_repeat_rate_while_marginals_stay():
    from semalign.validation.suites import repeat_gate, window_profile

    ref = _window(0).drop_duplicates(["user_idx", "item_idx"]).assign(ts=lambda d: np.arange(len(d)))
    clean = _window(1).drop_duplicates(["user_idx", "item_idx"]).assign(ts=lambda d: np.arange(len(d)))
    last = clean[clean["ts"] >= clean["ts"].quantile(0.9)]
    replayed = pd.concat([clean, last.assign(ts=last["ts"] + 86_400)])       # the last tenth loaded twice
    p_ref, p_clean, p_replay = (window_profile(w, 500) for w in (ref, clean, replayed))
    assert abs(replayed["label"].mean() - clean["label"].mean()) < 0.01
    assert p_clean["repeat_pair_rate"] == 0.0 and 0.08 < p_replay["repeat_pair_rate"] < 0.1
    assert repeat_gate(p_ref, p_clean).passed
    v = repeat_gate(p_ref, p_replay, tol=0.02)
    assert not v.passed and v.checks[0]["name"] == "repeated user-item pairs"
    assert repeat_gate({}, p_replay).passed   # a champion from before the profile kept the rate: nothing to judge


def test_a_champion_is_judged_only_on_events_it_never_trained_on(tmp_path, movielens):
    import json

    from semalign.data import event_keys, make_split
    from semalign.flows.ranker_stages import TRAINED_EVENTS, fresh_events

    ds = movielens
    item_ids = ds.items["item_id"].to_numpy()
    old = make_split(ds, seed=0)
    new = make_split(ds, seed=1)           # another holdout over the same events: the champion learned many of them
    champion = tmp_path / "champion"
    champion.mkdir()
    np.save(champion / TRAINED_EVENTS, np.unique(event_keys(old.events[old.events["part"] != "test"])))
    (champion / "vocab.json").write_text(json.dumps(item_ids[old.train_items].tolist()))
    mask = fresh_events(champion, new, item_ids)
    test_new = new.part("test")
    learned = set(map(tuple, old.events[old.events["part"] != "test"][["user_id", "item_id", "ts"]].to_numpy()))
    champion_items = set(item_ids[old.train_items])
    challenger_items = set(item_ids[new.train_items])
    expect = np.array([tuple(r) not in learned and not (r[1] in champion_items and r[1] not in challenger_items)
                       for r in test_new[["user_id", "item_id", "ts"]].to_numpy()])
    assert mask.dtype == bool and len(mask) == len(test_new) and 0 < mask.sum() < len(mask)
    assert (mask == expect).all()
    # an item the challenger holds out as cold but the champion trained on is never compared on
    cold_for_challenger = ~np.isin(test_new["item_idx"].to_numpy(), new.train_items)
    assert not (mask & cold_for_challenger & np.isin(test_new["item_id"].to_numpy(), list(champion_items))).any()
    assert fresh_events(tmp_path, new, item_ids) is None     # a ranker from before the keys were kept
    # the keys are the same in another copy of the data (ids and times, not row positions)
    assert (event_keys(test_new.iloc[::-1]) == event_keys(test_new)[::-1]).all()
