"""Great Expectations suites and the promotion gates (design section 6).

- input suite: the data contract on the loaded frames (after the loader's own row checks);
- drift suite: the new window against the champion's reference profile (label rate, volume, item popularity,
  per-level SID distribution, embedding statistics); KL divergences use smoothed reference bins;
- quality gate: challenger vs champion on the same events, overall and on cold buckets: a paired bootstrap interval
  over users of the AUC difference; blocked when the challenger is significantly worse by more than a stated margin;
- user gate: whether the new window's users are still the people the champion knew (a broken user join keeps every
  marginal): the behaviour pairs' coherence under the champion's encoder, and a fixed sample of users recognised
  from their past items, activity and history overlap;
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
        if self.passed:  # an interval is shown whichever way it decided: how close the call was
            shown = "".join(f"; {c['name']} {_fmt(c['observed'])} [{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}]"
                            for c in self.checks if "interval" in c)
            return f"{self.gate}: passed ({len(self.checks)} checks{shown})"
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
    whole = interactions if all_events is None else all_events
    if {"user_id", "item_id", "ts"} <= set(whole.columns):
        prof["user_sample"] = user_sample(whole)
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


# ---------------------------------------------------------------- the user side

USER_SAMPLE_SIZE = 500       # users the reference profile keeps, so the next window can be matched to them
USER_SAMPLE_ITEMS = 30       # their latest positive items
USER_MIN_POSITIVES = 3       # fewer items say too little about a user's taste to recognise them
USER_MIN_MATCHED = 30        # matched users below this cannot judge either way: the checks are skipped
PAIR_HIT_K = 30


def _positives_by_user(events: pd.DataFrame) -> pd.Series:
    pos = events[events["label"] == 1].sort_values(["user_id", "ts", "item_id"], kind="stable")
    return pos.groupby("user_id", sort=False)["item_id"].agg(list)


def user_sample(events: pd.DataFrame, size: int = USER_SAMPLE_SIZE, max_items: int = USER_SAMPLE_ITEMS,
                min_positives: int = USER_MIN_POSITIVES) -> dict:
    """A fixed sample of the window's users with their event count and latest positive items (ids), kept in the
    window's profile. Users are picked by a hash of their id, so every window draws from the same users."""
    items = _positives_by_user(events)
    items = items[items.map(len) >= min_positives]
    ids = np.asarray(items.index.astype(str), dtype=object)
    pick = ids[np.argsort(pd.util.hash_array(ids), kind="stable")[:size]]
    counts = events["user_id"].astype(str).value_counts()
    return {"user_id": pick.tolist(), "n_events": [int(counts[u]) for u in pick],
            "items": [[str(i) for i in items[u][-max_items:]] for u in pick]}


def _centroids(embeddings: np.ndarray, item_row: dict, histories: list[list]) -> np.ndarray:
    e = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    out = np.stack([e[[item_row[i] for i in h if i in item_row]].mean(0) for h in histories])
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def user_continuity(sample: dict, events: pd.DataFrame, embeddings: np.ndarray, item_ids, max_items: int =
                    USER_SAMPLE_ITEMS, min_positives: int = USER_MIN_POSITIVES) -> dict:
    """The reference's sampled users, met again in `events`: are they the same people? `embeddings` [n_items, d]
    (the champion's encoder) are indexed like `item_ids`.

    - recognition: how often a user's past items (centroid) are closer to their own items now than to another
      sampled user's items now (0.5: no better than a stranger; a broken user join lands there);
    - activity: rank correlation of users' event counts then and now;
    - overlap: share of a user's past items among their positives now, against another user's (own vs other).
    """
    item_row = {str(i): k for k, i in enumerate(item_ids)}
    now = _positives_by_user(events)
    now.index = now.index.astype(str)
    counts = events["user_id"].astype(str).value_counts()
    matched = [(u, n, past) for u, n, past in zip(sample["user_id"], sample["n_events"], sample["items"])
               if u in now.index and sum(i in item_row for i in past) >= min_positives
               and sum(i in item_row for i in now[u]) >= min_positives]
    out = {"users": len(matched)}
    if len(matched) < USER_MIN_MATCHED:
        return out
    past = _centroids(embeddings, item_row, [p for _, _, p in matched])
    cur = _centroids(embeddings, item_row, [now[u][-max_items:] for u, _, _ in matched])
    sim = past @ cur.T
    own = np.diag(sim)[:, None]
    rec = ((own > sim).sum(1) + 0.5 * ((own == sim).sum(1) - 1)) / (len(matched) - 1)
    then_n = np.array([n for _, n, _ in matched], np.float64)
    now_n = np.array([counts[u] for u, _, _ in matched], np.float64)
    other = np.roll(np.arange(len(matched)), 1)   # each user against the next one: a stranger's past
    pos_now = [set(now[u]) for u, _, _ in matched]
    overlap = lambda j, k: len(set(matched[j][2]) & pos_now[k]) / len(matched[j][2])  # noqa: E731
    out.update(recognition=float(rec.mean()), recognition_se=float(rec.std(ddof=1) / np.sqrt(len(rec))),
               activity=float(np.corrcoef(pd.Series(then_n).rank(), pd.Series(now_n).rank())[0, 1])  # Spearman
               if np.ptp(then_n) and np.ptp(now_n) else float("nan"),
               overlap_own=float(np.mean([overlap(j, j) for j in range(len(matched))])),
               overlap_other=float(np.mean([overlap(other[j], j) for j in range(len(matched))])))
    return out


