"""The specification: encoder, codebook and ranker settings of the served model in one object (`Specification`), so
the model `semalign experiment` measures is exactly the one the refresh trains, logs and serves. Every trained ranker
has it beside it as `spec.json` (and its MLflow run as the artifact `spec.json`, params `encoder.*`, `codebook.*`,
`ranker.*`).

A catalogue can choose its own model: `semalign experiment --select` picks the variant and levers with the best
pseudo-cold validation GAUC and writes its specification (`<home>/ranker_spec.json`, or SEMALIGN_RANKER_SPEC); the
served model is then that spec, for the experiment's deltas and for every refresh. Without one, the settings name it:
SEMALIGN_RANKER_VARIANT and SEMALIGN_RANKER_LEVERS ('lever=value+...', the experiment's model syntax)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from semalign.config import Settings
from semalign.errors import InvalidInputError

SPEC_KIND = "semalign.spec/1"
OLD_SPEC_KIND = "semalign.ranker_spec/1"   # ranker only (variant + levers), still read
# the settings each upstream part of the specification takes its fields from (the seed is the run's own)
SETTINGS_OF = {
    "encoder": {"hidden": "encoder_hidden", "out_dim": "embed_dim", "epochs": "encoder_epochs",
                "batch_size": "encoder_batch", "lr": "encoder_lr", "content_weight": "encoder_content_weight",
                "hard_negative_share": "encoder_hard_negative_share"},
    "codebook": {"method": "codebook_method", "levels": "codebook_levels", "codes": "codebook_codes",
                 "iters": "kmeans_iters"},
}


@dataclass(frozen=True)
class Specification:
    """Encoder, codebook and ranker settings of one served model, as one object. `codebook["codes"]` is None
    until a codebook is built (sized to the catalogue), then that codebook's own count (`with_codebook`): the
    count the ranker's code tables get. The experiment measures and the refresh trains exactly this."""
    model: str                 # its name as the experiment writes models ('variant' or 'variant@lever=value+...')
    encoder: dict              # EncoderConfig fields but the tower dimensions, which come from the towers
    codebook: dict             # method, levels, codes, iters, seed
    ranker: "object"           # models.ranker.RankerConfig

    def encoder_config(self, text_dim: int, image_dim: int):
        from semalign.models.encoder import EncoderConfig

        return EncoderConfig(text_dim=text_dim, image_dim=image_dim, **self.encoder)

    def with_codebook(self, codebook) -> "Specification":
        """This specification with the size of the codebook its SIDs come from (a models.codebook.Codebook)."""
        return replace(self, codebook={**self.codebook, "levels": int(codebook.levels), "codes": int(codebook.codes)})

    def as_dict(self) -> dict:
        ranker = asdict(self.ranker)
        return {"kind": SPEC_KIND, "model": self.model, "encoder": dict(self.encoder),
                "codebook": dict(self.codebook), "ranker": {**ranker, "hidden": list(ranker["hidden"])}}

    def write(self, path: Path) -> Path:
        from semalign import atomic

        atomic.write_text(Path(path), json.dumps(self.as_dict(), indent=2, default=float))
        return Path(path)


def selected_spec(settings: Settings) -> dict | None:
    """The spec file in force (written by `semalign experiment --select`: {"kind", "model", "variant", "ranker",
    "encoder", "codebook", "selection"}; files of the older kind carry "levers" for "ranker"), or None."""
    path = settings.resolved_ranker_spec()
    if path is None:
        return None
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{path}: not a readable ranker spec ({e}); write one with `semalign experiment "
                                "--select` or unset SEMALIGN_RANKER_SPEC") from None
    if not isinstance(spec, dict) or spec.get("kind") not in (SPEC_KIND, OLD_SPEC_KIND) or "variant" not in spec:
        raise InvalidInputError(f"{path}: expected a ranker spec of kind {SPEC_KIND} with a variant; "
                                "write one with `semalign experiment --select`")
    return spec


def served_model(settings: Settings) -> str:
    """The served model's name as the experiment writes models ('variant' or 'variant@lever=value+...')."""
    spec = selected_spec(settings)
    if spec:
        return spec["model"]
    return settings.ranker_variant + (f"@{settings.ranker_levers}" if settings.ranker_levers else "")


