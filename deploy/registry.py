"""MLflow side: one run per refresh, the registered ranker with its lineage tags, the champion/challenger
aliases, promotion and rollback as single alias moves, and the audit history of every move (state tables).

Embedded default: sqlite tracking store and local artifacts under SEMALIGN_HOME. With SEMALIGN_ARTIFACT_URI
set to s3://bucket/prefix, artifacts go to any S3-compatible endpoint through boto3 (MLFLOW_S3_ENDPOINT_URL
and the standard AWS credential chain; nothing of that is logged)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from semalign import atomic, state
from semalign.config import Settings
from semalign.errors import DamagedFileError, NotFoundError, SemalignError, UnavailableError
from semalign.feature_repo.catalogue import CodebookCatalogue
from semalign.feature_repo.repo_config import sa_url

if TYPE_CHECKING:
    import pandas as pd

CHAMPION, CHALLENGER = "champion", "challenger"
# {file: SHA-256} of a ranker folder, recorded as a model version tag when it is logged: a server verifies the files
# against it before loading them, so weights changed in the artifact store or the home are refused
DIGESTS_TAG = "ranker_sha256"
# what a version's input_key tag may name: one folder under <home>/rankers, never a path
SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
PYFUNC_CODE = Path(__file__).resolve().parent / "ranker_model.py"
TOKENIZER_CODE = Path(__file__).resolve().parent / "sid_tokenizer_model.py"
# what a logged ranker carries as its code: the modules the scoring path imports (SCORING_ROOTS and every semalign
# module they import, at module level or inside a function), and the files those modules read beside themselves
SCORING_ROOTS = ("semalign.deploy.scoring",)
PACKAGE_DATA = {"semalign.feature_repo": ("feature_store.yaml", ".feastignore", "definitions.py")}
# what the scoring path imports (a ranker reads its features from the feature store), pinned to this process's
# versions so that `mlflow models serve/predict` builds the environment the model was logged and tested in
SCORING_DISTRIBUTIONS = ("torch", "numpy", "pandas", "pyarrow", "safetensors", "pydantic-settings",
                         "feast[redis,postgres]", "sqlalchemy", "mlflow")


def scoring_requirements() -> list[str]:
    """`name==version` of every distribution the logged ranker needs to score, as installed here (a local build
    label such as torch's `+cpu` is dropped: the installing machine's index decides the build)."""
    from importlib.metadata import version

    reqs = []
    for dist in SCORING_DISTRIBUTIONS:
        name = dist.split("[", 1)[0]
        reqs.append(f"{dist}=={version(name).split('+', 1)[0]}")
    return reqs


def output_only_signature(column: str, dtype: str):
    """A pyfunc signature with no input types: ids arrive as strings or integers (an integer-looking CSV or JSON
    column is parsed as integers, which MLflow refuses where a signature says string); the models' `predict`
    checks their columns and turns each id into its string (deploy/ranker_model.py)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(outputs=Schema([ColSpec(dtype, column)]))


# the settings that point a loading process at a feature store (SEMALIGN_* variables; README "Refresh, registry
# and gates")
STORE_SETTINGS = ("home", "state_url", "feast_project", "feast_online", "feast_offline", "feast_registry",
                  "redis_url", "postgres_url")


