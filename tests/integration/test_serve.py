"""`semalign serve` as a user runs it: a real uvicorn process on loopback, the champion from the MLflow registry,
features from the Feast online store, a brand-new item scored from its content."""
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import free_port
from conftest import run_cli as _cli



def _req(url, body=None, method=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def served(refreshed):
    root, shop, home, env = refreshed["root"], refreshed["shop"], refreshed["home"], refreshed["env"]
    st = json.loads(_cli("status", "--json", env=env).stdout)
    first = {"model_version": st["champion"]["version"], "codebook": {"version": st["champion"]["codebook_version"]}}
    port = free_port()
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "semalign.cli", "serve", "--port", str(port), "--check-interval", "1"],
                            env={**os.environ, **env, "SEMALIGN_SERVE_READ_TIMEOUT_S": "2"}, stdout=log,
                            stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if _req(base + "/health")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail("server did not become healthy: " + (root / "serve.log").read_text()[-3000:])
    yield {"base": base, "home": home, "shop": shop, "first": first, "env": env, "root": root}
    proc.terminate()
    proc.wait(20)
    log.close()


def test_binds_to_loopback_only_by_default(served):
    port = int(served["base"].rsplit(":", 1)[1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":   # 0A: LISTEN
                listening.append(addr)
    assert listening == ["0100007F"], listening                 # 127.0.0.1 only, no wildcard, no IPv6 any


def test_serve_cuts_off_a_client_that_sends_nothing(served):
    """`semalign serve` runs uvicorn with a deadline on request heads (SEMALIGN_SERVE_READ_TIMEOUT_S, 2 s here):
    a connection that sends nothing is closed, where uvicorn alone would keep it open for ever."""
    import socket

    port = int(served["base"].rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    assert sock.recv(1024) == b""   # closed by the server (a socket.timeout here: still open after 30 s)
    sock.close()


def test_scores_100_candidates_with_one_brand_new_item(served):
    from semalign.config import Settings
    from semalign.artifacts import codebook_folder
    from semalign.feature_repo.embedder import ItemEmbedder

    base, first = served["base"], served["first"]
    items = pd.read_csv(served["shop"] / "items.csv")["item_id"].tolist()[:99]
    new = {"item_id": "brand-new-1", "text": "A documentary about lighthouse keepers on a stormy coast. Genres: Documentary"}
    status, body = _req(base + "/score", {"user_id": "u1", "candidates": [{"item_id": i} for i in items] + [new]})
    assert status == 200, body
    assert len(body["items"]) == 100 and body["model_version"] == first["model_version"]
    assert body["codebook_version"] == first["codebook"]["version"]
    scores = [r["score"] for r in body["items"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    got = next(r for r in body["items"] if r["item_id"] == "brand-new-1")
    assert got["source"] == "on_the_fly"
    settings = Settings(home=served["home"])
    embedder = ItemEmbedder(settings, body["codebook_version"])
    codebook = codebook_folder(settings, body["codebook_version"]).load_codebook()
    want = codebook.assign(embedder.embed(pd.DataFrame([new]))[0])[0].tolist()
    assert got["sid"] == want
    # on the fly means not written: the store still does not hold it
    status, body = _req(base + "/score", {"user_id": "u1", "candidates": [{"item_id": "brand-new-1"}]})
    assert status == 404 and "brand-new-1" in body["detail"]
    # with onboard=true it is written and then served from the store
    status, body = _req(base + "/score", {"user_id": "u1", "candidates": [new], "onboard": True})
    assert status == 200 and body["items"][0]["source"] == "onboarded" and body["items"][0]["sid"][:3] == want
    status, body = _req(base + "/score", {"user_id": "u1", "candidates": [{"item_id": "brand-new-1"}]})
    assert status == 200 and body["items"][0]["source"] == "store"


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(served):
    base = served["base"]
    cases = [
        ({"user_id": "no-such-user", "candidates": [{"item_id": "sku-1"}]}, 404, "unknown user"),
        ({"user_id": "u1", "candidates": []}, 422, None),
        ({"user_id": "u1", "candidates": "sku-1"}, 422, None),
        ({"user_id": "u1", "candidates": [{"item_id": "x", "text": "t" * 30000}]}, 422, None),
        ({"user_id": "u1", "candidates": [{"item_id": f"i{k}"} for k in range(1001)]}, 422, "at most 1000"),
        ({"user_id": "u1", "candidates": [{"item_id": "sku-1"}, {"item_id": "sku-1"}]}, 422, "unique"),
        ({"user_id": "u1", "candidates": [{"item_id": "sku-1"}], "onboard": "yes"}, 422, "boolean"),
        ({"user_id": "u1", "candidates": [{"item_id": "  "}]}, 422, "pattern"),
        ({"user_id": "u1", "candidates": [{"item_id": "never-seen"}]}, 404, "without content"),
    ]
    for body, code, text in cases:
        status, resp = _req(base + "/score", body)
        assert status == code, (body if len(json.dumps(body)) < 300 else "big", status, resp)
        if text:
            assert text in json.dumps(resp)
    # the cap is checked before the entries: 20,000 entries that are all wrong are one issue, the list's length
    status, resp = _req(base + "/score", {"user_id": "u1", "candidates": [{"item_id": ""}] * 20_000})
    assert status == 422 and [i["type"] for i in resp["detail"]] == ["too_long"], resp["detail"][:3]
    assert _req(base + "/health")[0] == 200
    assert _req(base + "/score", {"user_id": "u1", "candidates": [{"item_id": "sku-1"}]})[0] == 200
    status, spec = _req(base + "/openapi.json")
    assert status == 200 and "/score" in spec["paths"] and "examples" in json.dumps(spec["components"])
    # every status the calls above got is in the contract, with the error body they carried
    for path in ("/score", "/items"):
        documented = spec["paths"][path]["post"]["responses"]
        assert {"200", "404", "409", "413", "422", "503"} <= set(documented), (path, sorted(documented))
        assert documented["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    # the caps are the schema's: a generated client knows them
    assert spec["components"]["schemas"]["ScoreRequest"]["properties"]["candidates"]["maxItems"] == 1000


def test_a_bug_inside_scoring_is_a_500_whose_body_says_nothing_of_it(served, monkeypatch, caplog):
    """An exception semalign does not handle (here a numpy-style ValueError from the ranker's scoring step) is not
    the caller's bad input: 500 with the generic ErrorBody, its text only in the log. Input the service refuses
    is a 422 whose message is written for the caller. Both bodies are what the contract documents."""
    import logging

    from fastapi.testclient import TestClient

    from semalign.config import Settings
    from semalign.deploy.scoring import RankerScorer
    from semalign.deploy.serve import create_app

    internal = "operands could not be broadcast together with shapes (7,64) (9,64) in /srv/semalign/rankers"
    one = {"user_id": "u1", "candidates": [{"item_id": "sku-1"}]}
    app = create_app(Settings(home=served["home"]), check_interval_s=3600)
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as client:
        assert client.post("/score", json=one).status_code == 200

        def broken(self, *args, **kwargs):
            raise ValueError(internal)

        monkeypatch.setattr(RankerScorer, "score_rows", broken)
        with caplog.at_level(logging.WARNING, logger="semalign.serve"):
            r = client.post("/score", json=one)
        assert r.status_code == 500 and r.json() == {"detail": "internal error"}, r.text
        assert "broadcast" not in r.text and "/srv" not in r.text
        assert internal in caplog.text   # the operator's log has it, with the traceback
        monkeypatch.undo()
        assert client.post("/score", json=one).status_code == 200   # and the service keeps serving

        refused = client.post("/items", json={"items": [{"item_id": "blank-1", "text": "   "}]})
        assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "items", 0, "text"]
        unfit = client.post("/score", json={"user_id": "u1", "candidates": []})
        assert unfit.status_code == 422 and unfit.json()["detail"][0]["loc"] == ["body", "candidates"]
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path in ("/score", "/items"):
        documented = spec["paths"][path]["post"]["responses"]
        assert documented["500"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
        # one schema per status: every 422 is RequestValidationBody
        assert documented["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/RequestValidationBody")
    assert schemas["ErrorBody"]["required"] == ["detail"] and schemas["ErrorBody"]["properties"]["detail"]["type"] == "string"
    assert schemas["RequestValidationBody"]["properties"]["detail"]["type"] == "array"


def _uv_index_env() -> dict:
    """uv reads none of pip's configuration: hand it pip's wheel folders (where a machine keeps its torch build)
    and CA bundle, and the proxy settings of this environment."""
    import re

    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    conf = dict(re.findall(r"^\S*?\.?([a-z-]+)='([^']*)'$", out, re.M))
    env = {k: v for k, v in os.environ.items() if k.upper() in ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "SSL_CERT_FILE")}
    links = [d for d in (os.environ.get("PIP_FIND_LINKS") or conf.get("find-links", "")).split() if os.path.isdir(d)]
    if links:
        env["UV_FIND_LINKS"] = ",".join(links)
    cert = os.environ.get("PIP_CERT") or conf.get("cert")
    if cert and os.path.isfile(cert):
        env.setdefault("SSL_CERT_FILE", cert)
    return env


def test_mlflow_models_predict_in_a_fresh_mlflow_only_environment_scores_like_serve(served, tmp_path):
    """The registered champion as MLflow users run it: a virtualenv with nothing but MLflow (the project's pin),
    `mlflow models predict -m models:/...@champion -t csv --env-manager uv`, which builds the model's own
    environment from its pinned requirements and carried code, fed a CSV of integer ids (pandas reads them as
    int64: a signature typed `string` refused them). Its scores equal `semalign serve`'s for the same rows."""
    import shutil
    from importlib.metadata import version

    from semalign.deploy.ranker_model import id_strings
    from semalign.deploy.scoring import ScoringError

    base, home = served["base"], served["home"]
    # items with integer ids, onboarded through the service (the test shop's own ids are not integers)
    ids = list(range(7001, 7006))
    status, body = _req(base + "/items", {"items": [{"item_id": str(i), "text": f"Film number {i}, a drama set by "
                                                     f"the sea. Genres: Drama"} for i in ids]})
    assert status == 200, body
    status, body = _req(base + "/score", {"user_id": "u1", "candidates": [{"item_id": str(i)} for i in ids]})
    assert status == 200, body
    want = {r["item_id"]: r["score"] for r in body["items"]}

    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    venv, tools = tmp_path / "mlflow-only", tmp_path / "tools"
    subprocess.run([uv, "venv", "-q", str(venv), "--python", sys.executable], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                    f"mlflow=={version('mlflow')}"], check=True, env={**os.environ, **_uv_index_env()})
    tools.mkdir()
    (tools / "uv").symlink_to(uv)  # the env manager MLflow calls; nothing else of this environment
    (tmp_path / "in.csv").write_text("user_id,item_id\n" + "".join(f"u1,{i}\n" for i in ids))
    # uv builds the model's environment on the Python it was logged with (python_env.yaml): this one's
    interpreter = Path(sys.base_prefix) / "bin"
    env = {"PATH": f"{venv / 'bin'}:{tools}:{interpreter}:/usr/bin:/bin", "HOME": os.environ.get("HOME", str(tmp_path)),
           "UV_PYTHON_DOWNLOADS": "never",
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "SEMALIGN_HOME": str(home),
           "MLFLOW_ENV_ROOT": str(tmp_path / "envs"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **_uv_index_env()}
    proc = subprocess.run([str(venv / "bin" / "mlflow"), "models", "predict", "-m", "models:/semalign-ranker@champion",
                           "-i", str(tmp_path / "in.csv"), "-t", "csv", "-o", str(tmp_path / "out.json"),
                           "--env-manager", "uv"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    got = got["predictions"] if isinstance(got, dict) else got
    scores = [r["score"] if isinstance(r, dict) else r for r in got]
    np.testing.assert_allclose(scores, [want[str(i)] for i in ids], rtol=1e-5, atol=1e-6)
    # what the model's predict takes as an id: a string, an integer, a whole float (an integer column with blanks,
    # as pandas parses it); anything else is refused by row
    frame = pd.DataFrame({"item_id": pd.Series([7001, None, 7003], dtype="float64"), "user_id": ["u1", 196, "u1"]})
    assert id_strings(frame, "user_id") == ["u1", "196", "u1"]
    with pytest.raises(ScoringError, match=r"item_id, row 1: nan is not an id"):
        id_strings(frame, "item_id")
    assert id_strings(frame.dropna(), "item_id") == ["7001", "7003"]
    with pytest.raises(ScoringError, match=r"row 0: True is not an id"):
        id_strings(pd.DataFrame({"user_id": [True]}), "user_id")


def test_a_new_champion_is_picked_up_without_restart(served):
    from semalign.config import Settings
    from semalign.deploy.registry import Registry

    env = served["env"]
    reg = Registry(Settings(home=served["home"]))
    others = [v for v in reg.client.search_model_versions(f"name='{reg.name}'")
              if str(v.version) != served["first"]["model_version"]]
    if not others:  # run alone: make a second version (drifted input, so the gate keeps it a challenger)
        drift = served["root"] / "drift-serve"
        drift.mkdir(exist_ok=True)
        (drift / "items.csv").write_bytes((served["shop"] / "items.csv").read_bytes())
        ev = pd.read_csv(served["shop"] / "interactions.csv")
        idx = np.random.default_rng(0).choice(len(ev), int(0.3 * len(ev)), replace=False)
        ev.loc[idx, "label"] = 1 - ev.loc[idx, "label"]
        ev.to_csv(drift / "interactions.csv", index=False)
        assert _cli("run", "--data", str(drift), "--json", env=env, check=False).returncode == 3  # blocked
        others = [v for v in reg.client.search_model_versions(f"name='{reg.name}'")
                  if str(v.version) != served["first"]["model_version"]]
    target = max(others, key=lambda v: int(v.version))
    second = {"model_version": str(target.version), "codebook": {"version": target.tags["codebook_version"]}}
    assert second["codebook"]["version"] != served["first"]["codebook"]["version"]
    # an item onboarded under the serving champion's codebook version survives the change of version
    kept = {"item_id": "onboarded-before-promotion", "text": "A road movie across a salt desert. Genres: Drama"}
    assert _req(served["base"] + "/items", {"items": [kept]})[0] == 200
    promoted = json.loads(_cli("promote", second["model_version"], "--json", env=env).stdout)
    assert promoted["promote"]["onboarded_items_carried"] >= 1
    deadline = time.time() + 60
    while time.time() < deadline:
        status, v = _req(served["base"] + "/version")
        if v.get("model_version") == second["model_version"]:
            break
        time.sleep(0.5)
    assert v["model_version"] == second["model_version"]
    assert v["codebook_version"] == second["codebook"]["version"]   # the ranker and its own codebook, together
    status, body = _req(served["base"] + "/score", {"user_id": "u1", "candidates": [{"item_id": "sku-1"}]})
    assert status == 200 and body["codebook_version"] == second["codebook"]["version"]
    status, body = _req(served["base"] + "/score", {"user_id": "u1", "candidates": [{"item_id": kept["item_id"]}]})
    assert status == 200 and body["items"][0]["source"] == "store", body
    _cli("rollback", env=env)
