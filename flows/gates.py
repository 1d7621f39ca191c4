"""The gates that guard promotion: input drift against the champion's reference window (marginals, and the
label's relation to item popularity and user activity), the user side (are the window's users still the people
the champion knew: behaviour pairs under the champion's encoder, users recognised from their past), the champion's
own AUC and GAUC on the new window against its reference (a fall holds promotion for a human), the quality gate
(challenger vs champion on the same events, cold items included, with a paired interval) and SID churn against
the champion's codebook. What the champion logged must be readable, or nothing passes (fail closed). The first model has nothing to compare
against and passes. Before any of them, a collapsed codebook is refused at publish (`check_codebook`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from semalign.config import Settings


@dataclass
class GateOutcome:
    passed: bool
    gates: list[dict]
    summary: str
    profile: dict                     # this window's reference profile (logged; the next refresh compares to it)
    reference: dict | None = None     # the champion's reference profile, when it logged one
    extra: dict = field(default_factory=dict)

    def verdict(self) -> dict:
        return {"passed": self.passed, "gates": self.gates, "summary": self.summary}


def run_gates(settings: Settings, registry, champ: dict, ds, split, cb, evaluation: dict, feats) -> GateOutcome:
    """`evaluation` is `ranker_stages.judge_window`'s: the champion is judged only on test events it never trained
    or validated on, and the challenger on the same events. `feats` are the window's tower features: the champion's
    encoder embeds the items from the content they have now."""
    from semalign.data import mine_pairs
    from semalign.models.encoder import hit_at_k
    from semalign.validation.suites import (Verdict, churn_gate, drift_suite, pair_coherence, performance_drift_gate,
                                            quality_gate, relation_gate, repeat_gate, window_profile)

    champion_metrics = evaluation.get("champion")
    compared = evaluation.get("compared") or {}

    train = split.part("train")
    emb = np.stack(cb.sids["embedding"].to_numpy())
    profile = window_profile(train, ds.n_items, cb.sids, emb, all_events=split.events)
    # the window's behaviour pairs under its own encoder: what the next refresh expects of this one's users
    pairs = mine_pairs(split.events, settings.pair_window, settings.pair_max_gap_s)
    profile["pairs"] = pair_coherence(emb, pairs, hit_at_k)
    verdicts, reference = [], None
    if champ:
        from semalign.deploy.registry import ChampionRecordError

        try:  # the champion's record unreadable: nothing can be compared, so nothing passes (fail closed)
            reference = registry.run_artifact_json(champ["run_id"], "reference_profile.json", required=True)
            own_record = registry.run_artifact_json(champ["run_id"], "evaluation.json", required=True)
        except ChampionRecordError as e:
            v = Verdict("champion record", [{"name": f"champion v{champ.get('version')}'s logged record",
                                             "passed": False, "observed": str(e),
                                             "expected": "readable: the gates compare against it"}])
            return GateOutcome(passed=False, gates=[v.as_dict()], summary=v.summary(), profile=profile)
        if reference is not None:
            verdicts.append(drift_suite(reference, train, ds.n_items, cb.sids, emb, ge_root=ge_root(settings),
                                        label_rate_tol=settings.drift_label_rate_tolerance,
                                        volume_ratio=(settings.drift_volume_min_ratio, settings.drift_volume_max_ratio),
                                        kl_max=settings.drift_popularity_kl, sid_kl_max=settings.drift_sid_kl))
            verdicts.append(relation_gate(reference, profile, settings.gate_label_relation_tolerance))
            verdicts.append(repeat_gate(reference, profile, settings.gate_repeat_rate_tolerance))
            verdicts.append(_user_side(settings, champ, reference, ds, split, feats, pairs))
        # the champion on the new window against itself on its own window: the data changed under it
        own = own_record.get("challenger")
        verdicts.append(performance_drift_gate(champion_metrics, own, settings.gate_performance_drift,
                                               gauc_tol=settings.gate_gauc_drift))
        verdicts.append(quality_gate(compared.get("paired"), settings.gate_auc_tolerance, settings.gate_cold_auc_tolerance,
                                     compared_events=compared.get("events")))
        same_parent = cb.churn and cb.churn.get("parent") == champ.get("codebook_version")
        verdicts.append(churn_gate(cb.churn if same_parent else None, settings.gate_max_level0_churn))
    else:
        verdicts.append(Verdict("first model"))  # nothing to compare against: the first ranker is promoted
    return GateOutcome(passed=all(v.passed for v in verdicts), gates=[v.as_dict() for v in verdicts],
                       summary="; ".join(v.summary() for v in verdicts), profile=profile, reference=reference)


def _user_side(settings: Settings, champ: dict, reference: dict, ds, split, feats, pairs):
    """The user gate on the new window, under the champion's encoder (its items embedded from the content they have
    now). An encoder that cannot be read fails the gate: nothing is judged against it, so nothing passes."""
    from semalign.errors import SemalignError, reading
    from semalign.models.encoder import embed_items, hit_at_k, load_encoder
    from semalign.validation.suites import Verdict, pair_coherence, user_continuity, user_gate

    folder = settings.encoders_dir / str(champ.get("encoder_version"))
    try:
        with reading(folder):
            model = load_encoder(folder, settings.resolved_device())[0]
    except (SemalignError, OSError) as e:  # fail closed, saying why
        return Verdict("users", [{"name": "the champion's encoder", "passed": False,
                                  "observed": f"{type(e).__name__}: {e}",
                                  "expected": f"readable under {settings.encoders_dir}: the user gate embeds with it"}])
    champion_emb = embed_items(model, feats.text, feats.image, feats.has_image, settings.resolved_device())
    now = {"pairs": pair_coherence(champion_emb, pairs, hit_at_k)}
    if reference.get("user_sample"):
        now["continuity"] = user_continuity(reference["user_sample"], split.events, champion_emb,
                                            ds.items["item_id"].to_numpy())
    return user_gate(reference, now, settings.gate_min_user_recognition,
                     min_pair_coherence=settings.gate_min_pair_coherence)


def ge_root(settings: Settings):
    """The persistent Great Expectations context of this home: suites, results, Data Docs."""
    return settings.home / "gx"


def check_codebook(settings: Settings, cb) -> dict:
    """Refuses to publish a collapsed codebook (utilisation, first-level perplexity, collisions); returns the
    passed verdict for the summary."""
    from semalign.flows.errors import RefreshError
    from semalign.flows.semantic_ids import load_codebook
    from semalign.validation.suites import codebook_health

    v = codebook_health(cb.metrics, load_codebook(settings, cb.version).codes, settings.codebook_min_utilisation,
                        settings.codebook_min_perplexity_share, settings.codebook_max_collision_rate)
    if not v.passed:
        raise RefreshError(f"refusing to publish codebook {cb.version}: {v.summary()}; nothing was published or "
                           "promoted (SEMALIGN_CODEBOOK_MIN_* / _MAX_COLLISION_RATE set the limits)")
    return v.as_dict()