def store_environment(settings: Settings) -> dict[str, str]:
    """SEMALIGN_* variables under which a process that loads a logged ranker reads this feature store."""
    return {f"SEMALIGN_{name.upper()}": str(getattr(settings, name)) for name in STORE_SETTINGS
            if getattr(settings, name) is not None}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _module_file(name: str) -> Path | None:
    """The source file of a semalign module, found without importing it (None: not a module, e.g. a class)."""
    import importlib.util

    parent = name.rpartition(".")[0]
    if parent:
        holder = _module_file(parent)
        if holder is None or holder.name != "__init__.py":
            return None  # only a package holds modules (asking importlib would import the parent module)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _imported(name: str, path: Path) -> set[str]:
    """The semalign modules one module names in its imports (anywhere in it: lazy imports count)."""
    import ast

    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for n in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(n, ast.Import):
            out.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:  # relative: from the module's package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - (n.level - 1)]
                base = ".".join(parts + ([n.module] if n.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in n.names)  # `from pkg import module`
    return {m for m in out if m == "semalign" or m.startswith("semalign.")}


def scoring_modules(roots: tuple[str, ...] = SCORING_ROOTS) -> dict[str, Path]:
    """{module: source file} of every semalign module the scoring path can import: the roots and, transitively,
    every semalign module they import (a static scan, so imports inside functions count), with the packages
    that hold them."""
    found: dict[str, Path] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name)
        if path is None:  # a name imported from a module, not a module
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:k]) for k in range(1, len(parts))]  # the packages above it
        todo += sorted(_imported(name, path))
    return dict(sorted(found.items()))


def package_code(dest: Path) -> Path:
    """The semalign modules the scoring path imports (`scoring_modules`), in their import layout (models/ as
    semalign/models, ...), copied from wherever this process imports them (an editable checkout or an installed
    wheel), for a logged model's `code_paths`: a fresh environment then needs no semalign distribution, which no
    package index serves. Nothing else travels: not the CLI, the flows or the validation suites. Returns
    dest/semalign."""
    import shutil

    root = Path(dest) / "semalign"
    for name, src in scoring_modules().items():
        out = root.joinpath(*name.split(".")[1:], "__init__.py") if src.name == "__init__.py" \
            else root.joinpath(*name.split(".")[1:]).with_suffix(".py")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
        if src.name == "__init__.py":
            for extra in PACKAGE_DATA.get(name, ()):
                shutil.copy2(src.parent / extra, out.parent / extra)
    return root


def ranker_requirements(ranker_dir: Path) -> dict:
    """What a logged ranker needs from the feature store, for its MLmodel metadata: the codebook version and the
    user-feature snapshot it reads, the Feast project, and how a loading process is pointed at the store."""
    meta = json.loads((Path(ranker_dir) / "ranker.json").read_text())
    return {"codebook_version": meta.get("codebook_version"), "users_version": meta.get("users_version"),
            "encoder_version": meta.get("encoder_version"), "feast_project": meta.get("feast_project"),
            "variant": (meta.get("config") or {}).get("variant"),
            "feature_store": "SEMALIGN_HOME (embedded stores) or SEMALIGN_FEAST_ONLINE / _OFFLINE / _REGISTRY with "
                             "SEMALIGN_REDIS_URL / SEMALIGN_POSTGRES_URL, in the loading process's environment"}


def file_digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """{file name relative to the folder: SHA-256 hex} of every file under it."""
    folder = Path(folder)
    return {f.relative_to(folder).as_posix(): file_digest(f) for f in sorted(folder.rglob("*")) if f.is_file()}


def verify_folder(folder: Path, recorded: dict[str, str] | None, what: str) -> None:
    """Refuses (DamagedFileError naming the file) a ranker folder whose files differ from the digests recorded when
    it was logged, lack one of the files scoring reads, or have no digests recorded at all."""
    from semalign.deploy.scoring import RANKER_FILES

    folder = Path(folder)
    if not recorded:
        raise DamagedFileError(folder, f"{folder}: {what} records no SHA-256 digests of its files (logged before "
                               "they were recorded): refusing to load weights nothing vouches for; `semalign vouch "
                               "VERSION` records them from the artifact store, or a refresh logs a new version")
    unrecorded = [f for f in RANKER_FILES if f not in recorded]
    if unrecorded:
        raise DamagedFileError(folder, f"{folder}: the digests {what} records leave out {unrecorded}: refusing it")
    for name, digest in sorted(recorded.items()):
        path = (folder / name).resolve()
        if not path.is_relative_to(folder.resolve()):
            raise DamagedFileError(folder, f"{folder}: {what} records a digest for '{name[:100]}', outside its folder")
        if not path.is_file():
            raise DamagedFileError(path, f"{folder / name}: missing, though {what} records its digest")
        found = file_digest(path)
        if found != digest:
            raise DamagedFileError(path, f"{folder / name}: SHA-256 {found[:16]}... is not the {digest[:16]}... "
                                   f"{what} recorded when it was logged: the file changed since; refusing to load "
                                   "it (remove the folder to fetch the logged files again)")