def specification(settings: Settings, variant: str | None = None, seed: int | None = None,
                  model: str | None = None, **overrides) -> Specification:
    """The specification of `variant` (default: the served model: the selected spec, else SEMALIGN_RANKER_VARIANT
    with SEMALIGN_RANKER_LEVERS) under the settings; `model` names it (default: the variant, or the served
    model's name). Levers apply where the variant has the parts they act on (the generated cold behavior view
    needs `full`'s SIDs). The raw content beside the aligned vector is the item's text-tower vector, which the
    feature store serves with it."""
    from semalign.models.ranker import RankerConfig

    spec = selected_spec(settings) if variant is None else None
    seed = settings.seed if seed is None else seed
    if variant is None:
        model = model or served_model(settings)
        if spec is None:
            variant, levers = parse_model(model)
            ranker_levers, size = codebook_levers(levers)
            if size:
                raise InvalidInputError(f"SEMALIGN_RANKER_LEVERS={settings.ranker_levers}: the codebook's size is "
                                        "SEMALIGN_CODEBOOK_LEVELS / SEMALIGN_CODEBOOK_CODES")
            overrides = {**id_budget(ranker_levers, None), **overrides}
        else:
            variant = spec["variant"]
    cfg = dict(variant=variant, seed=seed, keep_raw_content=settings.ranker_raw_content,
               id_dropout=settings.ranker_id_dropout, max_epochs=settings.ranker_epochs,
               cold_behavior=settings.ranker_cold_behavior if variant == "full" else "oov",
               distill_weight=settings.ranker_distill_weight, id_buckets=settings.ranker_id_buckets)
    if spec:
        cfg.update({k: v for k, v in _selected_ranker(spec).items() if k not in ("variant", "seed")})
        if "hidden" in cfg:
            cfg["hidden"] = tuple(cfg["hidden"])
    cfg.update(overrides)
    try:
        ranker = RankerConfig(**cfg)
    except (TypeError, ValueError) as e:
        where = f" (spec {settings.resolved_ranker_spec()})" if spec else ""
        raise InvalidInputError(f"ranker specification{where}: {e}") from None
    if settings.serving_profile == "compact" and variant not in COMPACT_VARIANTS:
        raise InvalidInputError(f"serving profile 'compact' serves SID codes only, and ranker variant '{variant}' "
                                f"reads float vectors: set SEMALIGN_RANKER_VARIANT to one of {COMPACT_VARIANTS} "
                                "(or SEMALIGN_SERVING_PROFILE=dense)")
    part = upstream_settings(settings, seed)
    return Specification(model=model or variant, encoder=part["encoder"], codebook=part["codebook"], ranker=ranker)


def upstream_settings(settings: Settings, seed: int | None = None) -> dict:
    """{"encoder": {...}, "codebook": {...}} of the specification: the settings' (a selected spec's were applied to
    them, config.Settings), seeded by the run's seed."""
    seed = settings.seed if seed is None else seed
    return {name: {**{k: getattr(settings, field) for k, field in fields.items()}, "seed": seed}
            for name, fields in SETTINGS_OF.items()}


def encoder_config(settings: Settings, text_dim: int, image_dim: int):
    """The EncoderConfig of the specification, for towers of these dimensions."""
    from semalign.models.encoder import EncoderConfig

    return EncoderConfig(text_dim=text_dim, image_dim=image_dim, **upstream_settings(settings)["encoder"])


def ranker_config(settings: Settings, variant: str | None = None, seed: int | None = None, **overrides):
    """The RankerConfig of `specification(settings, variant, seed, **overrides)`."""
    return specification(settings, variant, seed, **overrides).ranker


def _selected_ranker(spec: dict) -> dict:
    return spec["ranker"] if "ranker" in spec else {"variant": spec["variant"], **spec.get("levers", {})}


# ---------------------------------------------------------------- model names: 'variant@lever=value+...'

CODEBOOK_LEVERS = ("codebook_levels", "codebook_codes")


