"""Semantic-ID codebooks: determinism, uniqueness after dedup, artifact round-trips, stable rebuilds."""
import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from semalign.models.codebook import Codebook, build_codebook, default_codes
from semalign.models.kmeans import match_to_parent
from semalign.models.rqvae import RQVAEConfig
from semalign.models.sids import dedup_level, sid_churn


def test_match_to_parent_puts_each_new_centroid_in_its_parents_slot():
    parent = torch.as_tensor(np.random.default_rng(0).standard_normal((16, 8)), dtype=torch.float32)
    perm = torch.as_tensor(np.random.default_rng(1).permutation(16))
    new = parent[perm] + 0.01 * torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    matched = match_to_parent(new, parent, linear_sum_assignment)
    assert torch.allclose(matched, parent, atol=0.05)


def test_default_codes_sized_to_catalogue():
    assert default_codes(1682) == 32
    assert default_codes(1_000_000) == 256
    assert default_codes(10) == 8


def test_rqkmeans_assign_is_deterministic_and_dedup_unique(clustered):
    cb = build_codebook(clustered, levels=3, codes=16, seed=0)
    a, b = cb.assign(clustered), cb.assign(clustered.copy())
    assert (a == b).all() and a.shape == (len(clustered), 3)
    assert (build_codebook(clustered, levels=3, codes=16, seed=0).assign(clustered) == a).all()
    d = dedup_level(a)
    assert len(np.unique(np.c_[a, d], axis=0)) == len(a)
    m = cb.metrics
    assert len(m["utilisation"]) == 3 and all(0 < u <= 1 for u in m["utilisation"])
    assert 0 <= m["collision_rate"] < 1 and 0 < m["relative_recon_error"] < 1


def test_more_levels_reconstruct_better(clustered):
    errs = [build_codebook(clustered, levels=lv, codes=16).metrics["relative_recon_error"] for lv in (1, 2, 3)]
    assert errs[0] > errs[1] > errs[2]


def test_dedup_respects_taken_indices():
    codes = np.array([[1, 2], [1, 2], [3, 4]])
    assert dedup_level(codes, taken={(1, 2): 5}).tolist() == [5, 6, 0]


def test_codebook_round_trip_and_tamper_detection(tmp_path, clustered):
    cb = build_codebook(clustered, levels=2, codes=16)
    cb.save(tmp_path / "cb")
    again = Codebook.load(tmp_path / "cb")
    assert again.version == cb.version and again.data_hash == cb.data_hash
    assert (again.assign(clustered) == cb.assign(clustered)).all()
    meta = json.loads((tmp_path / "cb" / "codebook.json").read_text())
    assert {"version", "parent", "data_hash", "config"} <= set(meta)
    raw = bytearray((tmp_path / "cb" / "codebook.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (tmp_path / "cb" / "codebook.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        Codebook.load(tmp_path / "cb")


def test_wrong_width_and_nan_are_refused(clustered):
    cb = build_codebook(clustered, levels=2, codes=8)
    with pytest.raises(ValueError, match="width 32"):
        cb.assign(np.zeros((3, 31), np.float32))
    bad = clustered[:3].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        cb.assign(bad)


def test_same_input_same_version(clustered):
    assert build_codebook(clustered, 2, 8).version == build_codebook(clustered, 2, 8).version
    assert build_codebook(clustered, 2, 8).version != build_codebook(clustered, 2, 16).version


def test_parent_matching_keeps_ids_stable(clustered):
    rng = np.random.default_rng(1)
    parent = build_codebook(clustered, levels=3, codes=16, seed=0)
    moved = clustered + 0.02 * rng.standard_normal(clustered.shape).astype(np.float32)
    moved /= np.linalg.norm(moved, axis=1, keepdims=True)
    with pytest.raises(ValueError, match="solve_assignment"):
        build_codebook(moved, levels=3, codes=16, seed=1, parent=parent)
    with_parent = build_codebook(moved, levels=3, codes=16, seed=1, parent=parent, solve_assignment=linear_sum_assignment)
    without = build_codebook(moved, levels=3, codes=16, seed=1)
    old = parent.assign(clustered)
    c_with = sid_churn(old, with_parent.assign(moved))
    c_without = sid_churn(old, without.assign(moved))
    assert with_parent.parent == parent.version and with_parent.metrics["parent_matched"]
    assert c_with["per_level"][0] < 0.1
    assert c_with["churn"] < c_without["churn"] / 2


def test_rqvae_trains_with_decoded_pair_contrastive(clustered):
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(clustered), (500, 2))
    cfg = RQVAEConfig(latent=16, hidden=64, epochs=8, batch_size=256)
    cb = build_codebook(clustered, levels=2, codes=16, method="rqvae", pairs=pairs, rqvae=cfg)
    codes = cb.assign(clustered)
    assert codes.shape == (len(clustered), 2) and (codes == cb.assign(clustered)).all()
    assert cb.metrics["relative_recon_error"] < 1.0
    assert min(cb.metrics["utilisation"]) > 0.5  # dead-code reset keeps codes alive
    assert len(np.unique(np.c_[codes, dedup_level(codes)], axis=0)) == len(codes)


def test_rqvae_round_trip(tmp_path, clustered):
    cb = build_codebook(clustered, levels=2, codes=8, method="rqvae", rqvae=RQVAEConfig(latent=8, hidden=32, epochs=2))
    cb.save(tmp_path / "v")
    again = Codebook.load(tmp_path / "v")
    assert (again.assign(clustered) == cb.assign(clustered)).all()
    assert torch.allclose(again.reconstruct(cb.assign(clustered[:5])), cb.reconstruct(cb.assign(clustered[:5])))


def test_procrustes_undoes_a_rotation(clustered):
    from semalign.models.kmeans import procrustes

    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 32)))
    rotated = clustered @ q.astype(np.float32)
    r = procrustes(rotated, clustered)
    assert np.allclose(rotated @ r, clustered, atol=1e-4)
    parent = build_codebook(clustered, levels=2, codes=16)
    # codes of the rotated space, rotated back, match the parent's assignment
    assert (parent.assign(rotated @ r) == parent.assign(clustered)).mean() > 0.99


