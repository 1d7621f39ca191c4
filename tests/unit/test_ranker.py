"""Aligned ranker: zero-init alignment equals the content path at step 0, masking, OOV, variants, metrics."""
import dataclasses

import numpy as np
import pytest
import torch

from semalign.models.metrics import BootstrapFrame, auc, gauc, paired_bootstrap
from semalign.models.ranker import BOUNDED, VARIANTS, Frame, ItemTables, Ranker, RankerConfig, predict
from semalign.models.ranker_training import train_ranker


def _tables(n=40, levels=3, k=8, seen=30, seed=0):
    rng = np.random.default_rng(seed)
    vocab = np.zeros(n + 1, np.int64)
    vocab[1:seen + 1] = np.arange(1, seen + 1)  # items seen+1.. are cold: OOV
    codes = np.r_[np.zeros((1, levels), np.int64), rng.integers(0, k, (n, levels))]
    content = np.r_[np.zeros((1, 16), np.float32), rng.standard_normal((n, 16)).astype(np.float32)]
    dedup = np.r_[0, rng.integers(0, 3, n)]
    # centroids that decode each item's codes near its content (as a codebook fit on it would)
    cv = np.stack([np.stack([content[1:][codes[1:, lvl] == c].mean(0) if (codes[1:, lvl] == c).any()
                             else np.zeros(16, np.float32) for c in range(k)]) for lvl in range(levels)]) / levels
    return ItemTables(id_vocab=vocab, content=content, raw=content * 2, codes=codes, n_codes=k, dedup=dedup,
                      code_vectors=cv.astype(np.float32))


def _frame(n_ev=600, n=40, h=5, seed=0):
    """Clicks follow a content direction, so the content path can learn what the IDs cannot for cold items."""
    rng = np.random.default_rng(seed)
    t = _tables(n)
    cand = rng.integers(1, n + 1, n_ev)
    hist = rng.integers(0, n + 1, (n_ev, h))
    hist[:50] = 0  # empty histories
    score = t.content[cand, 0] + 0.3 * rng.standard_normal(n_ev)
    return t, Frame(user_feats=rng.standard_normal((n_ev, 2)).astype(np.float32), cand=cand, hist=hist,
                    label=(score > 0).astype(np.float32))


def test_alignment_block_is_zero_at_step_zero():
    t, f = _frame()
    model = Ranker(RankerConfig(variant="full"), t, 2)
    plain = Ranker(RankerConfig(variant="aligned_content"), t, 2)
    plain.proj.load_state_dict(model.proj.state_dict())
    plain.proj_raw.load_state_dict(model.proj_raw.state_dict())  # generic content kept beside the aligned one
    idx = torch.arange(1, 41)
    assert torch.equal(model.modal_view(idx), plain.modal_view(idx))
    rnd = Ranker(RankerConfig(variant="full", align_init="random"), t, 2)
    assert rnd.align[0].weight.abs().sum() > 0 and model.align[0].weight.abs().sum() == 0


def test_alignment_tables_learn_and_cold_items_share_code_residuals():
    t, f = _frame()
    res = train_ranker(RankerConfig(variant="full", max_epochs=3, batch_size=128), t, f, f)
    m = res.model
    assert any(tbl.weight.abs().sum() > 0 for tbl in m.align)
    # two cold items with identical codes and content get identical modal views (they share residuals)
    with torch.no_grad():
        m.codes[40] = m.codes[39]
        m.content[40] = m.content[39]
        m.raw[40] = m.raw[39]
        v = m.modal_view(torch.tensor([39, 40]))
    assert torch.allclose(v[0], v[1])


def test_cold_items_use_the_shared_oov_row():
    t, _ = _frame()
    m = Ranker(RankerConfig(variant="id_only"), t, 2).eval()
    b = m.behavior_view(torch.tensor([35, 36, 40]))
    assert torch.equal(b[0], b[1]) and torch.equal(b[1], m.id_emb.weight[0])


