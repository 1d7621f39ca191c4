"""Bounded item tables (hashed IDs, SID n-gram rows) and compact vectors: what a ranker at catalogue scale reads."""
import dataclasses
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from semalign.models.compact import VectorCodec, codec_bytes, hash_item_rows, sid_ngram_params, sid_ngram_rows
from semalign.models.ranker import ItemTables, Ranker, RankerConfig


def test_item_hashing_is_deterministic_seeded_bounded_and_spread():
    ids = [f"item-{i}" for i in range(5000)]
    a = hash_item_rows(ids, 500, seed=3)
    assert np.array_equal(a, hash_item_rows(ids, 500, seed=3))            # same seed: same rows, every process
    assert a.min() >= 1 and a.max() <= 500                                   # row 0 stays padding / OOV
    assert (a != hash_item_rows(ids, 500, seed=4)).mean() > 0.9              # another seed: other collisions
    counts = np.bincount(a, minlength=501)[1:]
    assert counts.max() < 3 * counts.mean()                                  # ~10 items a row, none hoards them
    # an id hashes by its text: the int 7 and the string "7" share a row (ids travel as strings when served)
    assert hash_item_rows([7], 500, 0)[0] == hash_item_rows(["7"], 500, 0)[0]
    with pytest.raises(ValueError, match="buckets"):
        hash_item_rows(ids, 0, 0)


def test_sid_ngram_rows_share_by_prefix_and_separate_levels():
    mult, a, b = sid_ngram_params(levels=3, n_codes=16, seed=0)
    codes = torch.tensor([[1, 2, 3], [1, 2, 4], [1, 5, 3], [2, 2, 3], [1, 2, 3]])
    dedup = torch.tensor([0, 0, 0, 0, 1])
    rows = sid_ngram_rows(codes, dedup, mult, a, b, buckets=1 << 20)
    assert rows.shape == (5, 4) and rows.min() >= 1 and rows.max() <= 1 << 20
    assert rows[0, 0] == rows[1, 0] == rows[2, 0] != rows[3, 0]       # c1 shared by items 0-2
    assert rows[0, 1] == rows[1, 1] != rows[2, 1]                      # c1c2 shared by items 0-1
    assert rows[0, 2] != rows[1, 2]                                    # c1c2c3 differs
    assert torch.equal(rows[0, :3], rows[4, :3]) and rows[0, 3] != rows[4, 3]   # dedup splits only the full SID
    assert len(set(rows[0].tolist())) == 4                             # levels hash apart (own a, b each)
    again = sid_ngram_rows(codes, dedup, *sid_ngram_params(3, 16, 0), buckets=1 << 20)
    assert torch.equal(rows, again)
    assert not torch.equal(rows, sid_ngram_rows(codes, dedup, *sid_ngram_params(3, 16, 1), buckets=1 << 20))


def _catalogue(n=60, seen=40, levels=3, k=8, seed=0):
    rng = np.random.default_rng(seed)
    vocab = np.zeros(n + 1, np.int64)
    vocab[1:seen + 1] = np.arange(1, seen + 1)
    codes = np.r_[np.zeros((1, levels), np.int64), rng.integers(0, k, (n, levels))]
    content = np.r_[np.zeros((1, 16), np.float32), rng.standard_normal((n, 16)).astype(np.float32)]
    return ItemTables(id_vocab=vocab, content=content, raw=content, codes=codes, n_codes=k,
                      dedup=np.r_[0, rng.integers(0, 2, n)], code_vectors=rng.standard_normal((levels, k, 16)))


