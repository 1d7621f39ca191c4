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


def _scored(seed: int, n_users: int = 400, per_user: int = 30, worse_by: float = 0.0):
    """Events of `n_users` users with labels, a champion's scores and a challenger's: the same model with its own
    noise (two trainings of one recipe: each better for some users, worse for others), less informative by
    `worse_by` (weight of extra noise)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    signal = rng.standard_normal(len(users)) + 0.5 * rng.standard_normal(n_users)[users]
    y = (signal + rng.standard_normal(len(users)) > 0).astype(np.int8)
    per_user = lambda: np.exp(0.7 * rng.standard_normal(n_users))[users]  # noqa: E731
    champion = signal + 0.6 * per_user() * rng.standard_normal(len(users))
    challenger = signal + 0.6 * per_user() * rng.standard_normal(len(users)) + worse_by * rng.standard_normal(len(users))
    return y, challenger, champion, users


def test_the_quality_gate_decides_on_a_paired_interval_over_users():
    from semalign.validation.suites import paired_comparison, quality_gate

    y, new, old, users = _scored(0)
    every = {"all": np.ones(len(y), bool)}
    same = paired_comparison(y, new, old, users, every, resamples=200, seed=0)
    diff, low, high = same["all"]["auc"]
    assert low < diff < high and same["all"]["users"] == 400 and same["all"]["n_events"] == len(y)
    assert same == paired_comparison(y, new, old, users, every, resamples=200, seed=0)   # seeded: the same interval
    v = quality_gate(same, margin=0.01)
    assert v.passed and v.checks[0]["interval"] == [low, high]
    assert f"[{low:+.4f}, {high:+.4f}]" in v.checks[0]["expected"] and "over 400 users" in v.checks[0]["expected"]
    assert f"[{low:+.4f}, {high:+.4f}]" in v.summary()           # the verdict's one line shows it when it passes
    y, new, old, users = _scored(1, worse_by=1.5)
    worse = paired_comparison(y, new, old, users, every, resamples=200, seed=0)
    assert worse["all"]["auc"][2] < -0.01                      # the whole interval lies below the margin
    v = quality_gate(worse, margin=0.01)
    assert not v.passed and v.failed()[0]["name"] == "AUC all: challenger - champion"
    assert quality_gate(worse, margin=0.5).passed               # a margin as wide as the loss lets it through
    # no interval for the whole window (nothing scored by both): nothing can be judged, so nothing passes
    assert not quality_gate({}, margin=0.01).passed and not quality_gate(None).passed


def test_the_interval_counts_users_not_events():
    """One user's events move together: a window of few users with many events each gives a wider interval than
    the same number of events spread over many users."""
    from semalign.validation.suites import paired_comparison

    y, new, old, users = _scored(2, n_users=40, per_user=300)
    few = paired_comparison(y, new, old, users, {"all": np.ones(len(y), bool)}, resamples=200, seed=0)["all"]["auc"]
    y, new, old, users = _scored(2, n_users=2000, per_user=6)
    many = paired_comparison(y, new, old, users, {"all": np.ones(len(y), bool)}, resamples=200, seed=0)["all"]["auc"]
    assert few[2] - few[1] > many[2] - many[1]


def test_too_few_fresh_events_hold_the_comparison_for_a_human():
    from semalign.validation.suites import quality_gate

    same = {"all": {"auc": [0.0, -0.004, 0.004], "gauc": [0.0, -0.004, 0.004], "users": 30, "resamples": 200,
                    "seed": 0, "level": 0.95}}
    v = quality_gate(same, compared_events=150, min_events=200)
    assert not v.passed and v.checks[0]["name"] == "events the champion never trained on"
    assert quality_gate(same, compared_events=5000, min_events=200).passed


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


def _people(seed: int, n_users: int = 300, n_items: int = 400, topics: int = 20):
    """Items in topics (embeddings near their topic's centre) and users who keep to two favourite topics and to
    their own activity, their events in sessions of one topic: behaviour pairs are coherent and each user is
    recognisable by taste. The catalogue and the people are the same in every window (`seed` draws the sessions)."""
    fixed = np.random.default_rng(0)
    topic = fixed.integers(0, topics, n_items)
    emb = (fixed.standard_normal((topics, 16))[topic] + 0.5 * fixed.standard_normal((n_items, 16))).astype(np.float32)
    by_topic = [np.flatnonzero(topic == t) for t in range(topics)]
    fav, sessions = fixed.integers(0, topics, (n_users, 2)), fixed.integers(2, 12, n_users)
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for s in range(sessions[u] + rng.integers(0, 2)):
            t = fav[u, rng.integers(0, 2)]
            for j, i in enumerate(rng.choice(by_topic[t], 5)):
                rows.append((f"u{u}", f"i{i}", 86_400 * (s * 2) + 60 * j + seed * 10_000_000, 1))
    ev = pd.DataFrame(rows, columns=["user_id", "item_id", "ts", "label"])
    ev["item_idx"] = ev["item_id"].str[1:].astype(int)
    ev["user_idx"] = ev["user_id"].str[1:].astype(int)
    return ev.sort_values(["ts", "user_idx"], kind="stable").reset_index(drop=True), emb


def _user_side(ev, emb, reference):
    from semalign.data import mine_pairs
    from semalign.models.encoder import hit_at_k
    from semalign.validation.suites import pair_coherence, user_continuity

    item_ids = np.array([f"i{i}" for i in range(len(emb))])
    return {"pairs": pair_coherence(emb, mine_pairs(ev, 3, 7 * 86_400), hit_at_k),
            "continuity": user_continuity(reference["user_sample"], ev, emb, item_ids)}


def test_the_user_gate_sees_a_broken_user_join_that_keeps_every_marginal():
    from semalign.data import mine_pairs
    from semalign.models.encoder import hit_at_k
    from semalign.validation.suites import pair_coherence, user_gate, user_sample

    past, emb = _people(0)
    reference = {"user_sample": user_sample(past), "pairs": pair_coherence(emb, mine_pairs(past, 3, 7 * 86_400), hit_at_k)}
    assert len(reference["user_sample"]["user_id"]) == 300
    now, _ = _people(1)                                   # the next window: the same people, new sessions
    clean = user_gate(reference, _user_side(now, emb, reference))
    assert clean.passed and {c["name"] for c in clean.checks} == {
        "behaviour pairs' Hit@30 under the champion's encoder, above chance", "users recognised from their past"}
    rng = np.random.default_rng(3)
    # user ids permuted across events: label rate, volume, item popularity and each user's activity unchanged
    shuffled = now.assign(user_id=rng.permutation(now["user_id"].to_numpy()))
    shuffled["user_idx"] = shuffled["user_id"].str[1:].astype(int)
    assert (shuffled["user_id"].value_counts().sort_index() == now["user_id"].value_counts().sort_index()).all()
    v = user_gate(reference, _user_side(shuffled, emb, reference))
    assert {c["name"] for c in v.failed()} == {c["name"] for c in clean.checks}
    rec, was = (next(c for c in g.checks if c["name"] == "users recognised from their past") for g in (v, clean))
    assert abs(rec["observed"] - 0.5) < 0.1 and rec["activity"] == was["activity"] > 0.9   # strangers, as active
    # ids mapped to other users (a wrong key table): every user's sessions intact, but they are someone else's
    ids = now["user_id"].unique()
    remapped = now.assign(user_id=now["user_id"].map(dict(zip(ids, rng.permutation(ids)))))
    v = user_gate(reference, _user_side(remapped, emb, reference))
    assert [c["name"] for c in v.failed()] == ["users recognised from their past"]
    # item texts swapped between items: the champion's encoder embeds each item from another item's content
    swapped = emb[rng.permutation(len(emb))]
    v = user_gate(reference, _user_side(now, swapped, reference))
    assert [c["name"] for c in v.failed()] == ["behaviour pairs' Hit@30 under the champion's encoder, above chance"]


def test_too_few_returning_users_leave_recognition_unjudged():
    from semalign.validation.suites import USER_MIN_MATCHED, user_continuity, user_sample

    past, emb = _people(0, n_users=USER_MIN_MATCHED - 1)
    out = user_continuity(user_sample(past), past, emb, np.array([f"i{i}" for i in range(len(emb))]))
    assert out == {"users": USER_MIN_MATCHED - 1}


def test_the_champions_gauc_falls_when_users_get_other_peoples_histories():
    v = performance_drift_gate({"all": {"auc": 0.70, "gauc": 0.55}}, {"all": {"auc": 0.71, "gauc": 0.66}},
                               tol=0.05, gauc_tol=0.05)
    assert [c["name"] for c in v.failed()] == ["champion GAUC all on the new window"]
    assert performance_drift_gate({"all": {"auc": 0.70, "gauc": 0.64}}, {"all": {"auc": 0.71, "gauc": 0.66}},
                                  tol=0.05, gauc_tol=0.05).passed


def test_the_user_gate_fails_closed_when_the_champions_encoder_cannot_be_read(tmp_path):
    from semalign.config import Settings
    from semalign.flows.gates import _user_side

    s = Settings(home=tmp_path)
    (s.encoders_dir / "enc-damaged").mkdir(parents=True)
    (s.encoders_dir / "enc-damaged" / "encoder.json").write_text("{not json")
    for version in ("enc-gone", "enc-damaged"):
        v = _user_side(s, {"encoder_version": version}, {"pairs": {"hit": 0.3, "chance": 0.01}}, None, None, None, None)
        assert not v.passed and v.checks[0]["name"] == "the champion's encoder" and version in v.checks[0]["observed"]