def test_padding_is_masked_out():
    t, f = _frame()
    m = Ranker(RankerConfig(variant="full"), t, 2).eval()
    u, c, h, _ = f.tensors("cpu")
    h2 = h.clone()
    h2[:50] = 0
    with torch.no_grad():
        base = m(u[:50], c[:50], h2[:50])
        # changing the ids of padded slots must not change the score: padding is by position (0), so
        # a history of all padding equals an empty history
        assert torch.isfinite(base).all()
        one = h2[:1].clone()
        one[0, -1] = 3
        assert not torch.allclose(m(u[:1], c[:1], one), base[:1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_beats_chance(variant):
    t, f = _frame()
    _, val = _frame(seed=1)
    if variant in BOUNDED:  # every item's ID hashed into 16 rows
        from semalign.models.compact import hash_item_rows

        t = dataclasses.replace(t, id_vocab=np.r_[0, hash_item_rows(range(40), 16, seed=0)])
    res = train_ranker(RankerConfig(variant=variant, max_epochs=6, batch_size=128, lr=3e-3,
                                    id_buckets=16 if variant in BOUNDED else 0), t, f, val)
    p = predict(res.model, val)
    assert p.shape == (len(val),) and np.all((p >= 0) & (p <= 1)) and np.isfinite(p).all()
    if variant not in ("id_only", "hashed_id", "sid"):  # content-driven labels; these read no content
        assert auc(val.label, p) > 0.65
    assert 1 <= res.best_epoch <= 6 and res.samples_per_s > 0
    # one steady rate per epoch trained, for whoever reads throughput past the first (warm-up) epoch
    assert len(res.epoch_samples_per_s) == len(res.history) and min(res.epoch_samples_per_s) > 0


def test_no_cross_attention_ablation_has_two_attentions():
    t, _ = _frame()
    assert len(Ranker(RankerConfig(variant="full", cross_attention=False), t, 2).att) == 2
    assert len(Ranker(RankerConfig(variant="full"), t, 2).att) == 4
    with pytest.raises(ValueError, match="unknown ranker variant"):
        RankerConfig(variant="nope")


def test_metrics_against_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500).astype(float)
    p = np.round(rng.random(500), 2)  # ties included
    assert auc(y, p) == pytest.approx(sk.roc_auc_score(y, p))
    users = rng.integers(0, 20, 500)
    per = [(sk.roc_auc_score(y[users == u], p[users == u]), (users == u).sum()) for u in np.unique(users)
           if 0 < y[users == u].mean() < 1]
    assert gauc(y, p, users) == pytest.approx(sum(a * n for a, n in per) / sum(n for _, n in per))


def test_paired_bootstrap_interval_covers_a_real_gain_and_not_a_null_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 3000).astype(float)
    users = rng.integers(0, 100, 3000)
    noise = rng.standard_normal(3000)
    good, bad = y + 0.8 * noise, y + 1.2 * noise
    f = BootstrapFrame(y, users, {"a": good, "b": bad, "c": bad.copy()})
    gain = paired_bootstrap([f], "a", "b", n_boot=100)
    assert gain["auc"][1] > 0 and gain["gauc"][1] > 0
    null = paired_bootstrap([f], "c", "b", n_boot=100)
    assert null["auc"] == (0.0, 0.0, 0.0)


def _gen_cfg(**kw):
    return RankerConfig(variant="full", cold_behavior="generated", **kw)


def test_generated_behavior_view_shapes_and_who_gets_it():
    t, _ = _frame()
    m = Ranker(_gen_cfg(), t, 2).eval()
    idx = torch.tensor([[1, 2, 35], [36, 40, 0]])
    b = m.behavior_view(idx)
    assert b.shape == (2, 3, m.cfg.d)
    # warm items (ID rows 1..30) keep their own ID row; cold ones get the generator's output, not the OOV row
    assert torch.equal(b[0, 0], m.id_emb.weight[1]) and torch.equal(b[0, 1], m.id_emb.weight[2])
    gen = m.generator(m.content[torch.tensor([35, 36, 40])], m.codes[torch.tensor([35, 36, 40])])
    assert torch.allclose(b[0, 2], gen[0]) and torch.allclose(b[1, 0], gen[1]) and torch.allclose(b[1, 1], gen[2])
    assert not torch.allclose(b[0, 2], b[1, 0])  # distinct vectors for distinct new items
    # a dropped warm item is seen through the generator too (that is how the ranker learns to use it)
    dropped = torch.zeros(41, dtype=torch.bool)
    dropped[2] = True
    assert torch.allclose(m.behavior_view(torch.tensor([2]), dropped)[0], m.generator(m.content[2:3], m.codes[2:3])[0])
    with pytest.raises(ValueError):
        RankerConfig(variant="aligned_content", cold_behavior="generated")