def test_nearest_is_the_exact_cosine_top_k_without_excluded_rows():
    from semalign.models.sids import first_level_chance, nearest

    rng = np.random.default_rng(3)
    base = rng.normal(size=(500, 16)).astype(np.float32)
    base[7] = 0.0                                           # a zero vector scores 0, never NaN
    queries = np.concatenate([base[:3] * 2.5, rng.normal(size=(4, 16)).astype(np.float32)])
    rows, scores = nearest(base, queries, k=5, exclude=[[0], [], [2]] + [[]] * 4, chunk=3)
    unit = base / np.maximum(np.linalg.norm(base, axis=1, keepdims=True), 1e-12)
    sim = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    sim[0, 0] = sim[2, 2] = -np.inf
    want = np.argsort(-sim, axis=1, kind="stable")[:, :5]
    assert rows.tolist() == want.tolist()
    np.testing.assert_allclose(scores, np.take_along_axis(sim, want, 1), rtol=1e-5)
    assert rows[1, 0] == 1 and scores[1, 0] == pytest.approx(1.0)   # itself, when not excluded
    assert 0 not in rows[0] and 2 not in rows[2] and np.isfinite(scores).all()
    assert nearest(base[:3], queries[:1], k=10)[0].shape == (1, 3)   # k capped at the catalogue
    # two random items share a first-level code with probability sum(p_c^2)
    assert first_level_chance(np.array([[0, 1], [0, 2], [1, 0], [2, 0]])) == pytest.approx(0.5 ** 2 + 2 * 0.25 ** 2)


def test_gpu_paths_of_the_codebook_build_agree_with_the_cpu_ones_when_run_on_cpu():
    """The GPU build counts its code metrics with torch where the codes live and seeds k-means++ by inverse-CDF
    sampling; both run on CPU tensors too, which is how they are checked here."""
    from semalign.models.kmeans import _kmeanspp_gpu
    from semalign.models.sids import code_metrics

    rng = np.random.default_rng(4)
    codes = rng.integers(0, 16, size=(5000, 3))
    codes[:300] = codes[0]                                    # a collision group
    want, got = code_metrics(codes, 16, 0.25), code_metrics(torch.as_tensor(codes), 16, 0.25)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)
    # the GPU assignment (augmented GEMM + argmin, any chunking) picks the CPU path's centroids
    from semalign.models.kmeans import _argmin_aug, _assign, _augment_torch

    pts = torch.as_tensor(rng.normal(size=(3000, 12)).astype(np.float32))
    cents = pts[:29].clone() + 0.01
    assert torch.equal(_argmin_aug(_augment_torch(pts), cents, chunk=777), _assign(pts, cents)[0])
    x = torch.as_tensor(np.concatenate([rng.normal(size=(200, 8)) + 10 * j for j in range(4)]).astype(np.float32))
    seeds = _kmeanspp_gpu(x, 4, torch.Generator().manual_seed(0))
    assert torch.equal(seeds, _kmeanspp_gpu(x, 4, torch.Generator().manual_seed(0)))   # deterministic by seed
    # D^2 sampling puts one seed in each of four far-apart blobs
    assert sorted(((seeds.mean(1) + 5) // 10).long().tolist()) == [0, 1, 2, 3]


def test_the_fused_assignment_kernel_is_chosen_only_where_it_can_run():
    """`kernel="auto"` takes the Triton kernel only for CUDA tensors; asking for it elsewhere says why not."""
    from semalign.models.kmeans import assign_levels, gpu_kernel

    x = torch.zeros((4, 8))
    assert gpu_kernel(x) is None and gpu_kernel(x, "torch") is None
    with pytest.raises(ValueError, match="CUDA tensors"):
        gpu_kernel(x, "triton")
    with pytest.raises(ValueError, match="auto, triton or torch"):
        assign_levels(x, [torch.zeros((2, 8))], kernel="fused")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA only (checked on the H200)")
@pytest.mark.parametrize("d,k", [(8, 1), (100, 300), (128, 256), (256, 1000)])
def test_the_fused_gpu_kernel_assigns_the_codes_of_the_gemm_path(d, k):
    """Odd widths and code counts (masked tiles), ties to the lowest code, residual levels: same codes as the
    GEMM + argmin path on the same GPU."""
    from semalign.models.kmeans import assign_levels

    g = torch.Generator().manual_seed(d + k)
    x = torch.randn(20_011, d, generator=g).cuda()
    cents = [torch.randn(k, d, generator=g).cuda() * s for s in (1.0, 0.5, 0.25)]
    cents[0][-1] = cents[0][0]                                  # a duplicated centroid: the lower code wins
    fused, gemm = assign_levels(x, cents, kernel="triton"), assign_levels(x, cents, kernel="torch")
    assert (fused != gemm).any(1).float().mean() < 1e-4          # rounding may move a near-tie, nothing more
    assert int((fused[:, 0] == k - 1).sum()) == 0 or k == 1
