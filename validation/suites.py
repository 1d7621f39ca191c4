"""Great Expectations suites and the promotion gates (design section 6).

- input suite: the data contract on the loaded frames (after the loader's own row checks);
- drift suite: the new window against the champion's reference profile (label rate, volume, item popularity,
  per-level SID distribution, embedding statistics); KL divergences use smoothed reference bins;
- quality gate: challenger vs champion on the same window, overall and on cold buckets, with tolerances;
- churn gate: how many items changed their first-level code against the champion's codebook.
Every check comes back as {name, passed, observed, expected}: a failed gate says which check and the numbers.
Given a `ge_root` (a refresh passes SEMALIGN_HOME/gx) the suites live in a persistent GE file context: suites,
validation definitions and results are saved there and `data_docs(root)` builds the Data Docs site.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

POP_BINS = 18          # log2 popularity bins: 0 events, 1, 2-3, 4-7, ...
SMOOTH = 1e-3


@dataclass
class Verdict:
    gate: str
    checks: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c["passed"] for c in self.checks)

    def failed(self) -> list[dict]:
        return [c for c in self.checks if not c["passed"]]

    def as_dict(self) -> dict:
        return {"gate": self.gate, "passed": self.passed, "checks": self.checks}

    def summary(self) -> str:
        if self.passed:
            return f"{self.gate}: passed ({len(self.checks)} checks)"
        return f"{self.gate}: FAILED " + "; ".join(
            f"{c['name']} observed {_fmt(c['observed'])}, expected {c['expected']}" for c in self.failed())


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- profiles

def _smoothed(counts: np.ndarray) -> list[float]:
    w = counts.astype(np.float64) / max(counts.sum(), 1)
    w = w + SMOOTH
    return (w / w.sum()).tolist()


def pop_bins(counts: np.ndarray) -> np.ndarray:
    return np.minimum(np.where(counts > 0, np.floor(np.log2(np.maximum(counts, 1))) + 1, 0), POP_BINS - 1).astype(int)


def window_profile(interactions: pd.DataFrame, n_items: int, sids: pd.DataFrame | None = None,
                   embeddings: np.ndarray | None = None, all_events: pd.DataFrame | None = None) -> dict:
    """What the drift suite compares: computed on the champion's window at promotion, kept with its run. Repeats
    are counted over `all_events` when given (the whole window: replayed days are the latest, so they land in
    validation and test, not in the training part)."""
    counts = np.bincount(interactions["item_idx"].to_numpy(), minlength=n_items)
    prof = {"n_events": int(len(interactions)), "label_rate": float(interactions["label"].mean()),
            "pop_weights": _smoothed(np.bincount(pop_bins(counts), minlength=POP_BINS)),
            "repeat_pair_rate": repeat_pair_rate(interactions if all_events is None else all_events),
            **label_relations(interactions, n_items)}
    if sids is not None:
        levels = sorted(c for c in sids.columns if c.startswith("sid_") and c != "sid_dedup")
        k = int(max(sids[c].max() for c in levels)) + 1
        prof["sid_codes"] = k
        prof["sid_weights"] = {c: _smoothed(np.bincount(sids[c].to_numpy(), minlength=k)) for c in levels}
    if embeddings is not None:
        norms = np.linalg.norm(embeddings, axis=1)
        prof["embedding_norm_mean"] = float(norms.mean())
        prof["embedding_dim_std_mean"] = float(embeddings.std(0).mean())
    return prof


def repeat_pair_rate(interactions: pd.DataFrame) -> float:
    """Share of events whose (user, item) pair occurred earlier in the window: days loaded twice by an ETL (shifted
    in time, so not exact duplicates) raise it while every marginal stays put."""
    if not len(interactions):
        return 0.0
    pairs = interactions["user_idx"].to_numpy(np.int64) * (int(interactions["item_idx"].max()) + 1) \
        + interactions["item_idx"].to_numpy(np.int64)
    return float(1.0 - len(np.unique(pairs)) / len(pairs))


def repeat_gate(reference: dict, profile: dict, tol: float = 0.02) -> Verdict:
    """Events repeating a (user, item) pair rise by more than `tol` over the champion's window: replayed data."""
    v = Verdict("repeats")
    if "repeat_pair_rate" in reference and "repeat_pair_rate" in profile:
        ref, now = reference["repeat_pair_rate"], profile["repeat_pair_rate"]
        v.checks.append({"name": "repeated user-item pairs", "passed": bool(now <= ref + tol), "observed": float(now),
                         "expected": f"<= the champion window's {ref:.4f} + {tol}"})
    return v


RELATION_BINS = 4   # quartiles of item popularity and of user activity
RELATION_MIN_EVENTS = 200