def test_generator_is_taught_only_by_training_items_id_rows():
    """The teacher is the ID table, which has rows only for items with training-window events: the
    distillation loss reads no cold item, and it moves the generator, never the teacher."""
    t, f = _frame()
    torch.manual_seed(0)
    m = Ranker(_gen_cfg(id_dropout=0.0), t, 2).train()
    teacher_before = m.id_emb.weight.detach().clone()
    m.behavior_view(torch.arange(41))
    loss_all = m.aux_loss
    # changing a cold item's content or codes changes nothing in the distillation loss
    with torch.no_grad():
        m.content[35:] = torch.randn_like(m.content[35:])
        m.codes[35:] = (m.codes[35:] + 1) % 8
    m.behavior_view(torch.arange(41))
    assert torch.allclose(m.aux_loss, loss_all)
    m.aux_loss.backward()
    assert m.id_emb.weight.grad is None  # the teacher is detached
    assert m.generator.content.weight.grad.abs().sum() > 0
    assert torch.equal(m.id_emb.weight, teacher_before)


def test_distillation_pulls_generated_views_towards_warm_id_rows():
    t, f = _frame()
    res = train_ranker(_gen_cfg(max_epochs=4, batch_size=128, distill_weight=5.0), t, f, f)
    m = res.model.train()
    m.behavior_view(torch.arange(1, 31))
    trained = float(m.aux_loss.detach())
    fresh = Ranker(_gen_cfg(), t, 2).train()
    fresh.id_emb.load_state_dict(m.id_emb.state_dict())
    fresh.behavior_view(torch.arange(1, 31))
    assert trained < 0.8 * float(fresh.aux_loss.detach())


def test_align_levels_reads_only_the_sid_prefix():
    t, _ = _frame()
    m = Ranker(RankerConfig(variant="full", align_levels=1, cold_behavior="generated"), t, 2).eval()
    assert len(m.align) == 1 and len(m.generator.codes) == 1
    with torch.no_grad():
        for tbl in m.align:
            tbl.weight.normal_()
        m.fusion[-1].weight.normal_()
        before = m.modal_view(torch.tensor([5]))
        m.codes[5, 1:] = (m.codes[5, 1:] + 1) % 8  # deeper levels change: nothing the model reads changes
        assert torch.equal(m.modal_view(torch.tensor([5])), before)
        m.codes[5, 0] = (m.codes[5, 0] + 1) % 8
        assert not torch.equal(m.modal_view(torch.tensor([5])), before)


def test_code_dropout_keeps_a_prefix_of_levels_and_only_in_training():
    t, _ = _frame()
    m = Ranker(RankerConfig(variant="full", code_dropout=0.5), t, 2).train()
    keep = m.level_keep((4000, 3), "cpu")
    assert keep[:, 0].eq(1).all()
    assert (keep[:, 2] <= keep[:, 1]).all()  # a dropped level drops every deeper one
    assert 0.4 < keep[:, 1].mean() < 0.6 and 0.15 < keep[:, 2].mean() < 0.35
    assert m.eval().level_keep((10, 3), "cpu") is None


