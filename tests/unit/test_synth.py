"""The synthetic catalogue generator (`semalign data synth`): deterministic, in the data contract, and shaped like a
real catalogue (power-law popularity, sessions, learnable labels, late items)."""
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from semalign import synth
from semalign.data import load_dataset, make_split
from semalign.models.metrics import auc
from semalign.synth import SynthConfig, generate

SMALL = SynthConfig(items=3000, users=1500, events=40_000, seed=7)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synth") / "shop"
    summary = generate(folder, SMALL)
    return folder, summary, load_dataset(folder)


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(tmp_path, small):
    folder, _, _ = small
    again = tmp_path / "again"
    generate(again, SMALL)
    for name in ("items.parquet", "interactions.parquet"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    other = tmp_path / "other"
    generate(other, SynthConfig(**{**SMALL.__dict__, "seed": 8}))
    assert (other / "interactions.parquet").read_bytes() != (folder / "interactions.parquet").read_bytes()


def test_output_is_in_the_data_contract(small):
    folder, summary, ds = small
    assert ds.n_items == 3000 and len(ds.interactions) == 40_000 == summary["events"]
    assert {"item_id", "text", "available_at"} <= set(ds.items.columns)
    assert str(ds.interactions["timestamp"].dt.tz) == "UTC"
    assert set(ds.interactions["label"].unique()) == {0, 1}
    assert 0.35 < ds.report["positive_rate"] < 0.65 and ds.report["positive_rate"] == summary["positive_rate"]
    words = ds.items["text"].str.split().str.len()
    assert words.min() >= 30 and words.max() <= 60  # a few dozen words: the text tower has real work
    # no event shows an item before it is available
    avail = ds.items["available_at"].to_numpy()[ds.interactions["item_idx"].to_numpy()]
    assert (ds.interactions["timestamp"].to_numpy() >= avail).all()


def test_memory_is_bounded_by_chunks_and_chunking_keeps_the_contract(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "ITEM_CHUNK", 700)
    monkeypatch.setattr(synth, "EVENT_CHUNK", 3000)
    generate(tmp_path / "s", SynthConfig(items=2000, events=20_000, seed=1))
    assert pq.ParquetFile(tmp_path / "s" / "items.parquet").num_row_groups == 3
    assert pq.ParquetFile(tmp_path / "s" / "interactions.parquet").num_row_groups >= 6
    ds = load_dataset(tmp_path / "s")
    assert len(ds.interactions) == 20_000 and ds.n_items == 2000


def test_item_popularity_follows_a_power_law(small):
    _, _, ds = small
    counts = np.sort(np.bincount(ds.interactions["item_idx"], minlength=ds.n_items))[::-1]
    top1 = counts[: len(counts) // 100].sum() / counts.sum()
    assert top1 > 0.25            # uniform popularity would give ~0.01
    # log-log slope of count vs rank over the head is near -zipf
    ranks = np.arange(1, 201)
    slope = np.polyfit(np.log(ranks[5:]), np.log(np.maximum(counts[5:200], 1)), 1)[0]
    assert -1.6 < slope < -0.6


def test_users_have_sessions(small):
    _, _, ds = small
    ev = ds.interactions.sort_values(["user_idx", "ts"])
    same_user = ev["user_idx"].to_numpy()[1:] == ev["user_idx"].to_numpy()[:-1]
    gaps = np.diff(ev["ts"].to_numpy())[same_user]
    assert (gaps > 0).all()                      # one event per user and second: (user, item, ts) unique
    within = (gaps < 15 * 60).mean()
    between = (gaps > 3 * 3600).mean()
    assert within > 0.6 and between > 0.08       # bursts minutes apart, separated by hours or days


def test_labels_carry_a_learnable_signal(small):
    """Score later events by the user's training-window click rate on the item's category (read from the data):
    clearly better than chance, and better than the user's overall click rate alone."""
    _, _, ds = small
    split = make_split(ds, "temporal")
    train, test = split.part("train"), split.part("test")
    cat = ds.items["category"].to_numpy()
    key = lambda ev: ev["user_idx"].astype(str).to_numpy() + "|" + cat[ev["item_idx"].to_numpy()]  # noqa: E731
    by_cat = pd.DataFrame({"k": key(train), "y": train["label"].to_numpy()}).groupby("k")["y"].agg(["sum", "count"])
    prior = train["label"].mean()
    s = by_cat.reindex(key(test)).fillna(0)
    score = ((s["sum"] + 2 * prior) / (s["count"] + 2)).to_numpy()
    y = test["label"].to_numpy()
    user_rate = train.groupby("user_idx")["label"].mean().reindex(test["user_idx"]).fillna(prior).to_numpy()
    assert auc(y, score) > 0.65
    assert auc(y, score) > auc(y, user_rate) + 0.03


def test_text_says_the_category(small):
    _, _, ds = small
    assert all(t.endswith(f"Category: {c}.") for t, c in zip(ds.items["text"].head(200), ds.items["category"]))


def test_late_items_are_cold_in_a_temporal_split_and_the_cold_items_split_has_cold_items(small):
    _, summary, ds = small
    start = ds.interactions["timestamp"].min()
    late = (ds.items["available_at"] > start).to_numpy()
    assert summary["late_items"] == late.sum() and 0.1 < late.mean() < 0.3
    temporal = make_split(ds, "temporal")
    test_items = np.unique(temporal.part("test")["item_idx"])
    unseen = test_items[temporal.train_counts[test_items] == 0]
    assert late[unseen].mean() > 0.5          # most items that are new in the test window came in late
    cold = make_split(ds, "cold-items", seed=0)
    assert len(cold.cold_items) > 0
    assert (cold.train_counts[cold.cold_items] == 0).all()
    assert cold.part("test")["item_idx"].isin(cold.cold_items).any()


def test_images_are_written_and_found_by_the_loader(tmp_path):
    from PIL import Image

    generate(tmp_path / "s", SynthConfig(items=300, events=2000, seed=2, images=4))
    pngs = sorted((tmp_path / "s" / "images").iterdir())
    assert len(pngs) == 4
    with Image.open(pngs[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    assert load_dataset(tmp_path / "s").report["items_with_image"] == 4


def test_cli_synth_then_check(tmp_path):
    from typer.testing import CliRunner

    from semalign.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["data", "synth", "--out", str(out), "--items", "500", "--events", "4000", "--seed", "3", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["events"] == 4000
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "not empty" in str(again.exception)  # no silent overwrite
    check = runner.invoke(app, ["data", "check", "--data", str(out), "--home", str(tmp_path / "home"), "--json"])
    assert check.exit_code == 0, check.output
    assert json.loads(check.stdout)["data"]["interactions"] == 4000
