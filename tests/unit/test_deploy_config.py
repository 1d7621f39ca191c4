"""The compose manifest and image hold no secret and run nothing unauthenticated or as root (docker itself does
not run here; tests/integration/test_topology.py runs the same topology from PyPI and Debian services)."""
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"


def test_every_secret_comes_from_the_env_file_without_a_default():
    text = COMPOSE.read_text()
    assert ":-" not in text, "no defaults: compose must refuse to start without each secret"
    refs = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = (ROOT / "deploy" / "secrets.env.example").read_text()
    assert refs <= set(re.findall(r"^([A-Z_]+)=$", example, re.M)), "every secret is listed, empty, in the example"
    spec = yaml.safe_load(text)
    for name, svc in spec["services"].items():
        env = svc.get("environment") or {}
        for key, value in (env.items() if isinstance(env, dict) else []):
            if re.search(r"PASSWORD|SECRET|AUTH|KEY$", key) and not key.endswith("_FILE"):
                assert str(value).startswith("${"), (name, key)
            for m in re.finditer(r"://[^:/@]+:([^@]+)@", str(value)):   # credentials inside URLs
                assert m.group(1).startswith("${"), (name, key)


def test_services_authenticate_and_the_image_runs_unprivileged():
    spec = yaml.safe_load(COMPOSE.read_text())
    svc = spec["services"]
    assert "--requirepass" in " ".join(svc["redis"]["command"])
    assert "PREFECT_SERVER_API_AUTH_STRING" in svc["prefect"]["environment"]
    scoring = svc["scoring"]["environment"]
    assert scoring["SEMALIGN_SERVE_API_KEYS_FILE"] and scoring["SEMALIGN_SERVE_ALLOWED_HOSTS"]
    assert "username=scorer" in scoring["SEMALIGN_REDIS_URL"] and "//scorer:" in scoring["SEMALIGN_POSTGRES_URL"]
    assert all(p.startswith("127.0.0.1:") for p in svc["scoring"]["ports"])
    dockerfile = (ROOT / "deploy" / "scaleout" / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "deploy/secrets.env", "data"} <= set(ignored)