@pytest.mark.parametrize("variant", ["full", "aligned_content", "sid_ngram", "logreg"])
def test_per_call_item_tables_score_like_the_buffers_and_leave_them_alone(variant):
    """Serving hands each request's item rows to forward() (no shared buffer swapped under a lock): the scores
    equal those of a model whose buffers hold the same rows, and the model's own buffers stay as they were."""
    t, f = _frame()
    other = _tables(seed=7)  # another catalogue's rows, as a request would bring
    m = Ranker(RankerConfig(variant=variant, cold_behavior="generated" if variant == "full" else "oov"), t, 2).eval()
    twin = Ranker(m.cfg, other, 2).eval()
    twin.load_state_dict({k: v for k, v in m.state_dict().items() if k not in dict(m.named_buffers())}, strict=False)
    before = {k: v.clone() for k, v in m.named_buffers()}
    u, c, h, _ = f.tensors("cpu")
    given = {"id_vocab": torch.as_tensor(other.id_vocab), "content": torch.as_tensor(other.content),
             "raw": torch.as_tensor(other.raw), "codes": torch.as_tensor(other.codes)}
    with torch.no_grad():
        per_call = m(u, c, h, tables=given)
        assert torch.allclose(per_call, twin(u, c, h), atol=1e-6)
        assert not torch.allclose(per_call, m(u, c, h), atol=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in m.named_buffers())


@pytest.mark.parametrize("cold_behavior", ["oov", "generated"])
def test_cold_view_scores_a_candidate_as_if_it_had_no_id_row(cold_behavior):
    """The cold view is exactly how a new item is scored: the candidate without its ID row, the history's IDs
    untouched; rows not marked cold score as usual."""
    t, f = _frame()
    m = Ranker(RankerConfig(variant="full", cold_behavior=cold_behavior), t, 2).eval()
    u, c, h, _ = f.tensors("cpu")
    c = torch.full_like(c, 3)  # a warm candidate, also in some histories
    h[:, 0] = 3
    no_id = {k: v.clone() for k, v in m.tables().items()}
    no_id["id_vocab"][3] = 0
    mask = torch.arange(len(c)) % 2 == 0
    with torch.no_grad():
        as_new = m(u, c, h, tables=no_id)  # ...but this also hides 3's ID in the history
        cold = m(u, c, h, cold=mask)
        warm = m(u, c, h)
        h_no3 = torch.where(h == 3, 4, h)
        assert torch.allclose(cold[~mask], warm[~mask])
        assert not torch.allclose(cold[mask], warm[mask], atol=1e-4)
        # with a history free of the candidate, hiding the candidate's ID row is the cold view
        assert torch.allclose(m(u, c, h_no3, cold=torch.ones_like(mask)), m(u, c, h_no3, tables=no_id), atol=1e-6)
        assert not torch.allclose(cold[mask], as_new[mask], atol=1e-4)  # the history keeps item 3's ID row


def test_cold_view_loss_teaches_the_new_item_path_from_warm_events():
    """On events whose candidates all have ID rows (id_dropout off), only the cold-view loss trains what a new
    item is scored with: the shared OOV row moves with it and stays put without it. logreg ignores the lever."""
    t, f = _frame()
    warm = f.cand <= 30
    f = Frame(f.user_feats[warm], f.cand[warm], np.where(f.hist[warm] > 30, 0, f.hist[warm]), f.label[warm])
    oov = {}
    for w in (0.0, 1.0):
        cfg = RankerConfig(variant="aligned_content", id_dropout=0.0, cold_view=w, max_epochs=1, batch_size=128,
                           weight_decay=0.0)  # decay alone would move an untouched row
        torch.manual_seed(0)
        init = Ranker(cfg, t, 2).id_emb.weight[0].detach().clone()
        oov[w] = train_ranker(cfg, t, f, f).model.id_emb.weight[0].detach() - init
    assert torch.equal(oov[0.0], torch.zeros_like(oov[0.0])) and oov[1.0].abs().sum() > 0
    with pytest.raises(ValueError, match="cold_view"):
        RankerConfig(cold_view=-1)
    a = train_ranker(RankerConfig(variant="logreg", max_epochs=1), t, f, f).model
    b = train_ranker(RankerConfig(variant="logreg", max_epochs=1, cold_view=1.0), t, f, f).model
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_ngram_lever_gives_full_sid_prefix_behavior_vectors_beside_the_block():
    """full@ngram=1: new items with different SID prefixes get different behavior vectors (the OOV row plus their
    prefix n-grams), items sharing every prefix get the same one; the alignment block stays on the modal view."""
    t, _ = _frame()
    m = Ranker(RankerConfig(variant="full", ngram=True), t, 2).eval()
    assert len(m.align) == 3 and len(m.ngram) == 3
    with torch.no_grad():
        m.codes[36] = m.codes[35]
        m.codes[37, 0] = (m.codes[35, 0] + 1) % 8
        b = m.behavior_view(torch.tensor([35, 36, 37]))
    assert torch.equal(b[0], b[1]) and not torch.allclose(b[0], b[2])
    assert not torch.allclose(b[0], m.id_emb.weight[0])
    assert len(Ranker(RankerConfig(variant="full", ngram=True, align_levels=1), t, 2).ngram) == 1
    with pytest.raises(ValueError, match="ngram"):
        RankerConfig(variant="aligned_content", ngram=True)