def label_relations(interactions: pd.DataFrame, n_items: int) -> dict:
    """How the label relates to items and users, beyond its mean: the positive rate per quartile of item
    popularity and per quartile of user activity (events, in this window). A corruption that keeps every marginal
    (labels shuffled across events, item ids swapped, a join on the wrong key) flattens or reorders these."""
    out = {}
    for name, key in (("item", "item_idx"), ("user", "user_idx")):
        counts = interactions.groupby(key)["label"].transform("size").to_numpy()
        edges = np.quantile(counts, np.linspace(0, 1, RELATION_BINS + 1)[1:-1])
        q = np.searchsorted(edges, counts, side="right")
        rates, sizes = [], []
        for b in range(RELATION_BINS):
            sel = q == b
            sizes.append(int(sel.sum()))
            rates.append(float(interactions["label"].to_numpy()[sel].mean()) if sel.any() else float("nan"))
        out[f"label_rate_by_{name}_quartile"] = rates
        out[f"events_by_{name}_quartile"] = sizes
    return out


def relation_gate(reference: dict, profile: dict, tol: float = 0.08) -> Verdict:
    """The label's relation to items and users drifts when the positive rate of a popularity or activity quartile
    moves by more than `tol` (quartiles with fewer than RELATION_MIN_EVENTS events on either side are skipped)."""
    v = Verdict("label relation")
    for name in ("item", "user"):
        key = f"label_rate_by_{name}_quartile"
        if key not in reference or key not in profile:
            continue
        diffs = [abs(a - b) for a, b, na, nb in zip(reference[key], profile[key], reference[f"events_by_{name}_quartile"],
                                                    profile[f"events_by_{name}_quartile"])
                 if na >= RELATION_MIN_EVENTS and nb >= RELATION_MIN_EVENTS and np.isfinite(a) and np.isfinite(b)]
        if diffs:
            v.checks.append({"name": f"label rate by {name} quartile", "passed": bool(max(diffs) <= tol),
                             "observed": float(max(diffs)), "expected": f"every quartile within {tol} of the champion's"})
    return v


def performance_drift_gate(champion_now: dict | None, champion_reference: dict | None, tol: float = 0.03,
                           z: float = 2.0) -> Verdict:
    """The champion's own AUC on the new window against the AUC it had on its own window: a fall beyond `tol`
    (or beyond `z` times the two windows' sampling noise, if larger) means the data changed under the model, or
    broke: promotion waits for a human (`semalign promote` is the audited override)."""
    v = Verdict("performance drift")
    if not champion_now or not champion_reference:
        return v
    for b in ("all",):
        if b in champion_now and b in champion_reference:
            now, ref = champion_now[b], champion_reference[b]
            noise = z * float(np.hypot(auc_noise(now["auc"], now.get("n_events", 0), now.get("n_positive")),
                                       auc_noise(ref["auc"], ref.get("n_events", 0), ref.get("n_positive"))))
            t = max(tol, noise)
            v.checks.append({"name": f"champion AUC {b} on the new window", "passed": bool(now["auc"] >= ref["auc"] - t),
                             "observed": float(now["auc"]), "expected": f">= its reference {ref['auc']:.4f} - {t:.4f} "
                                                                         "(else held for a human: `semalign promote`)"})
    return v


def codebook_health(metrics: dict, codes: int, min_utilisation: float = 0.5, min_perplexity_share: float = 0.25,
                    max_collision_rate: float = 0.9) -> Verdict:
    """A collapsed codebook is refused before it is published: each level uses at least `min_utilisation` of its
    codes, the first level's perplexity is at least `min_perplexity_share` of its codes, and at most
    `max_collision_rate` of the catalogue shares a SID before the dedup level."""
    v = Verdict("codebook health")
    util = metrics.get("utilisation") or []
    if util:
        v.checks.append({"name": "codes used per level", "passed": bool(min(util) >= min_utilisation),
                         "observed": float(min(util)), "expected": f">= {min_utilisation} on every level"})
    ppl = metrics.get("perplexity") or []
    if ppl:
        v.checks.append({"name": "level-0 perplexity / codes", "passed": bool(ppl[0] / codes >= min_perplexity_share),
                         "observed": float(ppl[0] / codes), "expected": f">= {min_perplexity_share}"})
    coll = metrics.get("catalogue_collision_rate")
    if isinstance(coll, (int, float)):
        v.checks.append({"name": "catalogue collision rate", "passed": bool(coll <= max_collision_rate),
                         "observed": float(coll), "expected": f"<= {max_collision_rate}"})
    return v


# ---------------------------------------------------------------- GE plumbing

