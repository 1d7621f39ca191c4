"""Implicit feedback: sampled negatives (time-matched, from available items the user has not engaged with, seeded,
recorded with the dataset hash) and no leakage from a later window into an earlier one's negatives."""
import numpy as np
import pandas as pd
import pytest

from semalign.data import load_dataset, make_split
from semalign.negatives import NegativeSampling

DAY = 86_400


def _implicit_log(folder, n_items=60, n_users=40, n_events=900, seed=0):
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"item_id": [f"it-{i}" for i in range(n_items)],
                          "text": [f"item number {i}" for i in range(n_items)]})
    # a quarter of the catalogue arrives on day 50: before that it can be no one's negative
    items["available_at"] = [("1970-02-20T00:00:00Z" if i % 4 == 0 else "") for i in range(n_items)]
    pop = 1.0 / np.arange(1, n_items + 1)
    ev = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, n_users, n_events)],
                       "item_id": [f"it-{i}" for i in rng.choice(n_items, n_events, p=pop / pop.sum())],
                       "timestamp": rng.integers(0, 100, n_events) * DAY + 10 * DAY})
    late = ev["item_id"].map(lambda s: int(s.split("-")[1]) % 4 == 0) & (ev["timestamp"] < 50 * DAY)
    ev = ev[~late].drop_duplicates(["user_id", "item_id", "timestamp"])
    folder.mkdir(parents=True, exist_ok=True)
    items.to_csv(folder / "items.csv", index=False)
    ev.to_csv(folder / "interactions.csv", index=False)
    return folder, items, ev


def _neg(ds):
    i = ds.interactions
    return i[i["label"] == 0][["user_id", "item_id", "ts"]].sort_values(["ts", "user_id", "item_id"]).reset_index(drop=True)


