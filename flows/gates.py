"""The gates that guard promotion: input drift against the champion's reference window, the quality gate
(challenger vs champion on the same window, cold items included) and SID churn against the champion's codebook.
The first model has nothing to compare against and passes."""
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


def run_gates(settings: Settings, registry, champ: dict, ds, split, cb, challenger: dict,
              champion_metrics: dict | None) -> GateOutcome:
    from semalign.validation.suites import Verdict, churn_gate, drift_suite, quality_gate, window_profile

    train = split.part("train")
    emb = np.stack(cb.sids["embedding"].to_numpy())
    profile = window_profile(train, ds.n_items, cb.sids, emb)
    verdicts, reference = [], None
    if champ:
        reference = registry.run_artifact_json(champ["run_id"], "reference_profile.json")
        if reference is not None:
            verdicts.append(drift_suite(reference, train, ds.n_items, cb.sids, emb,
                                        label_rate_tol=settings.drift_label_rate_tolerance,
                                        volume_ratio=(settings.drift_volume_min_ratio, settings.drift_volume_max_ratio),
                                        kl_max=settings.drift_popularity_kl, sid_kl_max=settings.drift_sid_kl))
        verdicts.append(quality_gate(challenger, champion_metrics, settings.gate_auc_tolerance,
                                     settings.gate_cold_auc_tolerance))
        same_parent = cb.churn and cb.churn.get("parent") == champ.get("codebook_version")
        verdicts.append(churn_gate(cb.churn if same_parent else None, settings.gate_max_level0_churn))
    else:
        verdicts.append(Verdict("first model"))  # nothing to compare against: the first ranker is promoted
    return GateOutcome(passed=all(v.passed for v in verdicts), gates=[v.as_dict() for v in verdicts],
                       summary="; ".join(v.summary() for v in verdicts), profile=profile, reference=reference)
