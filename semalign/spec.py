"""The ranker specification: one place that turns settings into the ranker configuration, so the model
`semalign experiment` measures is exactly the one the refresh trains, logs and serves."""
from __future__ import annotations

from semalign.config import Settings


def ranker_config(settings: Settings, variant: str | None = None, seed: int | None = None, **overrides):
    """RankerConfig for `variant` (default: the served variant) under the settings' levers. Levers apply where
    the variant has the parts they act on (the generated cold behavior view needs `full`'s SIDs). The raw content
    beside the aligned vector is the item's text-tower vector, which the feature store serves with it."""
    from semalign.models.ranker import RankerConfig

    variant = variant or settings.ranker_variant
    cfg = dict(variant=variant, seed=settings.seed if seed is None else seed,
               keep_raw_content=settings.ranker_raw_content,
               id_dropout=settings.ranker_id_dropout, max_epochs=settings.ranker_epochs,
               cold_behavior=settings.ranker_cold_behavior if variant == "full" else "oov",
               distill_weight=settings.ranker_distill_weight)
    cfg.update(overrides)
    return RankerConfig(**cfg)
