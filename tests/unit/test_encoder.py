"""Behavior-aware encoder: learns behavior pairs beyond raw content, round-trips through safetensors."""
import numpy as np

from semalign.models.encoder import EncoderConfig, embed_items, hit_at_k, load_encoder, save_encoder, train_encoder


def _synthetic(seed=0):
    """Content is a noisy view; behavior follows hidden groups the raw content only weakly shows."""
    rng = np.random.default_rng(seed)
    n, groups = 600, 100
    g = rng.integers(0, groups, n)
    signal = rng.standard_normal((groups, 48)).astype(np.float32)
    text = 0.06 * signal[g] @ rng.standard_normal((48, 64)).astype(np.float32) + rng.standard_normal((n, 64)).astype(np.float32)
    image = rng.standard_normal((n, 40)).astype(np.float32) + 0.3 * signal[g][:, :40]
    has = rng.random(n) < 0.7

    def pairs(m):
        a = rng.integers(0, n, m * 3)
        b = np.array([rng.choice(np.flatnonzero(g == g[i])) for i in a])
        p = np.stack([a, b], 1)
        return p[p[:, 0] != p[:, 1]][:m]
    return text, image, has, pairs(3000), pairs(300), pairs(300)


def test_encoder_beats_raw_features_on_held_out_pairs(tmp_path):
    text, image, has, tr, va, te = _synthetic()
    cfg = EncoderConfig(text_dim=64, image_dim=40, image_pca=16, hidden=64, out_dim=32, epochs=10, batch_size=256,
                        content_weight=0.5)
    res = train_encoder(text, image, has, tr, va, cfg)
    emb = embed_items(res.model, text, image, has)
    assert emb.shape == (600, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert hit_at_k(emb, te, 5) > 1.3 * hit_at_k(text, te, 5)
    assert 1 <= res.best_epoch <= 10 and len(res.history) == 10
    # same seed, same model
    again = train_encoder(text, image, has, tr, va, cfg)
    assert np.allclose(embed_items(again.model, text, image, has), emb, atol=1e-5)
    save_encoder(res.model, tmp_path / "enc", {"version": "t"})
    loaded, meta = load_encoder(tmp_path / "enc")
    assert meta["version"] == "t" and np.allclose(embed_items(loaded, text, image, has), emb, atol=1e-6)


def test_hit_at_k_excludes_the_query_itself():
    emb = np.eye(4, dtype=np.float32)
    emb[1], emb[3] = emb[0], emb[2]
    assert hit_at_k(emb, np.array([[0, 1]]), k=1) == 1.0
    assert hit_at_k(emb, np.array([[0, 2]]), k=1) == 0.0


def test_fine_tuning_with_the_anchor_keeps_items_near_the_parent():
    from dataclasses import replace

    text, image, has, tr, va, _ = _synthetic()
    cfg = EncoderConfig(text_dim=64, image_dim=40, image_pca=16, hidden=64, out_dim=32, epochs=4, batch_size=256)
    parent = train_encoder(text, image, has, tr, va, cfg).model
    before = embed_items(parent, text, image, has)
    changed = np.concatenate([tr[: int(0.9 * len(tr))], _synthetic(seed=1)[3][: int(0.1 * len(tr))]])
    free = embed_items(train_encoder(text, image, has, changed, va, replace(cfg, anchor_weight=0.0), init=parent).model,
                       text, image, has)
    anchored = embed_items(train_encoder(text, image, has, changed, va, cfg, init=parent).model, text, image, has)
    assert (anchored * before).sum(1).mean() > (free * before).sum(1).mean() + 0.01


def test_hit_at_k_does_not_depend_on_the_chunk_it_scores_queries_in():
    """hit_at_k bounds its [chunk, items] score matrix by shrinking the chunk on large catalogues: same answer."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((300, 16)).astype(np.float32)
    pairs = rng.integers(0, 300, size=(200, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    assert hit_at_k(emb, pairs, 10, chunk=3) == hit_at_k(emb, pairs, 10) == hit_at_k(emb, pairs, 10, chunk=10_000)


def test_hit_at_k_scores_a_fixed_sample_of_pairs_above_its_cap():
    """Past MAX_EVAL_PAIRS the evaluation scores a fixed-seed sample (cost linear in the catalogue); at or under the
    cap every pair counts, and the sample's estimate stays close to the full figure."""
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((400, 8)).astype(np.float32)
    emb[1::2] = emb[::2] + 0.3 * rng.standard_normal((200, 8)).astype(np.float32)   # neighbours to find
    pairs = np.stack([np.arange(0, 400, 2), np.arange(1, 400, 2)], 1).repeat(20, 0)
    pairs = np.concatenate([pairs, rng.integers(0, 400, size=(4000, 2))])
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    full = hit_at_k(emb, pairs, 5, max_pairs=None)
    assert hit_at_k(emb, pairs, 5, max_pairs=len(pairs)) == full
    keep = np.sort(np.random.default_rng(0).choice(len(pairs), 1000, replace=False))
    sampled = hit_at_k(emb, pairs, 5, max_pairs=1000)
    assert sampled == hit_at_k(emb, pairs[keep], 5, max_pairs=None) == hit_at_k(emb, pairs, 5, max_pairs=1000)
    assert abs(sampled - full) < 0.05 and sampled != full


def test_hard_negative_batches_group_a_share_of_each_batch_by_first_level_cluster():
    """Every pair is trained once an epoch; the hard share of a batch comes from one to three clusters of the current
    embedding (a random batch spreads over many), and training with it still learns behavior beyond content."""
    import torch

    from semalign.models.encoder import hard_negative_order
    from semalign.models.kmeans import kmeans

    text, image, has, tr, va, te = _synthetic()
    cfg = EncoderConfig(text_dim=64, hidden=64, out_dim=32, epochs=6, batch_size=200, hard_negative_share=0.5,
                        hard_negative_codes=16)
    emb = text / np.linalg.norm(text, axis=1, keepdims=True)
    order = hard_negative_order(tr, emb, cfg, torch.Generator().manual_seed(0), 0).numpy()
    assert np.array_equal(np.sort(order), np.arange(len(tr)))
    x = torch.as_tensor(emb)
    cluster = torch.cdist(x, kmeans(x, 16, iters=10, seed=0)).argmin(1).numpy()
    hard_clusters = [len(np.unique(cluster[tr[order[s: s + 100], 0]])) for s in range(0, 2800, 200)]
    easy_clusters = [len(np.unique(cluster[tr[order[s + 100: s + 200], 0]])) for s in range(0, 2800, 200)]
    assert max(hard_clusters) <= 3 and np.mean(hard_clusters) < 2.5 and min(easy_clusters) >= 8
    res = train_encoder(text, None, None, tr, va, cfg)
    assert hit_at_k(embed_items(res.model, text), te, 5) > 1.3 * hit_at_k(text, te, 5)
    try:
        EncoderConfig(hard_negative_share=1.5)
    except ValueError as e:
        assert "hard_negative_share" in str(e)
    else:
        raise AssertionError("a share above 1 must be refused")


def test_encoder_metrics_count_pairs_with_a_cold_item_on_either_side():
    """The refresh's encoder metrics: the cold-pair subset is every test pair with a cold item as either member
    (vectorised; it used to be a Python loop over the pairs), scored like the whole set."""
    from types import SimpleNamespace

    from semalign.flows.semantic_ids import TowerFeatures, encoder_metrics

    rng = np.random.default_rng(0)
    text = rng.standard_normal((40, 8)).astype(np.float32)
    feats = TowerFeatures(text=text, image=None, has_image=np.zeros(40, bool), text_model="t", image_model=None,
                          computed={})
    pairs = rng.integers(0, 40, (200, 2))
    cold = np.array([3, 17, 29])
    m = encoder_metrics(text, feats, SimpleNamespace(cold_items=cold), pairs, 5)
    expect = pairs[[a in cold or b in cold for a, b in pairs]]
    assert m["test_pairs"] == 200 and m["test_pairs_with_cold_item"] == len(expect) > 0
    assert m["hit@5"]["encoder_cold_pairs"] == hit_at_k(text, expect, 5)
    assert m["hit@5"]["encoder"] == m["hit@5"]["raw_text"] == hit_at_k(text, pairs, 5)
    none = encoder_metrics(text, feats, SimpleNamespace(cold_items=np.array([], np.int64)), pairs, 5)
    assert none["test_pairs_with_cold_item"] == 0 and np.isnan(none["hit@5"]["encoder_cold_pairs"])
