"""The scoring service behind the HTTP routes: a user against candidate items with the champion, candidates the
store lacks encoded on the fly from their content (and onboarded when asked), and onboarding. Raises semalign's
errors (each carries its HTTP status); knows nothing of HTTP itself."""
from __future__ import annotations

import numpy as np

from semalign.deploy.api import Candidate, OnboardRequest, Scored, ScoreRequest, ScoreResponse
from semalign.deploy.champion import ChampionHolder
from semalign.errors import InvalidInputError, NotFoundError, TooLargeError, UnavailableError


# /health while the champion holder serves without the registry (deploy/champion.py)
DEGRADED_REGISTRY = "the model registry cannot be reached: serving the champion this home last served"


class EncodingBusy(UnavailableError):
    """No encoding slot came free in time: the request is refused rather than queued without bound."""
    retry_after_s = 1


def _frame(items: list[Candidate]):
    import pandas as pd

    return pd.DataFrame({"item_id": [c.item_id for c in items], "text": [c.text for c in items]})


def _has_text(c: Candidate) -> bool:
    return bool(c.text and c.text.strip())


class ScoringService:
    """Caps per request: `max_candidates` candidates, `max_new_items` items to encode (on the fly or onboarded),
    and `encode_concurrency` requests encoding at once, each waiting at most `encode_wait_s` for a slot."""

    def __init__(self, champion: ChampionHolder, max_candidates: int = 1000, max_new_items: int = 32,
                 encode_concurrency: int = 2, encode_wait_s: float = 2.0):
        import threading

        self.champion, self.max_candidates, self.max_new_items = champion, max_candidates, max_new_items
        self._encoding = threading.BoundedSemaphore(encode_concurrency)
        self.encode_wait_s = encode_wait_s

    def _check_size(self, n: int, what: str, limit: int | None = None) -> None:
        limit = self.max_candidates if limit is None else limit
        if n > limit:
            raise TooLargeError(f"{n} {what}; at most {limit} per request")

    def _encoding_slot(self):
        """A context holding one of the encoding slots; EncodingBusy when none frees up in time."""
        import contextlib

        if not self._encoding.acquire(timeout=self.encode_wait_s):
            raise EncodingBusy(f"all encoding slots are busy (waited {self.encode_wait_s:g} s); retry shortly")

        @contextlib.contextmanager
        def held():
            try:
                yield
            finally:
                self._encoding.release()

        return held()

    def score(self, req: ScoreRequest) -> ScoreResponse:
        self._check_size(len(req.candidates), "candidates")
        ids = [c.item_id for c in req.candidates]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("candidate item_ids must be unique")
        s = self.champion.current()
        sc = s.scorer
        users = sc.store.users_online([req.user_id], sc.users_version)
        if users[0] is None:
            raise NotFoundError(f"unknown user '{req.user_id}' (not in the feature store)")
        feats, hists, _ = sc.user_rows([req.user_id], records=users)
        # one read for candidates and history: whatever the store lacks must come with content
        known = sc.item_features(list(dict.fromkeys(ids + hists[0])))
        new = [c for c in req.candidates if not known[c.item_id][1]]
        no_content = [c.item_id for c in new if not _has_text(c)]
        if no_content:
            raise NotFoundError(f"items not in the store and sent without content: {no_content[:10]}")
        self._check_size(len(new), "items to encode", self.max_new_items)
        source = {i: "store" for i in ids}
        extra = self._new_items(s, new, req.onboard, known, source)
        # the response's SIDs: on-the-fly items have no dedup level (they hold no slot in the store)
        sids = {i: (extra[i][0] if i in extra else known[i][0]) for i in ids}
        feats_of = dict(extra)  # everything already read goes in, so scoring reads nothing twice
        for iid, (c, f, e, r) in known.items():
            if f and iid not in feats_of:
                feats_of[iid] = (c[: sc.levels], e, r)
        p = sc.score_rows(np.repeat(feats, len(ids), 0), ids, [hists[0]] * len(ids), extra=feats_of)
        items = [Scored(item_id=iid, score=float(p[j]), sid=[int(x) for x in np.asarray(sids[iid]).tolist()],
                        source=source[iid]) for j, iid in enumerate(ids)]
        items.sort(key=lambda r: -r.score)
        return ScoreResponse(user_id=req.user_id, model_version=s.model_version, codebook_version=s.codebook_version,
                             items=items)

    def _new_items(self, s, new: list[Candidate], onboard: bool, known: dict, source: dict) -> dict:
        """Candidates the store lacks: onboarded (then read back into `known`) or encoded on the fly. Returns the
        on-the-fly items' features {item_id: (codes, aligned vector, text-tower vector)}; marks `source`."""
        if not new:
            return {}
        sc, frame = s.scorer, _frame(new)
        if onboard:
            with self._encoding_slot():
                out = sc.store.onboard(frame, version=s.codebook_version)
            for r in out.itertuples():
                source[r.item_id] = "onboarded"
            known.update(sc.item_features([c.item_id for c in new]))
            return {}
        with self._encoding_slot():
            codes, emb, raw = sc.store.encode(frame, version=s.codebook_version)
        extra = {}
        for k, c in enumerate(new):
            extra[c.item_id] = (codes[k], emb[k], raw[k])
            source[c.item_id] = "on_the_fly"
        return extra

    def onboard(self, req: OnboardRequest) -> dict:
        self._check_size(len(req.items), "items to encode", self.max_new_items)
        s = self.champion.current()
        missing = [c.item_id for c in req.items if not _has_text(c)]
        if missing:
            raise InvalidInputError(f"items need non-empty text: {missing[:10]}")
        with self._encoding_slot():
            out = s.scorer.store.onboard(_frame(req.items), version=s.codebook_version)
        return {"codebook_version": s.codebook_version, "items": out.to_dict("records")}

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body): 503 while no champion is loaded or its online store is unreachable."""
        from semalign.feature_repo.errors import StoreUnavailableError

        s = self.champion.served
        if s is None:
            return 503, {"status": "unhealthy", "error": "no champion loaded"}
        try:
            s.scorer.store.read_online(["__health__"], s.codebook_version, s.scorer.levels)
        except StoreUnavailableError:
            return 503, {"status": "unhealthy", "error": "the online feature store is unreachable"}
        # open to anyone: says that the last champion check failed, not why (the log says why)
        body = {"status": "ok", "model_version": s.model_version, "codebook_version": s.codebook_version,
                "last_check_error": "the last champion check failed" if self.champion.error else None}
        if self.champion.degraded:
            body.update(status="degraded", error=DEGRADED_REGISTRY)
        return 200, body

    def version(self) -> dict:
        s = self.champion.current()
        return {"model": self.champion.settings.model_name, "model_version": s.model_version,
                "codebook_version": s.codebook_version, "encoder_version": s.encoder_version,
                "loaded_at": s.loaded_at}