def test_sid_ranker_reads_nothing_but_codes_and_its_table_is_the_budget():
    t = _catalogue()
    m = Ranker(RankerConfig(variant="sid", id_buckets=25, keep_raw_content=False), t, 2).eval()
    assert not hasattr(m, "content") and not hasattr(m, "raw")          # no per-item vector at serving
    # its modal view decodes codes through the codebook's centroids: model parameters, frozen by default
    assert all(not t.weight.requires_grad for t in m.code_vec)
    assert "code_vec.0.weight" in m.state_dict()
    with pytest.raises(ValueError, match="centroids"):
        Ranker(RankerConfig(variant="sid"), dataclasses.replace(t, code_vectors=None), 2)
    assert not Ranker(RankerConfig(variant="sid", code_vectors="off"),
                      dataclasses.replace(t, code_vectors=None), 2).has_modal
    assert m.id_emb.num_embeddings == 26                                  # the budget, not the catalogue
    big = _catalogue(n=600, seen=400)
    assert Ranker(RankerConfig(variant="sid", id_buckets=25), big, 2).id_emb.num_embeddings == 26
    # a cold item (no ID row) scores from its codes alone: give item 60 item 1's codes and dedup, and a history
    # slot holding either gives the same score; content and ID rows are not read
    u = torch.zeros(2, 2)
    with torch.no_grad():
        m.codes[60] = m.codes[1]
        m.dedup[60] = m.dedup[1]
        m.id_vocab[60] = 0
        s = m(u, torch.tensor([1, 60]), torch.tensor([[2, 3], [2, 3]]))
        assert torch.allclose(s[0], s[1])
        # per-request tables with codes only (as the compact serving profile sends them) give the same scores
        tab = {"id_vocab": torch.zeros(4, dtype=torch.long), "codes": m.codes[[0, 1, 2, 3]],
               "dedup": m.dedup[[0, 1, 2, 3]]}
        s2 = m(u, torch.tensor([1, 1]), torch.tensor([[2, 3], [2, 3]]), tables=tab)
        assert torch.allclose(s2, s[:1].expand(2))


def test_hashed_id_ranker_hashes_every_item_into_the_budget():
    with pytest.raises(ValueError, match="id_buckets > 0"):
        RankerConfig(variant="hashed_id")
    t = _catalogue()
    rows = hash_item_rows([str(i) for i in range(60)], 10, seed=0)
    t = dataclasses.replace(t, id_vocab=np.r_[0, rows])
    m = Ranker(RankerConfig(variant="hashed_id+dense", id_buckets=10), t, 2)
    assert m.id_emb.num_embeddings == 11
    # item_tables, the one builder for training, evaluation and serving, hashes ids the same way
    from semalign.features import item_tables

    items = SimpleNamespace(items=pd.DataFrame({"item_id": [str(i) for i in range(60)]}), n_items=60)
    split = SimpleNamespace(train_items=np.arange(40))
    cfg = RankerConfig(variant="hashed_id", id_buckets=10)
    built = item_tables(items, split, t.content[1:], None, t.codes[1:], 8, t.dedup[1:], cfg)
    assert np.array_equal(built.id_vocab, t.id_vocab)        # unseen items 40-59 hash too: the table cannot know
    plain = item_tables(items, split, t.content[1:], None, t.codes[1:], 8)
    assert plain.id_vocab[41:].max() == 0 and plain.n_ids == 41


@pytest.mark.parametrize("codec", ["int8", "pq4", "pq8", "pq16", "pq32"])
def test_vector_codecs_bound_bytes_and_error(codec):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 128)).astype(np.float32) @ rng.standard_normal((128, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    vc = VectorCodec(codec, seed=0, iters=8).fit(x[:2000])
    y = vc.roundtrip(x)
    err = float(((y - x) ** 2).sum(1).mean())
    assert y.shape == x.shape and y.dtype == np.float32
    assert err < (0.01 if codec == "int8" else 0.9)
    codes = vc.encode(x[:5])
    if codec.startswith("pq"):
        assert codes.dtype == np.uint8 and codes.shape == (5, codec_bytes(codec, 128))
    assert codec_bytes("float", 128) == 512 and codec_bytes("int8", 128) == 132


def test_more_pq_bytes_reconstruct_better():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    errs = [float(((VectorCodec(c, iters=8).fit(x).roundtrip(x) - x) ** 2).mean()) for c in ("pq4", "pq8", "pq16")]
    assert errs[0] > errs[1] > errs[2]
    with pytest.raises(ValueError, match="unknown vector codec"):
        VectorCodec("pq3")