def pair_coherence(embeddings: np.ndarray, pairs: np.ndarray, hit_at_k, k: int = PAIR_HIT_K) -> dict:
    """Behaviour pairs' Hit@k under `embeddings` ([n_items, d]; `hit_at_k` is models.encoder's), with what chance
    gives on this catalogue (k of its other items)."""
    return {"hit": float(hit_at_k(embeddings, pairs, k)), "chance": k / max(len(embeddings) - 1, 1), "k": k,
            "pairs": int(len(pairs))}


def user_gate(reference: dict, now: dict, min_recognition: float = 0.6, z: float = 3.0,
              min_pair_coherence: float = 0.5) -> Verdict:
    """Is the new window still about the people the champion knew? `reference` is the champion's window profile,
    `now` what `pair_coherence` (under the champion's encoder) and `user_continuity` measured on the new window. A
    broken user join (ids permuted across events, or mapped to other users) keeps the label rate, volume,
    popularity and user activity; it breaks these:

    - the new window's behaviour pairs (items one user engaged with close in time) are coherent under the champion's
      encoder: their Hit@k above chance is at least `min_pair_coherence` of what its own window's pairs had (pairs
      of a broken join, or of item texts swapped between items, fall to chance);
    - the reference's sampled users are recognised from their past items: recognition at least `min_recognition`
      and `z` standard errors above a stranger's 0.5."""
    v = Verdict("users")
    ref, cur = reference.get("pairs"), now.get("pairs")
    if ref and cur and np.isfinite(ref["hit"]) and np.isfinite(cur["hit"]) and ref["hit"] > ref["chance"]:
        share = (cur["hit"] - cur["chance"]) / (ref["hit"] - ref["chance"])
        v.checks.append({"name": f"behaviour pairs' Hit@{cur['k']} under the champion's encoder, above chance",
                         "passed": bool(share >= min_pair_coherence), "observed": float(share),
                         "margin": float(share - min_pair_coherence),
                         "expected": f">= {min_pair_coherence} of its window's (Hit@{cur['k']} {cur['hit']:.4f} vs "
                                     f"{ref['hit']:.4f}; chance {cur['chance']:.4f} / {ref['chance']:.4f}; "
                                     f"{cur['pairs']} pairs)"})
    cont = now.get("continuity") or {}
    if "recognition" in cont:
        t = max(min_recognition, 0.5 + z * cont["recognition_se"])
        v.checks.append({"name": "users recognised from their past", "passed": bool(cont["recognition"] >= t),
                         "observed": float(cont["recognition"]), "margin": float(cont["recognition"] - t),
                         **{k: cont[k] for k in
                                                                     ("users", "activity", "overlap_own", "overlap_other")},
                         "expected": f">= {t:.4f} ({cont['users']} users of the champion's sample; a stranger: 0.5; "
                                     f"their activity's rank correlation with their past {cont['activity']:.3f}; "
                                     f"past items still theirs {cont['overlap_own']:.3f}, a stranger's "
                                     f"{cont['overlap_other']:.3f})"})
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
                           z: float = 2.0, gauc_tol: float | None = None) -> Verdict:
    """The champion's own AUC and per-user AUC (GAUC) on the new window against what it had on its own window: a
    fall beyond `tol` (AUC: or beyond `z` times the two windows' sampling noise, if larger; GAUC: `gauc_tol`, default
    `tol`) means the data changed under the model, or broke: promotion waits for a human (`semalign promote` is the
    audited override). GAUC ranks each user's own events: a join that hands users other people's histories lowers
    it while items keep their base rates, which hold the global AUC up."""
    v = Verdict("performance drift")
    if not champion_now or not champion_reference:
        return v
    now, ref = champion_now.get("all"), champion_reference.get("all")
    if not now or not ref:
        return v
    noise = z * float(np.hypot(auc_noise(now["auc"], now.get("n_events", 0), now.get("n_positive")),
                               auc_noise(ref["auc"], ref.get("n_events", 0), ref.get("n_positive"))))
    t = max(tol, noise)
    v.checks.append({"name": "champion AUC all on the new window", "passed": bool(now["auc"] >= ref["auc"] - t),
                     "observed": float(now["auc"]), "margin": float(now["auc"] - (ref["auc"] - t)), "expected": f">= its reference {ref['auc']:.4f} - {t:.4f} "
                                                                 "(else held for a human: `semalign promote`)"})
    if "gauc" in now and "gauc" in ref and np.isfinite(ref["gauc"]):
        t = tol if gauc_tol is None else gauc_tol
        v.checks.append({"name": "champion GAUC all on the new window",
                         "passed": bool(np.isfinite(now["gauc"]) and now["gauc"] >= ref["gauc"] - t),
                         "observed": float(now["gauc"]), "margin": float(now["gauc"] - (ref["gauc"] - t)), "expected": f">= its reference {ref['gauc']:.4f} - {t:.4f} "
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


PAIRED_RESAMPLES = 200
PAIRED_LEVEL = 0.95


def paired_comparison(y: np.ndarray, p_challenger: np.ndarray, p_champion: np.ndarray, users: np.ndarray,
                      buckets: dict[str, np.ndarray], resamples: int = PAIRED_RESAMPLES, seed: int = 0) -> dict:
    """Challenger minus champion on the same events, per bucket (a name -> boolean mask): the AUC and GAUC
    differences with 95% intervals from a paired bootstrap over users (each resample draws users with replacement
    and keeps all their events, scored by both models; seeded, so a re-run gives the same interval)."""
    from semalign.models.metrics import BootstrapFrame, paired_bootstrap

    out = {}
    for name, sel in buckets.items():
        if sel.sum() == 0 or len(np.unique(y[sel])) < 2:
            continue
        frame = BootstrapFrame(y[sel], users[sel], {"challenger": p_challenger[sel], "champion": p_champion[sel]})
        res = paired_bootstrap([frame], "challenger", "champion", n_boot=resamples, seed=seed)
        out[name] = {"auc": list(res["auc"]), "gauc": list(res["gauc"]), "n_events": int(sel.sum()),
                     "users": int(len(frame.uniq)), "resamples": resamples, "seed": seed, "level": PAIRED_LEVEL}
    return out


def quality_gate(paired: dict | None, margin: float = 0.01, cold_margin: float = 0.015,
                 cold_buckets: tuple = ("unseen",), compared_events: int | None = None, min_events: int = 200) -> Verdict:
    """Challenger vs champion on the same events (those the champion never trained on; `compared_events` of them),
    judged by `paired` (`paired_comparison`'s intervals of challenger - champion AUC). Blocked only when the
    challenger is significantly worse by more than the margin: the interval's upper end below -margin (training
    variance alone moves two models of one recipe apart, so a margin of zero would block honest refreshes; a
    challenger whose interval reaches above -margin may be that much worse by chance alone). Without an interval
    for the whole window nothing can be judged: blocked. Fewer than `min_events` fresh events: promotion waits for
    a human."""
    v = Verdict("quality")
    if compared_events is not None:
        v.checks.append({"name": "events the champion never trained on", "passed": bool(compared_events >= min_events),
                         "observed": float(compared_events),
                         "expected": f">= {min_events} to compare challenger and champion "
                                     "(else held for a human: `semalign promote`)"})
    paired = paired or {}
    for b in ("all",) + tuple(cold_buckets):
        if b not in paired:
            if b == "all":
                v.checks.append({"name": "AUC all: challenger - champion", "passed": False, "observed": float("nan"),
                                 "expected": "a paired interval on the events both models scored (none was computed)"})
            continue
        diff, low, high = paired[b]["auc"]
        m = margin if b == "all" else cold_margin
        v.checks.append({"name": f"AUC {b}: challenger - champion", "passed": bool(np.isfinite(high) and high >= -m),
                         "observed": float(diff), "interval": [float(low), float(high)], "margin": float(high + m),
                         "expected": f"not significantly below -{m}: {paired[b]['level']:.0%} interval "
                                     f"[{low:+.4f}, {high:+.4f}] from a paired bootstrap over {paired[b]['users']} "
                                     f"users ({paired[b]['resamples']} resamples, seed {paired[b]['seed']})"})
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
