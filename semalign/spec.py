"""The ranker specification: one place that turns settings into the ranker configuration, so the model
`semalign experiment` measures is exactly the one the refresh trains, logs and serves.

A catalogue can choose its own model: `semalign experiment --select` picks the variant and levers with the best
pseudo-cold validation GAUC and writes them as a spec file (`<home>/ranker_spec.json`, or SEMALIGN_RANKER_SPEC);
the served model is then that spec, for the experiment's deltas and for every refresh."""
from __future__ import annotations

import json
from pathlib import Path

from semalign.config import Settings
from semalign.errors import InvalidInputError

SPEC_KIND = "semalign.ranker_spec/1"


def selected_spec(settings: Settings) -> dict | None:
    """The spec file in force ({"kind", "model", "variant", "levers", "selection"} and, where the selected model named
    one, "codebook": {"levels", "codes"}), or None."""
    path = settings.resolved_ranker_spec()
    if path is None:
        return None
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a readable ranker spec ({e}); write one with `semalign experiment "
                                "--select` or unset SEMALIGN_RANKER_SPEC") from None
    if not isinstance(spec, dict) or spec.get("kind") != SPEC_KIND or "variant" not in spec:
        raise InvalidInputError(f"{path}: expected a ranker spec of kind {SPEC_KIND} with a variant; "
                                "write one with `semalign experiment --select`")
    return spec


def served_model(settings: Settings) -> str:
    """The served model's name as the experiment writes models ('variant' or 'variant@lever=value+...')."""
    spec = selected_spec(settings)
    return spec["model"] if spec else settings.ranker_variant


def ranker_config(settings: Settings, variant: str | None = None, seed: int | None = None, **overrides):
    """RankerConfig for `variant` (default: the served model: the selected spec, else the settings' variant) under
    the settings' levers. Levers apply where the variant has the parts they act on (the generated cold behavior
    view needs `full`'s SIDs). The raw content beside the aligned vector is the item's text-tower vector, which
    the feature store serves with it."""
    from semalign.models.ranker import RankerConfig

    spec = selected_spec(settings) if variant is None else None
    variant = variant or (spec["variant"] if spec else settings.ranker_variant)
    cfg = dict(variant=variant, seed=settings.seed if seed is None else seed,
               keep_raw_content=settings.ranker_raw_content,
               id_dropout=settings.ranker_id_dropout, max_epochs=settings.ranker_epochs,
               cold_behavior=settings.ranker_cold_behavior if variant == "full" else "oov",
               distill_weight=settings.ranker_distill_weight, id_buckets=settings.ranker_id_buckets)
    if spec:
        cfg.update(spec.get("levers", {}))
        if "hidden" in cfg:
            cfg["hidden"] = tuple(cfg["hidden"])
    cfg.update(overrides)
    try:
        out = RankerConfig(**cfg)
    except (TypeError, ValueError) as e:
        where = f" (spec {settings.resolved_ranker_spec()})" if spec else ""
        raise InvalidInputError(f"ranker specification{where}: {e}") from None
    if settings.serving_profile == "compact" and variant not in COMPACT_VARIANTS:
        raise InvalidInputError(f"serving profile 'compact' serves SID codes only, and ranker variant '{variant}' "
                                f"reads float vectors: set SEMALIGN_RANKER_VARIANT to one of {COMPACT_VARIANTS} "
                                "(or SEMALIGN_SERVING_PROFILE=dense)")
    return out


COMPACT_VARIANTS = ("sid",)   # rankers whose items are their codes: all the compact profile serves


def write_selection(settings: Settings, result: dict, path: Path | None = None) -> dict:
    """Picks the model with the best mean pseudo-cold validation GAUC of an experiment result (never a test
    figure; under the compact profile only models it can serve), and writes it as the spec the refresh trains.
    Returns the spec written."""
    import numpy as np

    from semalign.flows.experiment import parse_model

    fits = result.get("fits", [])
    allowed = [m for m in result["models"]
               if settings.serving_profile != "compact" or parse_model(m)[0] in COMPACT_VARIANTS]
    table = {}
    for m in allowed:
        vals = [f["val_cold_gauc"] for f in fits if f["model"] == m and f.get("val_cold_gauc") is not None]
        if vals:
            table[m] = {"val_cold_gauc": float(np.mean(vals)), "seeds": len(vals)}
    if not table:
        raise InvalidInputError("no model of this experiment has a pseudo-cold validation GAUC to select on "
                                "(too few pseudo-cold validation items?)" +
                                (" among the compact profile's variants" if len(allowed) < len(result["models"])
                                 else ""))
    best = max(table, key=lambda m: table[m]["val_cold_gauc"])
    variant = parse_model(best)[0]
    # the whole configuration the experiment trained it with (levers from the name and the run's options, the
    # bounded table's rows for this catalogue), but the seed, which stays the refresh's own
    levers = {k: v for k, v in result["configs"][best].items() if k not in ("variant", "seed", "codebook")}
    spec = {"kind": SPEC_KIND, "model": best, "variant": variant, "levers": levers,
            # a codebook size the model named: every refresh builds its codebooks at it (Settings reads it)
            **({"codebook": result["configs"][best]["codebook"]} if "codebook" in result["configs"][best] else {}),
            "selection": {"dataset": result.get("dataset"), "split": result.get("split"), "seeds": result.get("seeds"),
                          "rule": "best mean pseudo-cold validation GAUC", "validation": table}}
    path = Path(path or settings.ranker_spec or settings.home / "ranker_spec.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec, indent=2, default=float))
    tmp.replace(path)
    return {**spec, "path": str(path)}
