"""Onboarding slots in the codebook catalogue (feature_repo/catalogue.py) on a real state database: the SID written
belongs to the content written, and every onboarding leaves an audit row (issue 32, item 5)."""
import numpy as np
import sqlalchemy as sa

from semalign import state
from semalign.feature_repo.catalogue import PENDING, CodebookCatalogue


def _catalogue(tmp_path) -> CodebookCatalogue:
    cat = CodebookCatalogue(state.engine(f"sqlite:///{tmp_path / 'state.db'}"), "shop")
    cat.begin_publish("cb1", {"levels": 2, "dim": 4, "n_items": 1, "content_hash": "h"}, ["a"], ["1-2"], [0])
    cat.finish_publish("cb1")
    return cat


def _slot(cat, item):
    t = state.item_sids
    with cat.engine.connect() as c:
        return c.execute(sa.select(t.c.sid_key, t.c.dedup, t.c.source).where(t.c.item_id == item)).one()


def test_a_pending_slot_is_not_kept_for_other_content(tmp_path):
    cat = _catalogue(tmp_path)
    # a writer reserved "new" for its first content (codes 1-2, dedup 1 beside "a") and died before confirming
    codes, dedup, write, fresh = cat.reserve("cb1", ["new"], np.array([[1, 2]]))
    assert (codes.tolist(), dedup.tolist()) == ([[1, 2]], [1]) and _slot(cat, "new").source == PENDING
    # the same content again: the same slot, written again
    codes, dedup, write, _ = cat.reserve("cb1", ["new"], np.array([[1, 2]]))
    assert (codes.tolist(), dedup.tolist(), write.tolist()) == ([[1, 2]], [1], [True])
    # other content: its own codes, not the reserved SID with the new content's vectors
    codes, dedup, write, _ = cat.reserve("cb1", ["new"], np.array([[3, 0]]))
    assert (codes.tolist(), dedup.tolist(), write.tolist()) == ([[3, 0]], [0], [True])
    assert tuple(_slot(cat, "new")) == ("3-0", 0, PENDING)
    cat.confirm("cb1", ["new"], actor="key:writer")
    assert _slot(cat, "new").source == "onboard"
    # confirmed: kept whatever content comes later, and not written again
    codes, _, write, fresh = cat.reserve("cb1", ["new"], np.array([[1, 2]]))
    assert codes.tolist() == [[3, 0]] and not write.any() and not fresh.any()


def test_every_onboarding_is_audited(tmp_path):
    cat = _catalogue(tmp_path)
    ids = [f"i{k}" for k in range(25)]
    cat.reserve("cb1", ids, np.array([[k % 4, k // 4] for k in range(25)]))
    with state.acting_as("api-key:writer"):   # as the service records an onboarding for its caller
        cat.confirm("cb1", ids)
    cat.reserve("cb1", ["late"], np.array([[0, 1]]))
    cat.confirm("cb1", ["late"])
    with cat.engine.connect() as c:
        rows = c.execute(sa.select(state.audit).where(state.audit.c.action == "onboard")
                         .order_by(state.audit.c.id)).all()
    assert [(r.subject, r.to_value, r.actor, r.project) for r in rows] == [
        ("codebook:cb1", "25 items", "api-key:writer", "shop"), ("codebook:cb1", "1 item", state.current_actor(), "shop")]
    assert rows[0].reason.startswith("items: i0, i1") and rows[0].reason.endswith("and 5 more")