@pytest.mark.parametrize("variant", ["full", "sid_ngram", "content"])
def test_static_view_rows_score_like_the_default_path(variant):
    """A CUDA graph needs shapes that do not depend on the data: view_rows="static" computes the views over the
    whole table or over every slot of the batch (whichever is smaller) instead of over the batch's unique rows.
    Same scores either way; code dropout still keeps or drops an item alike in every slot it fills."""
    t, f = _frame(n=400)
    t = _tables(400, seen=300)
    cfg = RankerConfig(variant=variant, cold_behavior="generated" if variant == "full" else "oov")
    m = Ranker(cfg, t, 2).eval()
    u, c, h, _ = Frame(f.user_feats, f.cand, f.hist, f.label).tensors("cpu")
    for rows in (8, 300):  # 8 rows: fewer slots than table rows ("slots"); 300: whole table
        want = m(u[:rows], c[:rows], h[:rows])
        m.view_rows = "static"
        got = m(u[:rows], c[:rows], h[:rows])
        m.view_rows = "auto"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if variant == "full":
        m = Ranker(RankerConfig(variant="full", code_dropout=0.5), t, 2).train()
        with torch.no_grad():
            for tbl in m.align:
                tbl.weight.normal_()
        torch.manual_seed(0)
        idx = torch.tensor([[7, 7, 7, 9], [9, 7, 9, 7]])
        a = torch.stack([tb(m.codes[idx, lvl]) for lvl, tb in enumerate(m.align)], -2)
        torch.manual_seed(0)
        keep = m.level_keep((len(m.codes), 3), "cpu")[idx]
        assert (keep[idx == 7] == keep[0, 0]).all() and (keep[idx == 9] == keep[0, 3]).all()
        assert a.shape[:-1] == keep.shape


def test_cuda_graph_training_is_refused_off_cuda():
    t, f = _frame()
    with pytest.raises(ValueError, match="CUDA"):
        train_ranker(RankerConfig(variant="full", max_epochs=1), t, f, f, cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["full", "id_only"])
def test_cuda_graph_training_learns_like_eager(variant):
    t, f = _frame(n_ev=6000)
    val = _frame(n_ev=2000, seed=1)[1]
    cfg = RankerConfig(variant=variant, max_epochs=4, batch_size=256, lr=3e-3, cold_behavior="generated"
                       if variant == "full" else "oov", cold_view=0.5)
    graphed = train_ranker(cfg, t, f, val, "cuda")
    eager = train_ranker(cfg, t, f, val, "cuda", cuda_graph=False)
    assert graphed.step_mode == "cuda-graph" and eager.step_mode == "eager"
    assert graphed.history[-1]["loss"] < graphed.history[0]["loss"]
    assert abs(graphed.best_val_auc - eager.best_val_auc) < 0.03
    again = train_ranker(cfg, t, f, val, "cuda")  # seeded: the same run (to atomics' rounding)
    np.testing.assert_allclose([r["loss"] for r in again.history], [r["loss"] for r in graphed.history], rtol=1e-3)
