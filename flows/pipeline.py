"""The one upstream pipeline: ingest (+ validate) -> towers -> encoder -> codebook, wired here once for every caller:
the refresh (flows/refresh.py, each stage a Prefect task), the experiment (per seed), `semantic_ids_job` (`semalign
codebook build`) and `semalign encode`. The stages themselves live in flows/semantic_ids.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from semalign.config import Settings
from semalign.progress import Reporter

# how a caller runs one stage: (name, function, *args, **kwargs) -> the function's result. The refresh runs each
# as a Prefect task under its lock; everyone else calls it
StageRunner = Callable[..., Any]


def call(name: str, fn, *args, **kwargs):
    """The plain StageRunner: runs the stage in this process, nothing around it."""
    return fn(*args, **kwargs)


STAGES = ("ingest", "towers", "encoder", "codebook")


@dataclass
class Upstream:
    """What the pipeline produced, up to the stage it was asked for (later fields stay None)."""
    ds: Any                           # semalign.data.Dataset
    split: Any = None                 # semalign.data.Split under the settings' split and seed
    feats: Any = None                 # semantic_ids.TowerFeatures
    enc: Any = None                   # semantic_ids.EncoderOutput
    cb: Any = None                    # semantic_ids.CodebookOutput
    input_verdict: Any = None         # the input suite's verdict, when it validated


def ingest_and_validate(settings: Settings, data=None):
    """The dataset and the input suite's verdict; refuses a dataset that fails it (nothing is computed from it)."""
    from semalign.flows.errors import InputValidationError
    from semalign.flows.gates import ge_root
    from semalign.flows.semantic_ids import ingest
    from semalign.validation.suites import input_suite

    ds = ingest(settings, data)
    verdict = input_suite(ds.items, ds.interactions, ge_root=ge_root(settings))
    if not verdict.passed:
        raise InputValidationError(f"input validation failed, nothing was published: {verdict.summary()}")
    return ds, verdict


def upstream(settings: Settings, data: str | Path | None = None, rep: Reporter | None = None, *,
             through: str = "codebook", encoder_parent: str | None = None, codebook_parent: str | None = None,
             move_latest: bool = False, validate: bool = False, engine=None, stage: StageRunner = call,
             ds=None, feats=None, codebook_size: dict | None = None) -> Upstream:
    """Runs ingest -> towers -> encoder -> codebook up to `through` (one of STAGES). `ds` / `feats` given are used
    as they are (the experiment embeds once for every seed). Parents ("latest", a version or None) are what a
    retrain stays stable against; `move_latest` moves the LATEST pointers to what it built. `engine` computes
    tower and encoder inference (flows/engines.py; chosen once per caller)."""
    from semalign.data import settings_split
    from semalign.flows import semantic_ids
    from semalign.flows.engines import compute_engine

    if through not in STAGES:
        raise ValueError(f"through must be one of {STAGES}, got {through!r}")
    rep = rep or Reporter(quiet=True)
    last = STAGES.index(through)
    verdict = None
    if ds is None:
        if validate:
            ds, verdict = stage("ingest", ingest_and_validate, settings, data)
        else:
            ds = stage("ingest", semantic_ids.ingest, settings, data)
    out = Upstream(ds=ds, input_verdict=verdict)
    if last < 1:
        return out
    out.split = settings_split(ds, settings)
    engine = engine or compute_engine(settings)
    out.feats = feats if feats is not None else stage("towers", semantic_ids.tower_features, settings, ds, rep,
                                                      engine=engine)
    if last < 2:
        return out
    out.enc = stage("encoder", semantic_ids.encoder_stage, settings, ds, out.split, out.feats, rep,
                    parent=encoder_parent, move_latest=move_latest, engine=engine)
    if last < 3:
        return out
    size = codebook_size or {}
    out.cb = stage("codebook", semantic_ids.codebook_stage, settings, ds, out.split, out.enc, parent=codebook_parent,
                   levels=size.get("levels"), codes=size.get("codes"), rep=rep, move_latest=move_latest)
    return out