def parse_model(name: str) -> tuple[str, dict]:
    """'full' -> ('full', {}); 'full@cold_behavior=oov+id_dropout=0.2' -> the variant with those levers, so a
    lever's ablation trains in the same run, on the same data and budget, as the served model."""
    from dataclasses import fields

    from semalign.models.ranker import RankerConfig

    variant, _, rest = name.partition("@")
    types = {f.name: f.type for f in fields(RankerConfig)}
    types["items_per_row"] = "float"  # the bounded ID table's budget as a ratio: id_budget turns it into rows
    types.update({k: "int" for k in CODEBOOK_LEVERS})  # the codebook the model's SIDs come from (its size)
    levers = {}
    for kv in filter(None, rest.split("+")):
        k, sep, v = kv.partition("=")
        if not sep or k not in types or k in ("variant", "seed", "hidden"):
            raise InvalidInputError(f"model '{name}': '{kv}' is not lever=value with a RankerConfig lever")
        t = str(types[k])
        try:
            levers[k] = (v.lower() in ("1", "true", "yes")) if t == "bool" else int(v) if t == "int" \
                else float(v) if t == "float" else v
        except ValueError:
            raise InvalidInputError(f"model '{name}': lever {k} expects a {t}, got '{v}'") from None
    return variant, levers


def codebook_levers(levers: dict) -> tuple[dict, dict]:
    """(the ranker's levers, the codebook's: {"levels", "codes"} given in the model name) from parsed levers."""
    ranker = {k: v for k, v in levers.items() if k not in CODEBOOK_LEVERS}
    cb = {k.removeprefix("codebook_"): v for k, v in levers.items() if k in CODEBOOK_LEVERS}
    for k, v in cb.items():
        if v < (2 if k == "codes" else 1):
            raise InvalidInputError(f"codebook_{k} must be >= {2 if k == 'codes' else 1}, got {v}")
    return ranker, cb


def id_budget(levers: dict, n_items: int | None) -> dict:
    """Levers with `items_per_row` (items per ID-table row, over the whole catalogue) turned into `id_buckets`;
    items_per_row = 0 means one row per item (id_buckets 0)."""
    import math

    levers = dict(levers)
    ratio = levers.pop("items_per_row", None)
    if ratio is not None:
        if ratio < 0:
            raise InvalidInputError(f"items_per_row must be >= 0, got {ratio}")
        if n_items is None:
            raise InvalidInputError("items_per_row needs the catalogue's size: set the lever id_buckets instead")
        levers["id_buckets"] = math.ceil(n_items / ratio) if ratio else 0
    return levers


COMPACT_VARIANTS = ("sid",)   # rankers whose items are their codes: all the compact profile serves


def write_selection(settings: Settings, result: dict, path: Path | None = None) -> dict:
    """Picks the model with the best mean pseudo-cold validation GAUC of an experiment result (never a test
    figure; under the compact profile only models it can serve), and writes its specification (encoder, codebook,
    ranker) as the one the refresh trains. Returns the spec written."""
    import numpy as np

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
    config = result["configs"][best]
    ranker = {k: v for k, v in config.items() if k not in ("seed", "codebook")}
    # the encoder and codebook the run built (a size the model named: every refresh builds its codebooks at it;
    # codes stay sized to the catalogue otherwise); Settings reads them back
    upstream = result.get("upstream") or {}
    codebook = {k: v for k, v in (upstream.get("codebook") or {}).items() if k not in ("seed", "codes")}
    spec = {"kind": SPEC_KIND, "model": best, "variant": variant, "ranker": ranker,
            "encoder": {k: v for k, v in (upstream.get("encoder") or {}).items() if k != "seed"},
            **({"codebook": {**codebook, **config.get("codebook", {})}} if codebook or "codebook" in config else {}),
            "selection": {"dataset": result.get("dataset"), "split": result.get("split"), "seeds": result.get("seeds"),
                          "rule": "best mean pseudo-cold validation GAUC", "validation": table}}
    path = Path(path or settings.ranker_spec or settings.home / "ranker_spec.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    from semalign import atomic

    atomic.write_text(path, json.dumps(spec, indent=2, default=float))
    return {**spec, "path": str(path)}
