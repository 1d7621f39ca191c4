"""What the server loads is what was logged (issue 32, item 5): a ranker's files are verified against the SHA-256
digests recorded when it was logged, a version's tags name no server path, and a server starts without MLflow on
the champion its home last served (verified the same way), saying it is degraded. Real files and registry of the
session's refreshed home; each test puts back what it changed."""
from __future__ import annotations

import json

import pytest

from semalign.config import Settings

ONE = {"user_id": "u1", "candidates": [{"item_id": "sku-1"}]}


def _champion(home):
    from semalign.deploy.registry import CHAMPION, Registry

    reg = Registry(Settings(home=home))
    return reg, reg.version_by_alias(CHAMPION)


def test_weights_changed_after_logging_are_refused_even_in_a_valid_file(refreshed, tmp_path):
    from safetensors.torch import load_file, save_file

    from semalign.deploy.champion import ChampionHolder
    from semalign.deploy.registry import DIGESTS_TAG
    from semalign.errors import DamagedFileError

    reg, mv = _champion(refreshed["home"])
    assert set(json.loads(mv.tags[DIGESTS_TAG])) >= {"ranker.safetensors", "ranker.json", "vocab.json"}
    weights = reg.download_ranker(mv) / "ranker.safetensors"   # the home's copy, verified
    original = weights.read_bytes()
    save_file({k: -v for k, v in load_file(str(weights)).items()}, str(weights))   # loads fine, scores inverted
    try:
        holder = ChampionHolder(Settings(home=refreshed["home"]), check_interval_s=3600)
        holder.check()
        assert holder.served is None
        assert "ranker.safetensors" in holder.error and "SHA-256" in holder.error and "refusing" in holder.error
        with pytest.raises(DamagedFileError, match="changed since"):
            reg.download_ranker(mv)
    finally:
        weights.write_bytes(original)
    # the artifact store's copy is untouched: fetched elsewhere, it verifies
    assert reg.download_ranker(mv, tmp_path / "fetched").name == "fetched"


def test_a_version_tag_naming_a_path_is_refused(refreshed, tmp_path):
    import shutil

    from semalign.deploy.champion import ChampionHolder
    from semalign.errors import DamagedFileError

    reg, mv = _champion(refreshed["home"])
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(reg.download_ranker(mv), elsewhere)   # the very same files, outside the home
    key = mv.tags["input_key"]
    try:
        for tag in (str(elsewhere), f"../../{tmp_path.name}/elsewhere"):
            reg.client.set_model_version_tag(reg.name, mv.version, "input_key", tag)
            tagged = reg.get_version(mv.version)
            with pytest.raises(DamagedFileError, match="is not a folder name"):
                reg.download_ranker(tagged, tmp_path / "any")
            holder = ChampionHolder(Settings(home=refreshed["home"]), check_interval_s=3600)
            holder.check()
            assert holder.served is None and "is not a folder name" in holder.error
    finally:
        reg.client.set_model_version_tag(reg.name, mv.version, "input_key", key)


def test_serving_starts_without_mlflow_on_what_the_home_last_served(refreshed, monkeypatch):
    from fastapi.testclient import TestClient

    from conftest import free_port
    from semalign.deploy.champion import ChampionHolder
    from semalign.deploy.serve import create_app

    home = refreshed["home"]
    holder = ChampionHolder(Settings(home=home), check_interval_s=3600)
    holder.check()   # a server that reached the registry once: the home records what it served
    assert holder.error is None
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down = Settings(home=home, mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")   # nothing listens there
    app = create_app(down, check_interval_s=3600)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        status, health = client.get("/health").status_code, client.get("/health").json()
        assert status == 200 and health["model_version"] == holder.served.model_version
        assert health["status"] == "degraded" and "registry cannot be reached" in health["error"]
        champion = app.state.service.champion
        assert champion.degraded and champion.error.startswith("degraded: the registry cannot be reached")
        scored = client.post("/score", json=ONE)
        assert scored.status_code == 200 and scored.json()["model_version"] == holder.served.model_version


def test_a_version_logged_before_digests_is_refused_until_someone_vouches_for_it(refreshed, tmp_path):
    """The upgrade path: a home whose champion was logged before digests were recorded."""
    from typer.testing import CliRunner

    from semalign.cli import app
    from semalign.deploy.registry import DIGESTS_TAG, RegistryError
    from semalign.errors import DamagedFileError

    reg, mv = _champion(refreshed["home"])
    recorded = mv.tags[DIGESTS_TAG]
    reg.client.delete_model_version_tag(reg.name, mv.version, DIGESTS_TAG)
    try:
        with pytest.raises(DamagedFileError, match="semalign vouch"):
            reg.download_ranker(reg.get_version(mv.version), tmp_path / "before")
        out = CliRunner().invoke(app, ["vouch", str(mv.version), "--home", str(refreshed["home"]), "--json",
                                       "--reason", "logged by semalign before digests"])
        assert out.exit_code == 0, out.output
        assert json.loads(reg.get_version(mv.version).tags[DIGESTS_TAG]) == json.loads(recorded)  # same files
        assert reg.download_ranker(reg.get_version(mv.version), tmp_path / "after").name == "after"
        last = reg.history(actions=("vouch",))[0]
        assert last["subject"].endswith(f"/{mv.version}") and "before digests" in last["reason"]
        with pytest.raises(RegistryError, match="already records"):  # re-recording would hide a later change
            reg.vouch(str(mv.version), reason="again")
    finally:
        reg.client.set_model_version_tag(reg.name, mv.version, DIGESTS_TAG, recorded)
