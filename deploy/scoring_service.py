"""The scoring service behind the HTTP routes: a user against candidate items with the champion, candidates the
store lacks encoded on the fly from their content (and onboarded when asked), and onboarding. Requests arrive
validated against the API's schema (deploy/api.py: caps, unique ids, non-blank texts); raises semalign's errors
(each carries its HTTP status) for what depends on the store; knows nothing of HTTP itself."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from semalign.deploy.api import Candidate, Scored, ScoreResponse
from semalign.deploy.champion import ChampionHolder
from semalign.errors import InvalidInputError, NotFoundError, TooLargeError, UnavailableError

log = logging.getLogger("semalign.serve")


# /health while the champion holder serves without the registry (deploy/champion.py)
DEGRADED_REGISTRY = "the model registry cannot be reached: serving the champion this home last served"


class EncodingBusy(UnavailableError):
    """No encoding slot came free in time: the request is refused rather than queued without bound."""
    retry_after_s = 1


def _frame(items: list[Candidate]):
    return _frame_of({"item_id": [c.item_id for c in items], "text": [c.text for c in items]})


def _frame_of(columns: dict):
    import pandas as pd

    return pd.DataFrame(columns)


# what the encoding probe encodes (never written): a short text, like an item's
PROBE = {"item_id": ["__health_probe__"], "text": ["health probe: an item's content encoded on the fly"]}


class EncodingState:
    """Whether content of items the store lacks can be encoded under the served codebook version: the outcome of
    the last encoding (a request's, or a probe's), per version. A failure is the server's (a codebook or encoder
    folder gone or damaged, the text tower unloadable), never the caller's input."""

    def __init__(self):
        self.version: str | None = None
        self.failure: str | None = None
        self.at = 0.0

    def record(self, version: str, failure: str | None) -> None:
        self.version, self.failure, self.at = version, failure, time.time()


class ScoringService:
    """At most `max_new_items` items to encode per /score request (the other caps are the schema's), and
    `encode_concurrency` requests encoding at once, each waiting at most `encode_wait_s` for a slot. Encoding is
    probed in the background (at most every `probe_interval_s`, when /health asks) so that /health reports a
    service that cannot encode new content as degraded before a request fails on it."""

    def __init__(self, champion: ChampionHolder, max_new_items: int = 32, encode_concurrency: int = 2,
                 encode_wait_s: float = 2.0, probe_interval_s: float = 30.0):
        self.champion, self.max_new_items = champion, max_new_items
        self._encoding = threading.BoundedSemaphore(encode_concurrency)
        self.encode_wait_s, self.probe_interval_s = encode_wait_s, probe_interval_s
        self.encoding = EncodingState()
        self._probing = threading.Lock()

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

    def _encode(self, s, call):
        """Runs `call()` (an encoding under champion `s`'s codebook version) in an encoding slot, recording its
        outcome: a failure that is not the caller's input marks encoding broken until one succeeds."""
        with self._encoding_slot():
            try:
                out = call()
            except (InvalidInputError, UnavailableError):  # the caller's input; a store down (unhealthy) or busy
                raise
            except Exception as e:
                self.encoding.record(s.codebook_version, type(e).__name__)
                raise
            self.encoding.record(s.codebook_version, None)
            return out

    def score(self, req) -> ScoreResponse:
        """`req`: a ScoreRequest (deploy/api.py request_models)."""
        ids = [c.item_id for c in req.candidates]
        s = self.champion.current()
        sc = s.scorer
        users = sc.store.users_online([req.user_id], sc.users_version)
        if users[0] is None:
            raise NotFoundError(f"unknown user '{req.user_id}' (not in the feature store)")
        feats, hists, _ = sc.user_rows([req.user_id], records=users)
        # one read for candidates and history: whatever the store lacks must come with content
        known = sc.item_features(list(dict.fromkeys(ids + hists[0])))
        new = [c for c in req.candidates if not known[c.item_id][1]]
        no_content = [c.item_id for c in new if c.text is None]
        if no_content:
            raise NotFoundError(f"items not in the store and sent without content: {no_content[:10]}")
        if len(new) > self.max_new_items:
            raise TooLargeError(f"{len(new)} items to encode (candidates the store lacks); at most "
                                f"{self.max_new_items} per request")
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
            out = self._encode(s, lambda: sc.store.onboard(frame, version=s.codebook_version))
            for r in out.itertuples():
                source[r.item_id] = "onboarded"
            known.update(sc.item_features([c.item_id for c in new]))
            return {}
        codes, emb, raw = self._encode(s, lambda: sc.store.encode(frame, version=s.codebook_version))
        extra = {}
        for k, c in enumerate(new):
            extra[c.item_id] = (codes[k], emb[k], raw[k])
            source[c.item_id] = "on_the_fly"
        return extra

    def onboard(self, req) -> dict:
        """`req`: an OnboardRequest (deploy/api.py request_models: at most max_new_items items, each with text)."""
        s = self.champion.current()
        out = self._encode(s, lambda: s.scorer.store.onboard(_frame(req.items), version=s.codebook_version))
        return {"codebook_version": s.codebook_version, "items": out.to_dict("records")}

    def _probe_encoding(self, s) -> None:
        """Encodes PROBE under `s`'s version in a background thread, unless a probe runs or every encoding slot
        is taken (then requests are encoding, and their outcomes say the same)."""
        if not self._probing.acquire(blocking=False):
            return

        def probe():
            try:
                if not self._encoding.acquire(blocking=False):
                    return
                self._encoding.release()
                self._encode(s, lambda: s.scorer.store.encode(_frame_of(PROBE), version=s.codebook_version))
            except Exception as e:  # recorded by _encode when it is the server's; the log says why
                log.warning("encoding probe under codebook %s failed: %s: %s", s.codebook_version,
                            type(e).__name__, e)
            finally:
                self._probing.release()

        threading.Thread(target=probe, daemon=True, name="encoding-probe").start()

    def health(self) -> tuple[int, dict]:
        """(HTTP status, body): 503 `unhealthy` while no champion is loaded or its online store is unreachable;
        200 `degraded` while items the store lacks cannot be encoded (stored items are still scored), or while the
        champion is served without the registry; else 200 `ok`."""
        from semalign.feature_repo.errors import StoreUnavailableError

        s = self.champion.served
        if s is None:
            return 503, {"status": "unhealthy", "error": "no champion loaded"}
        try:
            s.scorer.store.read_online(["__health__"], s.codebook_version, s.scorer.levels)
        except StoreUnavailableError:
            return 503, {"status": "unhealthy", "error": "the online feature store is unreachable"}
        enc = self.encoding
        known = enc.version == s.codebook_version
        if not known or time.time() - enc.at > self.probe_interval_s:
            self._probe_encoding(s)
        # open to anyone: says what fails, not why (the log says why)
        body = {"status": "ok", "model_version": s.model_version, "codebook_version": s.codebook_version,
                "last_check_error": "the last champion check failed" if self.champion.error else None}
        reasons = []
        if known and enc.failure:
            reasons.append("items the store lacks cannot be encoded (items it holds are still scored)")
        if self.champion.degraded:
            reasons.append(DEGRADED_REGISTRY)
        if reasons:
            body.update(status="degraded", error="; ".join(reasons))
        return 200, body

    def version(self) -> dict:
        s = self.champion.current()
        return {"model": self.champion.settings.model_name, "model_version": s.model_version,
                "codebook_version": s.codebook_version, "encoder_version": s.encoder_version,
                "loaded_at": s.loaded_at}
