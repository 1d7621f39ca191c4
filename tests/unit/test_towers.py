"""Frozen towers with the real bundled models (offline), and the content-addressed feature cache."""
import numpy as np
import pytest
import torch

from semalign.config import Settings
from semalign.models.towers import FeatureCache, ImageTower, TextTower, file_key, text_key

TEXTS = ["A cowboy doll is jealous of a new spaceman toy.", "A toy cowboy envies a new astronaut figure.",
         "Tax law changes for small businesses in 2024.", "x"]


@pytest.fixture(scope="module")
def text_tower():
    return TextTower(Settings().resolved_text_model())


def test_text_tower_matches_sentence_transformers(text_tower):
    st = pytest.importorskip("sentence_transformers")
    ours = text_tower.encode(TEXTS)
    ref = st.SentenceTransformer(str(Settings().resolved_text_model()), device="cpu").encode(
        TEXTS, normalize_embeddings=True)
    assert ours.shape == (4, 384)
    assert np.min((ours * ref).sum(1)) > 0.999
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_any_local_model_dir_loads(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextTower(tmp_path)


def test_image_tower_survives_unreadable_images(movielens, tmp_path):
    paths = [p for p in movielens.items["image_path"] if p][:3]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    feats, ok = ImageTower().encode(paths + [str(bad), None])
    assert feats.shape == (5, 1280) and ok.tolist() == [True, True, True, False, False]
    assert np.abs(feats[:3]).sum() > 0 and np.abs(feats[3:]).sum() == 0


def test_feature_cache_computes_only_missing(tmp_path, text_tower):
    cache = FeatureCache(tmp_path, text_tower.fingerprint)
    calls = []

    def compute(missing):
        calls.append(list(missing))
        return text_tower.encode([TEXTS[i] for i in missing]), np.ones(len(missing), bool)

    v1, ok1, n1 = cache.get_or_compute([text_key(t) for t in TEXTS[:2]], compute)
    v2, _, n2 = FeatureCache(tmp_path, text_tower.fingerprint).get_or_compute([text_key(t) for t in TEXTS], compute)
    assert (n1, n2) == (2, 2) and calls == [[0, 1], [2, 3]]
    assert np.allclose(v2[:2], v1) and ok1.all()
    assert file_key(None) == "none"


def test_the_direct_rust_tokenization_gives_the_tokenizers_own_tokens(text_tower):
    """The tower calls the fast tokenizer's Rust backend directly (transformers' per-text Python work bound the
    GPU path); it must give exactly what the tokenizer's own call gives: ids, mask, type ids, padding, cut."""
    long = "word " * 400                                             # beyond max_length tokens: cut
    texts = TEXTS + ["", "Ünïcödé — 東京 🎬 café", long, "a b", "  spaced   out  "]
    want = text_tower.tokenizer(texts, padding=True, truncation=True, max_length=text_tower.max_length,
                                return_tensors="pt")
    got = text_tower.tokenize(texts)
    assert text_tower._fast is not None and set(got) == set(want.keys())
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert got["input_ids"].shape[1] == text_tower.max_length
    assert text_tower.tokenizer(["x y"], padding=True)["input_ids"] == [[101, 1060, 1061, 102]]  # its own untouched


def test_tokenizer_worker_processes_give_the_same_tokens_and_vectors_as_tokenizing_in_process(text_tower):
    """On a GPU the tower tokenizes in forked worker processes (the forward outran one process); the batches and
    their tokens are exactly those of the in-process loop, and the vectors come back in the caller's order.
    Checked on CPU with the worker path asked for explicitly (vectors to 1e-6: a loaded CPU's BLAS may split a
    GEMM differently from one call to the next)."""
    from semalign.models.towers import length_batches

    rng = np.random.default_rng(0)
    words = ["cowboy", "toy", "space", "tax", "law", "Ünïcödé", "東京", "café", "night", "the"]
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 12)))) for _ in range(300)] + ["", "word " * 400]
    pooled = TextTower(Settings().resolved_text_model(), batch_size=16, tokenize_workers=2)
    assert pooled.tokenize_workers == 2 and text_tower.tokenize_workers == 0    # CPU default: in-process
    batches = length_batches(texts, 16)
    from_workers = list(pooled._token_batches(texts, batches, 10_000, pin=False))
    pool = pooled._pool
    assert pool is not None and len(from_workers) == len(batches)              # the workers did the tokenizing
    for idx, got in zip(batches, from_workers):
        want = text_tower.tokenize([texts[i] for i in idx])
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    inline = TextTower(Settings().resolved_text_model(), batch_size=16, tokenize_workers=0)
    want = inline.encode(texts)
    np.testing.assert_allclose(pooled.encode(texts), want, atol=1e-6, rtol=0)
    np.testing.assert_allclose(pooled.encode(texts[:40]), want[:40], atol=1e-6, rtol=0)
    assert pooled._pool is pool                                                 # one pool for the tower's life
    with pytest.raises(ValueError, match="tokenize_workers"):
        TextTower(Settings().resolved_text_model(), tokenize_workers=-1)