class _GE:
    """A GE data context: persistent (a file context under `root`: suites, validation definitions and results
    saved, Data Docs built from them) or, without a root, ephemeral."""

    def __init__(self, root: Path | None = None):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import logging

        import great_expectations as gx

        self.gx = gx
        self.persistent = root is not None
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
            self.ctx = gx.get_context(mode="file", project_root_dir=str(root))
        else:
            self.ctx = gx.get_context(mode="ephemeral")
        for name in ("great_expectations", "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)  # after the context: GE sets its own
        try:
            self.ctx.variables.progress_bars = {"globally": False, "metric_calculations": False}
        except Exception:
            pass
        self.source = self.ctx.data_sources.add_or_update_pandas("semalign")

    def _batch_definition(self, name: str):
        try:
            asset = self.source.get_asset(name)
        except LookupError:
            asset = self.source.add_dataframe_asset(name)
        try:
            return asset.get_batch_definition("all")
        except KeyError:
            return asset.add_batch_definition_whole_dataframe("all")

    def validate(self, name: str, df: pd.DataFrame, expectations: list) -> list[dict]:
        gx = self.gx
        bd = self._batch_definition(name)
        suite = self.ctx.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=[e for _, e in expectations]))
        labels = [label for label, _ in expectations]
        if self.persistent:  # saved with its results, which the Data Docs show
            vd = self.ctx.validation_definitions.add_or_update(gx.ValidationDefinition(name=name, data=bd, suite=suite))
            res = vd.run(batch_parameters={"dataframe": df})
        else:
            res = bd.get_batch(batch_parameters={"dataframe": df}).validate(suite)
        if len(res.results) != len(labels):
            raise RuntimeError(f"GE suite {name}: {len(res.results)} results for {len(labels)} expectations")
        out = []
        for label, r in zip(labels, res.results):
            cfg = r.expectation_config
            obs = r.result.get("observed_value")
            if obs is None and "unexpected_count" in r.result:
                obs = int(r.result["unexpected_count"])
            if isinstance(obs, (np.floating, np.integer)):
                obs = obs.item()
            kw = {k: v for k, v in cfg.kwargs.items() if k not in ("column", "batch_id", "partition_object")}
            out.append({"name": label, "passed": bool(r.success), "observed": obs,
                        "expected": f"{cfg.type} {kw}", "suite": name})
        return out

    def data_docs(self) -> str | None:
        """Builds the Data Docs site from every saved validation; returns its index URL."""
        if not self.persistent:
            return None
        self.ctx.build_data_docs()
        urls = self.ctx.get_docs_sites_urls()
        return urls[0]["site_url"] if urls else None


def data_docs(root: Path) -> str | None:
    """The Data Docs of the GE context under `root`, rebuilt (a refresh calls this after its suites ran)."""
    return _GE(root).data_docs()


# ---------------------------------------------------------------- suites

def input_suite(items: pd.DataFrame, interactions: pd.DataFrame, min_events: int = 100,
                ge_root: Path | None = None) -> Verdict:
    ge = _GE(ge_root)
    E = ge.gx.expectations
    v = Verdict("input")
    v.checks += ge.validate("input_items", items[["item_id", "text"]].assign(text_len=items["text"].str.len()), [
        ("items: item_id unique", E.ExpectColumnValuesToBeUnique(column="item_id")),
        ("items: item_id present", E.ExpectColumnValuesToNotBeNull(column="item_id")),
        ("items: text present", E.ExpectColumnValuesToNotBeNull(column="text")),
        ("items: text length", E.ExpectColumnValuesToBeBetween(column="text_len", min_value=1, max_value=100_000)),
    ])
    # catalogue membership as a join (a value set of the whole catalogue would not scale)
    ev = interactions[["user_id", "item_id", "ts", "label"]].merge(
        items[["item_id"]].drop_duplicates().assign(catalogue_item_id=lambda d: d["item_id"]), on="item_id", how="left")
    v.checks += ge.validate("input_interactions", ev, [
        ("interactions: volume", E.ExpectTableRowCountToBeBetween(min_value=min_events)),
        ("interactions: user_id present", E.ExpectColumnValuesToNotBeNull(column="user_id")),
        ("interactions: item_id present", E.ExpectColumnValuesToNotBeNull(column="item_id")),
        ("interactions: label is 0/1", E.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1])),
        ("interactions: timestamp not in the future",
         E.ExpectColumnValuesToBeBetween(column="ts", min_value=0, max_value=int(pd.Timestamp.now(tz="UTC").timestamp()) + 86400)),
        ("interactions: item_id in the catalogue", E.ExpectColumnValuesToNotBeNull(column="catalogue_item_id")),
    ])
    return v


