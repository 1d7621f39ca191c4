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
    refs = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    example = (ROOT / "deploy" / "secrets.env.example").read_text()
    assert refs <= set(re.findall(r"^([A-Z0-9_]+)=$", example, re.M)), "every secret is listed, empty, in the example"
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


def _services():
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _refs(value) -> set[str]:
    """The secrets a value (or a whole environment) draws from deploy/secrets.env."""
    return set(re.findall(r"\$\{([A-Z0-9_]+):\?", str(value)))


def test_every_container_is_pinned_restarted_gated_and_runs_hardened():
    svc = _services()
    base = re.findall(r"^FROM\s+(\S+)", (ROOT / "deploy" / "scaleout" / "Dockerfile").read_text(), re.M)
    for name, s in svc.items():
        image = s.get("image") or base[-1]   # semalign's own: built from the Dockerfile's base
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert re.search(r"\d+\.\d+|RELEASE\.\d{4}", tag) and tag != "latest", (name, image)
        assert s.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert s.get("read_only") is True and s.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in s.get("security_opt", []), name
        for dep, how in (s.get("depends_on") or {}).items():   # a mapping: each dependency with its condition
            assert how["condition"] in ("service_healthy", "service_completed_successfully"), (name, dep)
            if how["condition"] == "service_healthy":
                assert "healthcheck" in svc[dep], (name, dep)


def test_the_scoring_service_holds_only_read_only_scoped_credentials():
    svc = _services()
    env = svc["scoring"]["environment"]
    assert not any(k.startswith("PREFECT_") for k in env), "no Prefect credentials in the scorer"
    root = {"S3_ACCESS_KEY", "S3_SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD", "PREFECT_AUTH"}
    holders = {name for name, s in svc.items() if _refs(s.get("environment")) & {"S3_ACCESS_KEY", "S3_SECRET_KEY"}}
    assert holders == {"s3", "s3-init"}, "only MinIO and its init job hold the object store's root keys"
    assert not _refs(env) & root
    assert _refs(env["AWS_ACCESS_KEY_ID"]) == {"S3_SCORER_ACCESS_KEY"}
    # the registry read from MLflow's database as `scorer`, not through the MLflow server (which could move aliases)
    assert env["SEMALIGN_MLFLOW_TRACKING_URI"].startswith("postgresql+psycopg://scorer:")
    assert all("//scorer:" in env[k] for k in ("SEMALIGN_POSTGRES_URL", "SEMALIGN_STATE_URL"))
    assert "username=scorer" in env["SEMALIGN_REDIS_URL"]
    acl = " ".join(svc["redis"]["command"]).split("--user scorer", 1)[1]
    assert "'%R~*'" in acl and "'~semalign:rate:*'" in acl and "+@all" not in acl and "-@dangerous" in acl
    # its writable volume is its own; the worker's is mounted read-only
    mounts = {name: [v.split(":") for v in s.get("volumes", [])] for name, s in svc.items()}
    for vol, *opts in mounts["scoring"]:
        if "ro" not in opts:
            assert all(vol != v[0] for name, m in mounts.items() if name != "scoring" for v in m), vol
    assert ["semalign", "/var/lib/semalign", "ro"] in mounts["scoring"]


def test_mlflow_stays_internal_and_each_system_has_its_own_database_role():
    spec = yaml.safe_load(COMPOSE.read_text())
    svc = spec["services"]
    assert spec["networks"]["backend"].get("internal") is True
    for name, s in svc.items():   # only the scoring service publishes a port, and only it reaches beyond backend
        assert ("ports" in s) == (name == "scoring") and (set(s["networks"]) - {"backend"}) <= ({"edge"} if name == "scoring" else set())
    assert "--allowed-hosts" in " ".join(svc["mlflow"]["command"])
    superuser = svc["postgres"]["environment"]["POSTGRES_USER"]
    users = {"mlflow": re.search(r"postgresql\+psycopg://(\w+):", " ".join(svc["mlflow"]["command"])).group(1),
             "prefect": re.search(r"://(\w+):", svc["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]).group(1),
             "worker": re.search(r"://(\w+):", svc["worker"]["environment"]["SEMALIGN_STATE_URL"]).group(1)}
    assert superuser not in users.values() and len(set(users.values())) == 3, users
    init = (ROOT / "deploy" / "scaleout" / "init-db.sh").read_text()
    created = set(re.findall(r"CREATE ROLE (\w+) LOGIN", init))
    assert set(users.values()) | {"scorer"} <= created and "SUPERUSER" not in init.upper().replace("THE SUPERUSER", "")
    for db, owner in (("mlflow", users["mlflow"]), ("prefect", users["prefect"])):
        assert f"CREATE DATABASE {db} OWNER {owner};" in init
    assert f"ALTER DATABASE semalign OWNER TO {users['worker']};" in init