class _DiesOnTokenize:
    """A tokenizer whose worker process dies mid-batch (as one killed by the OOM killer would)."""

    def __call__(self, texts):
        import os

        os._exit(9)


def test_a_tokenizer_worker_that_dies_is_an_error_not_a_hang():
    tower = TextTower(Settings().resolved_text_model(), batch_size=4, tokenize_workers=1)
    tower._tokens, tower.tokenize_timeout_s = _DiesOnTokenize(), 5.0    # before the pool forks: workers inherit it
    with pytest.raises(RuntimeError, match="tokenizer worker process gave no batch in 5.0 s"):
        tower.encode([f"text {i}" for i in range(12)])


def test_batches_padded_to_a_width_multiple_encode_to_the_same_vectors(text_tower):
    """On CUDA each full batch is padded to a multiple of 16 tokens (one captured graph per width): the extra
    columns are masked padding, so every vector is what the batch padded to its longest text gives, and the width
    never passes max_length."""
    from semalign.models.towers import PaddedTokenizer

    rng = np.random.default_rng(1)
    words = ["cowboy", "toy", "space", "tax", "law", "night", "the", "Ünïcödé"]
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 30)))) for _ in range(40)] + ["word " * 400]
    padded = PaddedTokenizer(text_tower.tokenizer, 256, pad_multiple=16)
    plain = text_tower.tokenize(texts[:20])
    wide = padded(texts[:20])
    width = plain["input_ids"].shape[1]
    assert wide["input_ids"].shape[1] == -(-width // 16) * 16 > width
    assert torch.equal(wide["input_ids"][:, :width], plain["input_ids"])
    assert wide["attention_mask"][:, width:].eq(0).all()
    assert wide["input_ids"][:, width:].eq(text_tower.tokenizer.pad_token_id).all()
    assert padded(texts[-1:])["input_ids"].shape[1] == 256                     # capped at max_length
    assert PaddedTokenizer(text_tower.tokenizer, 250, pad_multiple=16)(texts[-1:])["input_ids"].shape[1] == 250
    tower = TextTower(Settings().resolved_text_model(), batch_size=8, tokenize_workers=0)
    tower._tokens = padded
    np.testing.assert_allclose(tower.encode(texts), text_tower.encode(texts), atol=2e-6, rtol=0)
    with pytest.raises(ValueError, match="CUDA"):
        TextTower(Settings().resolved_text_model(), cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_text_tower_equals_the_eager_one_on_cuda():
    rng = np.random.default_rng(2)
    words = ["cowboy", "toy", "space", "tax", "law", "night", "the"]
    texts = [" ".join(rng.choice(words, int(rng.integers(1, 40)))) for _ in range(1000)]
    graphed = TextTower(Settings().resolved_text_model(), device="cuda", batch_size=128)
    eager = TextTower(Settings().resolved_text_model(), device="cuda", batch_size=128, cuda_graphs=False)
    got = graphed.encode(texts)
    assert graphed.cuda_graphs and len(graphed._graphs) >= 2                   # several widths, each captured
    assert np.min((got * eager.encode(texts)).sum(1)) > 0.999                  # bf16: same vectors to rounding
    np.testing.assert_array_equal(graphed.encode(texts), got)                  # replays give the same bits