class RegistryError(SemalignError, RuntimeError):
    """A registry operation that cannot be done as asked (no champion, MLflow unreachable)."""


class UnknownModelVersionError(RegistryError, NotFoundError):
    http_status = 404


class RegistryUnavailableError(RegistryError, UnavailableError):
    """The tracking server / model registry cannot be reached or fails to answer."""


class ChampionRecordError(RegistryError):
    """What the champion's run logged (its reference profile, its evaluation) cannot be read."""


class DanglingAliasError(RegistryError):
    """An alias names a model version that does not exist (deleted, or the registry restored without it): not
    the same as no champion yet, and nothing to serve or compare against until the alias is set again."""

    def __init__(self, name: str, alias: str, version: str):
        self.alias, self.version = alias, version
        super().__init__(f"the alias '{alias}' of model '{name}' points at version {version}, which does not exist "
                         f"(deleted?); `semalign promote VERSION` (or `rollback`) sets it to a live version")



def _safe_uri(uri: str) -> str:
    """A database URI with its password masked, for printing."""
    if "://" in uri and "@" in uri.split("://", 1)[1]:
        try:
            return sa.engine.make_url(uri).render_as_string(hide_password=True)
        except Exception:
            return uri.split("://", 1)[0] + "://***"
    return uri


# the MLflow database schema (alembic revision) the direct alias read below was checked against: MLflow 3.17's
# (tests/integration/test_status_direct.py pins it to what the installed MLflow writes); any other revision, a
# tracking server or a store that cannot be read that way goes through MLflow's client
MLFLOW_SCHEMA = "dc11669786a5"


@dataclass(frozen=True)
class VersionRow:
    """What `status` reads of a registered model version (MLflow's ModelVersion has these fields too)."""
    version: str
    run_id: str | None
    tags: dict