@pytest.mark.parametrize("weighting,per", [("uniform", 1), ("popularity", 3)])
def test_negatives_are_time_matched_available_and_not_engaged(tmp_path, weighting, per):
    folder, items, ev = _implicit_log(tmp_path / "shop")
    ds = load_dataset(folder, negatives=NegativeSampling(per, weighting, 0))
    inter = ds.interactions
    pos, neg = inter[inter["label"] == 1], inter[inter["label"] == 0]
    assert len(pos) == len(ev)
    rep = ds.report["negatives"]
    assert rep["sampled"] == len(neg) and rep["sampled"] + rep["short"] == per * len(pos)
    assert rep["short"] == 0 and rep["weighting"] == weighting
    assert not inter.duplicated(["user_id", "item_id", "ts"]).any()
    # per positive: `per` negatives of the same user at the same timestamp
    need = pos.groupby(["user_id", "ts"]).size() * per
    assert need.equals(neg.groupby(["user_id", "ts"]).size().reindex(need.index))
    first_pos = pos.groupby("item_id")["ts"].min()
    given = pd.to_datetime(items.set_index("item_id")["available_at"].replace("", None), utc=True)
    avail = pd.concat([first_pos, given.dropna().astype("int64") // 10**9], axis=1).min(axis=1)
    assert (avail.reindex(neg["item_id"]).to_numpy() <= neg["ts"].to_numpy()).all()
    engaged = pos.groupby(["user_id", "item_id"])["ts"].min()
    seen = engaged.reindex(pd.MultiIndex.from_arrays([neg["user_id"], neg["item_id"]])).to_numpy()
    assert not (seen <= neg["ts"].to_numpy()).any()  # NaN (never engaged) compares False
    # late items do show up once they are available
    assert neg["item_id"].map(lambda s: int(s.split("-")[1]) % 4 == 0).any()


def test_popularity_weighting_prefers_popular_items(tmp_path):
    folder, _, _ = _implicit_log(tmp_path / "shop", n_events=3000)
    share = {}
    for w in ("uniform", "popularity"):
        neg = _neg(load_dataset(folder, negatives=NegativeSampling(2, w, 0)))
        share[w] = neg["item_id"].isin([f"it-{i}" for i in range(1, 6)]).mean()
    assert share["popularity"] > 2 * share["uniform"]


def test_no_leakage_later_windows_leave_earlier_negatives_unchanged(tmp_path):
    """Negatives of a window are drawn from that window and the past only: the training window's negatives are the
    same whether the validation and test windows exist or not, and adding a later window changes none of them."""
    folder, items, ev = _implicit_log(tmp_path / "full")
    full = load_dataset(folder)
    split = make_split(full, "temporal", seed=0)
    for part in ("train", "val"):
        cut = int(split.part(part)["ts"].max())   # the window's end: events at or before it, nothing later
        early = tmp_path / f"upto-{part}"
        early.mkdir()
        items.to_csv(early / "items.csv", index=False)
        ev[ev["timestamp"] <= cut].to_csv(early / "interactions.csv", index=False)
        a, b = _neg(full), _neg(load_dataset(early))
        assert len(b) and len(a) > len(b)
        pd.testing.assert_frame_equal(a[a["ts"] <= cut].reset_index(drop=True), b)


def test_seeded_reproducible_and_recorded_in_the_hash(tmp_path):
    folder, _, ev = _implicit_log(tmp_path / "shop")
    a, b = load_dataset(folder), load_dataset(folder)
    other = load_dataset(folder, negatives=NegativeSampling(seed=1))
    assert a.content_hash() == b.content_hash() and _neg(a).equals(_neg(b))
    assert not _neg(a).equals(_neg(other)) and a.content_hash() != other.content_hash()
    assert a.negatives == {**NegativeSampling().spec(), **{k: a.negatives[k] for k in a.negatives
                                                          if k not in NegativeSampling().spec()}}
    # the same rows given as explicit labels are not the same dataset: sampling is part of what the data is
    explicit = tmp_path / "explicit"
    explicit.mkdir()
    (explicit / "items.csv").write_bytes((folder / "items.csv").read_bytes())
    a.interactions[["user_id", "item_id", "ts", "label"]].rename(columns={"ts": "timestamp"}).to_csv(
        explicit / "interactions.csv", index=False)
    e = load_dataset(explicit)
    assert _neg(e).equals(_neg(a)) and e.content_hash() != a.content_hash() and e.negatives is None


def test_data_check_reports_what_it_sampled(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from semalign.cli import app

    folder, _, ev = _implicit_log(tmp_path / "shop")
    monkeypatch.setenv("SEMALIGN_NEGATIVES_PER_POSITIVE", "2")
    monkeypatch.setenv("SEMALIGN_NEGATIVE_SAMPLING", "popularity")
    out = CliRunner().invoke(app, ["data", "check", "--data", str(folder), "--home", str(tmp_path / "h"), "--json"])
    assert out.exit_code == 0, out.output
    from semalign.data import load_dataset as load

    res = json.loads(out.stdout)
    assert res["hash"] == load(folder, negatives=NegativeSampling(2, "popularity", 0)).content_hash()
    neg = res["data"]["negatives"]
    assert neg["positives"] == len(ev) and neg["sampled"] == 2 * len(ev) and neg["weighting"] == "popularity"
    assert neg["seed"] == 0 and neg["short"] == 0


def test_small_pools_are_drawn_exactly_and_a_shortfall_is_reported(tmp_path):
    """A user who engaged with all but one item of the catalogue: random draws almost never hit it, so the exact pool
    is drawn; a positive with nothing left to draw is counted as short, never given a repeated or engaged item."""
    n = 300
    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(n)], "text": ["x"] * n})
    ev = pd.DataFrame({"user_id": ["u2"] * n + ["u1"] * (n - 1) + ["u1"],
                       "item_id": [f"i{k}" for k in range(n)] + [f"i{k}" for k in range(1, n)] + ["i1"],
                       "timestamp": [1] * n + [5] * (n - 1) + [10]})
    items.to_csv(tmp_path / "items.csv", index=False)
    ev.to_csv(tmp_path / "interactions.csv", index=False)
    ds = load_dataset(tmp_path)
    neg = _neg(ds)
    # u2 at 1 engaged every item: nothing to draw (300 short); u1 at 5 and at 10: only i0 is left, once per time
    assert list(zip(neg["user_id"], neg["item_id"], neg["ts"])) == [("u1", "i0", 5), ("u1", "i0", 10)]
    assert ds.report["negatives"]["short"] == n + (n - 2) and ds.report["negatives"]["exact_pool_draws"] >= 1