def drift_suite(reference: dict, interactions: pd.DataFrame, n_items: int, sids: pd.DataFrame,
                embeddings: np.ndarray, label_rate_tol: float = 0.03, volume_ratio: tuple = (0.5, 2.0),
                kl_max: float = 0.25, sid_kl_max: float = 1.0, norm_tol: float = 0.15,
                ge_root: Path | None = None) -> Verdict:
    ge = _GE(ge_root)
    E = ge.gx.expectations
    v = Verdict("drift")
    ref_rate, ref_n = reference["label_rate"], reference["n_events"]
    v.checks += ge.validate("drift_events", interactions[["label"]].astype(float), [
        ("label rate", E.ExpectColumnMeanToBeBetween(column="label", min_value=ref_rate - label_rate_tol,
                                                     max_value=ref_rate + label_rate_tol)),
        ("volume", E.ExpectTableRowCountToBeBetween(min_value=int(ref_n * volume_ratio[0]),
                                                    max_value=int(ref_n * volume_ratio[1]))),
    ])
    counts = np.bincount(interactions["item_idx"].to_numpy(), minlength=n_items)
    pop = pd.DataFrame({"pop_bin": pop_bins(counts).astype(float)})
    edges = [b - 0.5 for b in range(POP_BINS + 1)]
    v.checks += ge.validate("drift_popularity", pop, [
        ("item popularity (KL)", E.ExpectColumnKLDivergenceToBeLessThan(
            column="pop_bin", partition_object={"bins": edges, "weights": reference["pop_weights"]}, threshold=kl_max)),
    ])
    if "sid_weights" in reference:
        k = reference["sid_codes"]
        exps = []
        cols = [c for c in reference["sid_weights"] if c in sids.columns]
        frame = sids[cols].astype(float).clip(upper=k - 1)
        for c in cols:
            exps.append((f"SID level {c[4:]} distribution (KL)", E.ExpectColumnKLDivergenceToBeLessThan(
                column=c, partition_object={"bins": [b - 0.5 for b in range(k + 1)],
                                            "weights": reference["sid_weights"][c]}, threshold=sid_kl_max)))
        v.checks += ge.validate("drift_sids", frame, exps)
    if "embedding_norm_mean" in reference:
        m = reference["embedding_norm_mean"]
        v.checks += ge.validate("drift_embeddings", pd.DataFrame({"norm": np.linalg.norm(embeddings, axis=1)}), [
            ("embedding norm mean", E.ExpectColumnMeanToBeBetween(column="norm", min_value=m * (1 - norm_tol),
                                                                  max_value=m * (1 + norm_tol))),
        ])
    return v


def auc_noise(auc: float, n_events: int, n_positive: int | None) -> float:
    """Standard error of an AUC measured on n_positive positives and n_events - n_positive negatives (Hanley &
    McNeil, 1982): how far two models' AUCs on the same window can differ by chance alone."""
    if not n_positive or n_positive >= n_events:
        return 0.0
    a, p, q = float(auc), n_positive, n_events - n_positive
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return float(np.sqrt(max(a * (1 - a) + (p - 1) * (q1 - a * a) + (q - 1) * (q2 - a * a), 0.0) / (p * q)))


def quality_gate(challenger: dict, champion: dict, tol: float = 0.005, cold_tol: float = 0.01,
                 cold_buckets: tuple = ("unseen",), z: float = 2.0, compared_events: int | None = None,
                 min_events: int = 200) -> Verdict:
    """challenger / champion: {bucket: {"auc": .., "n_events": .., "n_positive": ..}} on the same events (those
    the champion never trained on; `compared_events` of them). The challenger may trail by the tolerance or by `z`
    times the AUC's sampling noise on that window, whichever is larger: on a small window a worse AUC within the
    noise is not evidence of a worse model. Fewer than `min_events` fresh events cannot judge either way: promotion
    waits for a human."""
    v = Verdict("quality")
    if compared_events is not None:
        v.checks.append({"name": "events the champion never trained on", "passed": bool(compared_events >= min_events),
                         "observed": float(compared_events),
                         "expected": f">= {min_events} to compare challenger and champion "
                                     "(else held for a human: `semalign promote`)"})
    for b in ("all",) + tuple(cold_buckets):
        if b not in challenger or b not in champion:
            continue
        new, old = challenger[b]["auc"], champion[b]["auc"]
        noise = z * auc_noise(old, challenger[b].get("n_events", 0), challenger[b].get("n_positive"))
        t = max(tol if b == "all" else cold_tol, noise)
        ok = bool(np.isfinite(new) and new >= old - t)
        v.checks.append({"name": f"AUC {b}", "passed": ok, "observed": float(new),
                         "expected": f">= champion {old:.4f} - {t:.4f}"})
    return v


def churn_gate(churn: dict | None, max_level0: float = 0.6) -> Verdict:
    v = Verdict("churn")
    if churn is None:
        return v
    per = churn.get("per_level") or []
    if per:
        v.checks.append({"name": "SID level-0 churn", "passed": bool(per[0] <= max_level0), "observed": float(per[0]),
                         "expected": f"<= {max_level0}"})
    return v