class RegistryView:
    """The read side of the registry that `semalign status` needs: the champion and challenger, the audit history,
    the store's current codebook. It reads the aliases from MLflow's own tables where the tracking store is the
    embedded sqlite database (or another SQL database) of the schema it was checked against, so a status check
    imports neither MLflow nor what MLflow pulls in; otherwise, and on any doubt, through MLflow's client
    (`Registry`, which extends this)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.name = settings.model_name
        self.project = settings.feast_project
        settings.home.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = settings.resolved_tracking_uri()
        self.artifact_uri = settings.resolved_artifact_uri()
        self.state = state.engine(settings.resolved_state_url())
        # the store's current-codebook pointer moves with promotions, through its only owner
        self.catalogue = CodebookCatalogue(self.state, self.project)
        self._aliases, self._client_side = None, None

    def version_by_alias(self, alias: str):
        if self._aliases is None:
            self._aliases = self._read_aliases()
            if self._aliases is None:  # not readable directly: MLflow's client answers
                self._client_side = Registry(self.settings)
        if self._client_side is not None:
            return self._client_side.version_by_alias(alias)
        found = self._aliases.get(alias)
        if isinstance(found, DanglingAliasError):
            raise found
        return found

    def _read_aliases(self) -> dict[str, VersionRow | DanglingAliasError] | None:
        """{alias: version} of this model from MLflow's tables (an alias naming a version that is gone: the error
        to raise when it is asked for), or None where they cannot be read directly."""
        uri = self.tracking_uri
        if not uri.startswith(("sqlite:///", "postgresql")) or os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() \
                in ("1", "true"):
            return None
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
            return None  # MLflow's client creates the database
        eng = None
        try:
            eng = sa.create_engine(sa_url(uri) if uri.startswith("postgresql://") else uri)
            with eng.connect() as c:
                if c.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() != MLFLOW_SCHEMA:
                    return None
                rows = c.execute(sa.text(
                    "SELECT a.alias, a.version, v.run_id, v.current_stage FROM registered_model_aliases a "
                    "LEFT JOIN model_versions v "
                    "ON v.name = a.name AND v.version = a.version AND v.workspace = a.workspace "
                    "WHERE a.name = :name AND a.workspace = 'default'"),
                    {"name": self.name}).all()
                out = {}
                for alias, version, run_id, stage in rows:
                    if stage is None or stage == "Deleted_Internal":
                        out[alias] = DanglingAliasError(self.name, alias, str(version))
                        continue
                    tags = c.execute(sa.text("SELECT key, value FROM model_version_tags WHERE name = :name AND "
                                             "version = :version AND workspace = 'default'"),
                                     {"name": self.name, "version": version}).all()
                    out[alias] = VersionRow(str(version), run_id, dict(tags))
                return out
        except (sa.exc.SQLAlchemyError, ImportError):  # no such table, a driver missing: the client decides
            return None
        finally:
            if eng is not None:
                eng.dispose()

    def history(self, actions: tuple = ("promote", "rollback", "set_current", "gate", "unlock"),
                limit: int = 50) -> list[dict]:
        a = state.audit
        with self.state.connect() as c:
            rows = c.execute(sa.select(a).where(a.c.project == self.project, a.c.action.in_(actions))
                             .order_by(a.c.id.desc()).limit(limit))
            return [dict(r._mapping) for r in rows]

    def status(self) -> dict:
        warnings = []

        def live(alias: str):  # a dangling alias is reported, not mistaken for "none yet"
            try:
                return self.version_by_alias(alias)
            except DanglingAliasError as e:
                warnings.append(str(e))
                return None

        champ, chall = live(CHAMPION), live(CHALLENGER)
        moves = self.history(actions=("promote", "rollback"))
        since = next((m for m in moves if champ and m["to_value"] == str(champ.version)), None)
        gate = next(iter(self.history(actions=("gate",), limit=1)), None)
        current = self.catalogue.current()

        def desc(mv):
            if mv is None:
                return None
            return {"version": str(mv.version), "run_id": mv.run_id, **{k: mv.tags.get(k) for k in
                    ("codebook_version", "encoder_version", "data_hash", "feature_service")}}

        out = {"model": self.name, "champion": desc(champ), "challenger": desc(chall),
               "champion_since": since["at"] if since else None, "champion_reason": since["reason"] if since else None,
               "current_codebook": current,
               "last_gate": json.loads(gate["reason"]) | {"version": gate["subject"].split("/")[-1], "at": gate["at"]}
               if gate else None,
               "tracking_uri": _safe_uri(self.tracking_uri), "artifact_uri": self.artifact_uri}
        if champ is not None and current and champ.tags.get("codebook_version") not in (None, current):
            warnings.append(f"the store's current codebook {current} is not the champion's "
                            f"{champ.tags.get('codebook_version')}; `semalign promote {champ.version}` repairs it")
        if warnings:
            out["warning"] = "; ".join(warnings)
        return out


class Registry(RegistryView):
    def __init__(self, settings: Settings):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # an unreachable tracking server fails a call in ~10 s (3 retries, 1-2-4 s backoff), not minutes
        for k, v in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                     "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}.items():
            os.environ.setdefault(k, v)
        import logging
        import warnings

        warnings.filterwarnings("ignore", message=".*(type hints|input example).*", category=UserWarning)
        import mlflow
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # after import: MLflow sets up its own loggers
            logging.getLogger(name).setLevel(logging.WARNING)

        super().__init__(settings)
        mlflow.set_tracking_uri(self.tracking_uri)
        self.mlflow = mlflow
        self.client = MlflowClient(self.tracking_uri)
        exp = self.client.get_experiment_by_name(settings.mlflow_experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(settings.mlflow_experiment,
                                                                   artifact_location=self.artifact_uri)
            except Exception:  # created by a concurrent process
                self.experiment_id = self.client.get_experiment_by_name(settings.mlflow_experiment).experiment_id
        else:
            self.experiment_id = exp.experiment_id

    # ------------------------------------------------------------------ lookups
    def version_by_alias(self, alias: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException as e:
            self._absent_or_raise(e)
        try:  # no such alias, or one naming a version that is gone
            version = self.client.get_registered_model(self.name).aliases.get(alias)
        except MlflowException as e:  # no such model yet
            self._absent_or_raise(e)
            return None
        if version is not None:
            raise DanglingAliasError(self.name, alias, str(version))
        return None

    def _absent_or_raise(self, e) -> None:
        """An MLflow answer that something does not exist passes; anything else (the tracking server unreachable, a
        server error) is RegistryUnavailableError, never read as "no such model"."""
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryUnavailableError(f"the model registry at {_safe_uri(self.tracking_uri)} cannot answer: "
                                           f"{str(e).splitlines()[0][:300]}") from e

    def version_by_input(self, input_key: str):
        """A registered version trained on exactly these inputs (so a rerun retrains nothing)."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{self.name}' and tags.input_key='{input_key}'")
        except MlflowException:
            return None
        return max(found, key=lambda v: int(v.version)) if found else None

    def get_version(self, version: str | int):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as e:
            raise UnknownModelVersionError(f"model '{self.name}' has no version {version}") from e

    def download_ranker(self, mv, dest: Path | None = None) -> Path:
        """The ranker folder of a registered version (default: `ranker_folder(mv)`, the home's copy; `dest`: a
        folder the caller chose), fetched from whatever artifact store holds it unless already there, its files
        verified against the digests recorded when it was logged. A version whose tags would name a path is refused
        whatever `dest` is."""
        import shutil

        from mlflow.artifacts import download_artifacts

        home_copy = self.ranker_folder(mv)  # refuses a version whose input_key tag names a path, whatever dest is
        dest = home_copy if dest is None else Path(dest)
        if not (dest / "ranker.json").exists():
            tmp = atomic.temp_sibling(dest)
            path = download_artifacts(artifact_uri=f"models:/{self.name}/{mv.version}", dst_path=str(tmp),
                                      tracking_uri=self.tracking_uri)
            found = next(Path(path).rglob("ranker.json")).parent
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(found, dest)
            shutil.rmtree(tmp, ignore_errors=True)
        verify_folder(dest, self.recorded_digests(mv), f"model version {mv.version}")
        return dest

    def ranker_folder(self, mv) -> Path:
        """Where the home keeps a version's ranker: <home>/rankers/<its input_key tag, or v<version>>. A tag that is
        not one plain folder name (a path, '..', an absolute path) is refused: tags choose no server paths."""
        key = mv.tags.get("input_key") or f"v{mv.version}"
        if not SAFE_KEY.fullmatch(key) or key in (".", ".."):
            raise DamagedFileError(self.settings.home / "rankers", f"model version {mv.version}'s input_key tag "
                                   f"'{key[:100]}' is not a folder name (letters, digits, '.', '_', '-'): refusing to "
                                   f"load a ranker from outside {self.settings.home / 'rankers'}")
        return self.settings.home / "rankers" / key

    @staticmethod
    def recorded_digests(mv) -> dict[str, str] | None:
        """The {file: SHA-256} a version recorded at logging (None: none, or unreadable)."""
        try:
            found = json.loads(mv.tags.get(DIGESTS_TAG) or "null")
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    # ------------------------------------------------------------------ logging
    def log_refresh(self, *, params: dict, metrics: dict, tags: dict, ranker_dir: Path, artifacts: dict[str, Path],
                    json_artifacts: dict[str, dict], input_key: str, sid_bundle: Path | None = None,
                    input_example: pd.DataFrame | None = None) -> tuple[str, str]:
        """One MLflow run for a refresh: params, metrics, artifacts, the pyfunc ranker registered as a new model
        version tagged with its lineage and aliased `challenger`. The ranker carries semalign's code and pinned
        requirements, so `mlflow models serve/predict` can build its environment from MLflow alone;
        `input_example` (user_id, item_id rows it can score) is saved with it and scored once at logging time,
        which checks the model loads and reads its features. Returns (run_id, version)."""
        import tempfile

        mlflow = self.mlflow
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=f"refresh-{time.strftime('%Y%m%d-%H%M%S')}") as run:
            mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and v == v})
            mlflow.set_tags({**tags, "input_key": input_key})
            for path, src in artifacts.items():
                src = Path(src)
                if src.is_dir():
                    mlflow.log_artifacts(str(src), artifact_path=path)
                elif src.exists():
                    mlflow.log_artifact(str(src), artifact_path=path)
            for name, body in json_artifacts.items():
                mlflow.log_dict(body, name)
            sig = output_only_signature("score", "double")
            if sid_bundle is not None:  # the second registered model, first: a failure leaves no ranker version
                self._log_sid_bundle(sid_bundle, tags.get("codebook_version"))
            # MLflow scores the input example in this process once logged: against this refresh's store
            with tempfile.TemporaryDirectory() as code, environment(store_environment(self.settings)):
                info = mlflow.pyfunc.log_model(name="ranker", python_model=str(PYFUNC_CODE),
                                               artifacts={"ranker": str(ranker_dir)}, signature=sig,
                                               input_example=input_example, code_paths=[str(package_code(code))],
                                               metadata={"semalign": ranker_requirements(ranker_dir)},
                                               pip_requirements=scoring_requirements())
            run_id = run.info.run_id
            mv = self._register(info, self.name)
        digests = json.dumps(folder_digests(ranker_dir), sort_keys=True, separators=(",", ":"))
        for k, v in {**tags, "input_key": input_key, DIGESTS_TAG: digests}.items():
            self.client.set_model_version_tag(self.name, mv, k, str(v))
        self.client.set_registered_model_alias(self.name, CHALLENGER, mv)
        return run_id, mv

    @property
    def tokenizer_name(self) -> str:
        return f"{self.name}-sid-tokenizer"

    def _log_sid_bundle(self, bundle: Path, codebook_version: str | None) -> None:
        import numpy as np
        import pandas as pd
        import torch

        sig = output_only_signature("sid", "string")
        info = self.mlflow.pyfunc.log_model(
            name="sid_tokenizer", python_model=str(TOKENIZER_CODE), artifacts={"bundle": str(bundle)}, signature=sig,
            metadata={"semalign": {"codebook_version": codebook_version}},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"pandas=={pd.__version__}", f"mlflow=={self.mlflow.__version__}"])
        version = self._register(info, self.tokenizer_name)
        if codebook_version:
            self.client.set_model_version_tag(self.tokenizer_name, version, "codebook_version", codebook_version)

    def _register(self, info, name: str) -> str:
        """Registers a logged model as a new version of `name`; returns the version. MLflow prints its
        "Successfully registered / Created version" lines straight to stderr: silenced here, where semalign
        reports the version itself (logging above this call still shows MLflow's warnings)."""
        from mlflow.utils.logging_utils import disable_logging, enable_logging

        disable_logging()
        try:
            return str(self.mlflow.register_model(info.model_uri, name).version)
        finally:
            enable_logging()

    def run_artifact_json(self, run_id: str, name: str, required: bool = False) -> dict | None:
        """A JSON artifact of a run; None where it cannot be read, or, `required`, ChampionRecordError saying why
        (what a comparison with the champion needs must never read as "nothing to compare")."""
        try:
            return self.mlflow.artifacts.load_dict(f"runs:/{run_id}/{name}")
        except Exception as e:
            if required:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ChampionRecordError(f"{name} of run {run_id} cannot be read ({why})") from e
            return None

    # ------------------------------------------------------------------ alias moves
    def promote(self, version: str, reason: str, actor: str | None = None, action: str = "promote") -> dict:
        """Moves `champion` to `version` (one alias move), then the feature store's current codebook pointer to
        the version's codebook, and records both in the audit history."""
        from semalign.checkpoints import checkpoint

        mv = self.get_version(version)
        try:
            old = self.version_by_alias(CHAMPION)
            old_v = str(old.version) if old else None
        except DanglingAliasError as e:  # the alias names a version that is gone: this move repairs it
            old_v = e.version
        moved = old_v != str(version)
        if moved:
            self.client.set_registered_model_alias(self.name, CHAMPION, str(version))
            checkpoint("registry.promote.after_alias")
        cb = mv.tags.get("codebook_version")
        with self.state.begin() as c:
            if not moved and self._last_champion(c) != str(version):
                # already champion but unrecorded: a promotion stopped after the alias move; finish it
                old_v, moved, reason = self._last_champion(c), True, f"{reason} (completes an interrupted {action})"
            if moved:
                state.record(c, self.project, action, f"{self.name}@{CHAMPION}", str(version), from_value=old_v,
                             reason=reason, actor=actor)
            if cb:
                self.catalogue.move_current(c, cb, reason=f"{action} v{version}", actor=actor)
        return {"moved": moved, "champion": str(version), "previous": old_v, "codebook_version": cb}

    def _last_champion(self, conn) -> str | None:
        """The champion the audit's latest promote/rollback recorded."""
        a = state.audit
        row = conn.execute(sa.select(a.c.to_value).where(a.c.project == self.project, a.c.action.in_(
            ("promote", "rollback"))).order_by(a.c.id.desc()).limit(1)).first()
        return row[0] if row else None

    def rollback_target(self) -> str:
        """The version that was champion before the current one."""
        cur = self.version_by_alias(CHAMPION)
        if cur is None:
            raise RegistryError(f"model '{self.name}' has no champion to roll back")
        for row in self.history(actions=("promote", "rollback")):
            if row["to_value"] == str(cur.version) and row["from_value"]:
                return row["from_value"]
        raise RegistryError(f"no earlier champion of '{self.name}' in the audit history; pass --to VERSION")

    def rollback(self, to: str | None = None, reason: str = "rollback", actor: str | None = None) -> dict:
        """Champion back to `to`, or to the version that was champion before the current one."""
        return self.promote(str(to or self.rollback_target()), reason=reason, actor=actor, action="rollback")

    def vouch(self, version: str, reason: str, actor: str | None = None) -> dict:
        """Records the SHA-256 digests of a version logged before digests were (the upgrade path: such a version
        is refused until someone vouches for its files). The files are fetched from the artifact store, not the
        home's copy; a version that already records digests is refused, since re-recording would hide a change
        made after logging. Audited as 'vouch' with the digests."""
        import shutil
        import tempfile

        from mlflow.artifacts import download_artifacts

        from semalign.deploy.scoring import RANKER_FILES

        mv = self.get_version(version)
        if self.recorded_digests(mv):
            raise RegistryError(f"model version {mv.version} already records the digests of its files: nothing to "
                                "vouch for (re-recording them would hide a change made after logging)")
        tmp = Path(tempfile.mkdtemp(prefix="semalign-vouch-"))
        try:
            path = download_artifacts(artifact_uri=f"models:/{self.name}/{mv.version}", dst_path=str(tmp),
                                      tracking_uri=self.tracking_uri)
            found = next(Path(path).rglob("ranker.json"), None)
            missing = [f for f in RANKER_FILES if found is None or not (found.parent / f).is_file()]
            if missing:
                raise DamagedFileError(tmp, f"model version {mv.version}'s artifacts lack {missing}: nothing to vouch for")
            digests = folder_digests(found.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        body = json.dumps(digests, sort_keys=True, separators=(",", ":"))
        self.client.set_model_version_tag(self.name, str(mv.version), DIGESTS_TAG, body)
        with self.state.begin() as c:
            state.record(c, self.project, "vouch", f"{self.name}/{mv.version}", DIGESTS_TAG, reason=f"{reason}: {body}",
                         actor=actor)
        return {"version": str(mv.version), "digests": digests}

    def record_gate(self, version: str, verdict: dict) -> None:
        with self.state.begin() as c:
            state.record(c, self.project, "gate", f"{self.name}/{version}",
                         "passed" if verdict["passed"] else "failed", reason=json.dumps(verdict, default=float))
