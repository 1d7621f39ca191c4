"""The CLI end to end on a small generic-folder dataset: run, rerun (no new work), stable rebuild, errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import prefect_api, write_generic


def _cli(*args, env=None, check=True):
    env = {**os.environ, **(env or {})}
    if "PREFECT_API_URL" not in env:
        env["PREFECT_API_URL"] = prefect_api()
    proc = subprocess.run([sys.executable, "-m", "semalign.cli", *args], capture_output=True, text=True,
                          env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"semalign {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def test_help_is_fast_because_nothing_heavy_is_imported():
    code = ("import sys; from semalign.cli import app; import typer.main as m; "
            "m.get_command(app); heavy = [x for x in ('torch','pandas','transformers','feast','mlflow') if x in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
    from importlib.metadata import version

    got = subprocess.run([sys.executable, "-m", "semalign.cli", "--version"], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == f"semalign {version('semalign')}"


def test_help_lists_the_exit_codes():
    from semalign.errors import EXIT_FAILED, EXIT_GATES_BLOCKED, EXIT_OK, EXIT_USAGE

    out = subprocess.run([sys.executable, "-m", "semalign.cli", "--help"], capture_output=True, text=True, check=True,
                         env={**os.environ, "COLUMNS": "400"}).stdout
    assert "Exit codes" in out
    for code, meaning in ((EXIT_OK, "ok"), (EXIT_FAILED, "failed"), (EXIT_USAGE, "usage"),
                          (EXIT_GATES_BLOCKED, "the gates blocked the promotion")):
        assert f"{code} {meaning}" in out


def test_old_experiment_json_path_spelling_is_rewritten_to_out():
    from semalign.cli import legacy_out

    assert legacy_out(["experiment", "--seeds", "1", "--json", "r.json"]) == ["experiment", "--seeds", "1", "--out", "r.json"]
    assert legacy_out(["experiment", "--json=r.json"]) == ["experiment", "--out=r.json"]
    for argv in (["experiment", "--json"], ["experiment", "--json", "--seeds", "2"], ["run", "--json"],
                 ["ids", "get", "--json", "sku-1"], ["--version"], []):
        assert legacy_out(argv) == argv  # the --json flag, and other commands, are left alone


@pytest.fixture(scope="module")
def shop(tmp_path_factory, movielens):
    return write_generic(tmp_path_factory.mktemp("shop"), movielens, n_items=300)


def test_run_rerun_and_stable_rebuild_on_generic_folder(tmp_path, shop):
    env = {"SEMALIGN_HOME": str(tmp_path / "home"), "SEMALIGN_ENCODER_EPOCHS": "3", "SEMALIGN_DATA": str(shop)}
    first = json.loads(_cli("codebook", "build", "--json", env=env).stdout)
    cb = first["codebook"]
    assert first["dataset"].startswith("shop") and cb["parent"] is None and not cb["reused"]
    assert cb["catalogue_collision_rate_after_dedup"] == 0.0
    assert first["encoder"]["hit@30"]["encoder"] > 0
    sids = pd.read_parquet(tmp_path / "home" / "codebooks" / cb["version"] / "sids.parquet")
    assert len(sids) == 300 and sids["item_id"].str.startswith("sku-").all()
    assert len(sids.drop_duplicates(["sid_0", "sid_1", "sid_2", "sid_dedup"])) == 300
    assert len(sids["embedding"].iloc[0]) == 128

    # unchanged input: same versions, nothing recomputed or written
    listing = sorted(p.name for p in (tmp_path / "home" / "codebooks").iterdir())
    again = json.loads(_cli("codebook", "build", "--json", env=env).stdout)
    assert again["codebook"]["version"] == cb["version"] and again["codebook"]["reused"]
    assert again["encoder"]["reused"] and again["towers"]["embedded_now"] == {"text": 0, "image": 0}
    assert sorted(p.name for p in (tmp_path / "home" / "codebooks").iterdir()) == listing

    # 10% of interactions change: rebuild against the parent keeps most IDs; a fresh build does not
    inter = pd.read_csv(shop / "interactions.csv")
    changed = inter.sample(frac=0.1, random_state=0).index
    inter.loc[changed, "label"] = 1 - inter.loc[changed, "label"]
    shop2 = tmp_path / "shop2"
    shop2.mkdir()
    (shop2 / "items.csv").write_bytes((shop / "items.csv").read_bytes())
    inter.to_csv(shop2 / "interactions.csv", index=False)
    env2 = {**env, "SEMALIGN_DATA": str(shop2)}
    child = json.loads(_cli("codebook", "build", "--json", env=env2).stdout)["codebook"]
    assert child["parent"] == cb["version"] and child["churn"]["items"] == 300
    fresh = json.loads(_cli("codebook", "build", "--parent", "none", "--json",
                            env={**env2, "SEMALIGN_SEED": "1"}).stdout)["codebook"]
    # churn of the fresh build against the first version's SIDs
    old = sids.set_index("item_id")
    new = pd.read_parquet(tmp_path / "home" / "codebooks" / fresh["version"] / "sids.parquet").set_index("item_id")
    cols = ["sid_0", "sid_1", "sid_2"]
    fresh_churn = (old[cols] != new.loc[old.index, cols]).any(axis=1).mean()
    assert child["churn"]["churn"] < fresh_churn

    listed = json.loads(_cli("codebook", "list", "--json", env=env).stdout)["codebooks"]
    assert {r["version"] for r in listed} >= {cb["version"], child["version"], fresh["version"]}


def test_bad_dataset_is_a_clear_cli_error(tmp_path):
    (tmp_path / "items.csv").write_text("item_id,text\na,one\n")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,timestamp,label\nu,a,1,1\nu,nope,2,1\n")
    proc = _cli("data", "check", "--data", str(tmp_path), env={"SEMALIGN_HOME": str(tmp_path / "h")}, check=False)
    assert proc.returncode == 1  # a handled error (exit codes: semalign/errors.py)
    assert "interactions.csv, row 2, column 'item_id'" in proc.stderr
    assert not (tmp_path / "h" / "codebooks").exists()


def test_experiment_writes_long_form_results_plot_and_deltas(tmp_path, movielens):
    shop = write_generic(tmp_path / "small", movielens, n_items=120)
    env = {"SEMALIGN_HOME": str(tmp_path / "home"), "SEMALIGN_ENCODER_EPOCHS": "2", "SEMALIGN_USE_IMAGES": "false"}
    out = tmp_path / "exp" / "res.json"
    proc = _cli("experiment", "--data", str(shop), "--seeds", "2", "--models",
                "aligned_content,full@cold_behavior=generated,id_only,logreg",
                "--max-epochs", "1", "--bootstrap", "20", "--out", str(out), env=env)
    assert "deprecated" not in proc.stderr
    res = json.loads(out.read_text())
    assert res["split"] == "cold-items" and res["seeds"] == [0, 1]
    keys = {(r["model"], r["bucket"], r["metric"]) for r in res["results"]}
    assert ("aligned_content", "unseen", "gauc") in keys and ("logreg", "all", "auc") in keys
    assert ("full@cold_behavior=generated", "unseen", "gauc") in keys and ("id_only", "all", "logloss") in keys
    for r in res["results"]:
        assert set(r) == {"model", "bucket", "metric", "mean", "std", "n_events"}
        assert r["metric"] != "auc" or 0 <= r["mean"] <= 1
    d = [x for x in res["deltas"] if x["baseline"] == "id_only" and x["bucket"] == "all" and x["metric"] == "gauc"]
    assert len(d) == 1 and d[0]["ci_low"] <= d[0]["mean"] <= d[0]["ci_high"]
    assert {x["baseline"] for x in res["deltas"]} == {"full@cold_behavior=generated", "id_only", "logreg"}
    # the served model is measured with exactly the configuration the refresh trains (tests/test_refresh.py
    # checks the refresh side against the same function); a lever variant differs only in its lever
    from dataclasses import asdict

    from semalign.config import Settings
    from semalign.spec import ranker_config

    spec = {k: v for k, v in asdict(ranker_config(Settings(), max_epochs=1)).items() if k != "seed"}
    spec["hidden"] = list(spec["hidden"])
    assert res["served"] == "aligned_content" and res["configs"]["aligned_content"] == spec
    gen = res["configs"]["full@cold_behavior=generated"]
    assert gen["cold_behavior"] == "generated" and gen["variant"] == "full"
    assert "| validation (selection) |" in proc.stdout  # levers are chosen on pseudo-cold validation items
    assert out.with_suffix(".auc.png").stat().st_size > 10_000 and out.with_suffix(".md").exists()
    assert "| GAUC |" in proc.stdout and "delta" in proc.stdout
    # the experiment never moves the published codebook pointer
    assert not (tmp_path / "home" / "codebooks" / "LATEST").exists()

    # --json is the flag of every command: the results as JSON on stdout, nothing else there
    merged = json.loads(_cli("experiment", "--merge", str(out), "--bootstrap", "20", "--json", env=env).stdout)
    assert merged["seeds"] == [0, 1] and merged["results"] and merged["merged_from"] == ["res.json"]
    # the old spelling `--json PATH` still writes the files, and says it is deprecated
    legacy = tmp_path / "exp" / "merged.json"
    old = _cli("experiment", "--merge", str(out), "--bootstrap", "20", "--json", str(legacy), env=env)
    assert "`--json PATH` is deprecated, use `--out PATH`" in old.stderr and "| GAUC |" in old.stdout
    assert json.loads(legacy.read_text())["seeds"] == [0, 1] and legacy.with_suffix(".md").exists()


def test_ids_get_items_add_and_publish_through_the_feature_store(tmp_path, shop):
    env = {"SEMALIGN_HOME": str(tmp_path / "home"), "SEMALIGN_ENCODER_EPOCHS": "2", "SEMALIGN_DATA": str(shop)}
    run = json.loads(_cli("codebook", "build", "--json", env=env).stdout)
    version = run["codebook"]["version"]
    assert run["feature_store"]["version"] == version and run["feature_store"]["published_now"]
    sids = pd.read_parquet(tmp_path / "home" / "codebooks" / version / "sids.parquet").set_index("item_id")
    cols = ["sid_0", "sid_1", "sid_2", "sid_dedup"]

    got = json.loads(_cli("ids", "get", "sku-1", "sku-2", "--json", env=env).stdout)["items"]
    assert [r["item_id"] for r in got] == ["sku-1", "sku-2"]
    assert [[r[c] for c in cols] for r in got] == sids.loc[["sku-1", "sku-2"], cols].to_numpy().tolist()

    # a new item with exactly the content of sku-1 lands on sku-1's codes with its own dedup slot
    text = pd.read_csv(shop / "items.csv").set_index("item_id").loc["sku-1", "text"]
    new = tmp_path / "new.csv"
    pd.DataFrame({"item_id": ["brand-new", "twin-of-1"], "text": ["A heist film set on a night train.", text]}).to_csv(new, index=False)
    added = json.loads(_cli("items", "add", str(new), "--json", env=env).stdout)
    assert added["onboarded"] == 2
    twin = next(r for r in added["items"] if r["item_id"] == "twin-of-1")
    assert [twin[c] for c in cols[:3]] == sids.loc["sku-1", cols[:3]].tolist()
    assert twin["sid_dedup"] not in sids[(sids[cols[:3]] == sids.loc["sku-1", cols[:3]]).all(axis=1)]["sid_dedup"].tolist()
    online = json.loads(_cli("ids", "get", "brand-new", "twin-of-1", "--json", env=env).stdout)["items"]
    assert [[r[c] for c in cols] for r in online] == [[r[c] for c in cols] for r in added["items"]]
    again = json.loads(_cli("items", "add", str(new), "--json", env=env).stdout)
    assert again["onboarded"] == 0 and again["already_present"] == 2

    assert not json.loads(_cli("ids", "publish", "--json", env=env).stdout)["publish"]["published_now"]
    bad = _cli("ids", "get", "sku-1", "--version", "rqkmeans-nope", env=env, check=False)
    assert bad.returncode == 1 and "unknown" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("ids", "get", "sku-1", "no-such-item", env=env, check=False)
    assert missing.returncode == 1 and "no-such-item" in missing.stderr

    # reverse lookup: the onboarded twin is found under sku-1's SID prefix; a bad prefix is a clear error
    prefix = "-".join(str(int(v)) for v in sids.loc["sku-1", cols[:2]])
    under = json.loads(_cli("ids", "items", prefix, "--json", env=env).stdout)
    assert {"sku-1", "twin-of-1"} <= {r["item_id"] for r in under["items"]} and under["count"] == len(under["items"])
    assert all(r["sid"].startswith(prefix + "-") for r in under["items"])
    bad_prefix = _cli("ids", "items", "one-two", env=env, check=False)
    assert bad_prefix.returncode == 1 and "not a SID prefix" in bad_prefix.stderr and "Traceback" not in bad_prefix.stderr
    # a version against itself: nothing moved; the translation table lands where asked
    diff = json.loads(_cli("ids", "diff", version, version, "--out", str(tmp_path / "t.csv"), "--json", env=env).stdout)
    assert diff["churn"] == 0.0 and diff["shared_items"] == 302 and diff["moved"] == []
    assert len(pd.read_csv(tmp_path / "t.csv")) == 302

    # similar items: the onboarded twin's nearest item is sku-1 (same content, same aligned vector); a brand-new
    # item given by its text is encoded on the fly, written nowhere, and finds both
    near = json.loads(_cli("ids", "similar", "twin-of-1", "--k", "3", "--json", env=env).stdout)
    assert near["query"] == "store" and near["searched_items"] == 302
    assert near["neighbours"][0]["item_id"] == "sku-1" and near["neighbours"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert "twin-of-1" not in [r["item_id"] for r in near["neighbours"]]
    fresh = json.loads(_cli("ids", "similar", "never-seen", "--text", text, "--k", "2", "--json", env=env).stdout)
    assert fresh["query"] == "encoded" and {r["item_id"] for r in fresh["neighbours"]} == {"sku-1", "twin-of-1"}
    assert fresh["shares_first_level"] == 1.0 and fresh["sid"] == "-".join(str(int(v)) for v in sids.loc["sku-1", cols[:3]])
    assert _cli("ids", "get", "never-seen", env=env, check=False).returncode == 1
    no_item = _cli("ids", "similar", "never-seen", env=env, check=False)
    assert no_item.returncode == 1 and "never-seen" in no_item.stderr and "Traceback" not in no_item.stderr

    # the SID tokenizer bundle: a Python with only torch and numpy reads the table and assigns the store's SIDs
    from semalign.config import Settings
    from semalign.feature_repo.store import SemanticIdStore

    bundle = tmp_path / "bundle"
    meta = json.loads(_cli("ids", "bundle", "--out", str(bundle), "--json", env=env).stdout)
    assert meta["codebook_version"] == version and meta["items"] == 302
    store = SemanticIdStore(Settings(home=tmp_path / "home"))
    ids = sids.index.tolist()
    _, found, _, content = store.read_online(ids, version, 3, with_content=True)
    assert found.all()
    np.save(tmp_path / "text.npy", np.stack(content).astype(np.float32))
    bare = subprocess.run([sys.executable, "-I", "-c", BARE_TOKENIZER, str(bundle), str(tmp_path / "text.npy"),
                           json.dumps(ids[:3] + ["twin-of-1"])], capture_output=True, text=True, timeout=300)
    assert bare.returncode == 0, bare.stderr[-3000:]
    got = json.loads(bare.stdout)
    assert got["foreign_modules"] == []
    assert got["sids"][:3] == sids.loc[ids[:3], cols].to_numpy().tolist()
    assert got["sids"][3] == [twin[c] for c in cols]
    assert got["assigned"] == sids.loc[ids, cols[:3]].to_numpy().tolist()      # new-item path == the store's
    assert set(got["under_prefix"]) >= {ids[0]}


BARE_TOKENIZER = """
import json, sys
bundle, text, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
sys.path.insert(0, bundle)
import numpy as np
from sid_tokenizer import SidTokenizer
tok = SidTokenizer.load(bundle)
sids = tok.sids(ids).tolist()
assigned = tok.assign(np.load(text)).tolist()
under = tok.items("-".join(map(str, sids[0][:2])))
foreign = sorted({m.split(".")[0] for m in sys.modules} & {"semalign", "feast", "mlflow", "pandas", "transformers",
                                                           "prefect", "great_expectations", "safetensors"})
print(json.dumps({"sids": sids, "assigned": assigned, "under_prefix": under, "foreign_modules": foreign}))
"""
