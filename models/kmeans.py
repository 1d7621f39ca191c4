"""Residual k-means on torch (GPU or CPU): k-means++ seeding, chunked nearest-centroid assignment, and the
matching of a rebuild's centroids to its parent's so unchanged items keep their codes."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def _nearest_cpu(xa: np.ndarray, c: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """argmin_j ||x - c_j||^2 as argmax_j [x, 1] . [c_j, -||c_j||^2 / 2]: one GEMM per chunk, no extra pass.
    numpy's BLAS is used on CPU because it beats torch's GEMM on some CPUs (measured in bench/)."""
    ca = np.concatenate([c, -0.5 * (c * c).sum(1, keepdims=True)], 1).T.astype(np.float32, copy=False)
    ca = np.ascontiguousarray(ca)
    codes = np.empty(len(xa), dtype=np.int64)
    buf = np.empty((min(chunk, len(xa)), ca.shape[1]), dtype=np.float32)
    for s in range(0, len(xa), chunk):
        xs = xa[s: s + chunk]
        d = np.matmul(xs, ca, out=buf[: len(xs)])
        codes[s: s + chunk] = d.argmax(1)
    return codes


def _augment(x: torch.Tensor) -> np.ndarray:
    xa = np.empty((len(x), x.shape[1] + 1), dtype=np.float32)
    xa[:, :-1] = x.detach().float().numpy()
    xa[:, -1] = 1.0
    return xa


GPU_SCORES_BUDGET = 1 << 28  # elements of the [rows, codes] score block per GEMM on GPU (1 GiB in fp32)


def gpu_kernel(x: torch.Tensor, kernel: str = "auto"):
    """The module that assigns x on the GPU as one fused Triton kernel (models.triton_nearest), or None for the
    GEMM + argmin path. kernel: "auto" (Triton on CUDA where torch's build has it and rows are at most 256 wide),
    "triton" (that, or an error saying why not), "torch" (always the GEMM path)."""
    if kernel not in ("auto", "triton", "torch"):
        raise ValueError(f"kernel must be auto, triton or torch, not {kernel!r}")
    if kernel == "torch":
        return None
    why = None
    if x.device.type != "cuda":
        why = f"it runs on CUDA tensors, these are on {x.device}"
    else:
        try:
            from . import triton_nearest
        except ImportError as e:  # CUDA builds without Triton (Windows): the GEMM path, same codes
            why = f"triton is not importable ({e})"
        else:
            if x.shape[1] > triton_nearest.MAX_DIM:
                why = f"rows are {x.shape[1]} wide, the kernel takes at most {triton_nearest.MAX_DIM}"
    if why is None:
        return triton_nearest
    if kernel == "triton":
        raise ValueError(f"the Triton assignment kernel cannot run: {why}")
    return None


def _assign(x: torch.Tensor, c: torch.Tensor, chunk: int | None = None, xa: np.ndarray | torch.Tensor | None = None,
            kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest centroid (squared L2) per row; matmul-bound, chunked to bound memory. The second value is None:
    callers that need squared distances (k-means re-seeding an empty cluster, rarely) use `_sq_dist`. On GPU the
    fused Triton kernel (see gpu_kernel), else a chunk is as many rows as GPU_SCORES_BUDGET allows (one GEMM + one
    argmin for 1M x 256)."""
    if x.device.type == "cpu":
        xa = _augment(x) if xa is None else xa
        return torch.from_numpy(_nearest_cpu(xa, c.detach().float().numpy(), chunk or 16384)), None
    fused = gpu_kernel(x, kernel)
    if fused is not None:
        return fused.nearest(x, c), None
    return _argmin_aug(_augment_torch(x) if xa is None else xa, c, chunk), None


def _augment_torch(x: torch.Tensor) -> torch.Tensor:
    """[x, 1, 0...]: x with a ones column, zero-padded to a width a multiple of 8 (aligned GEMM operands)."""
    d = x.shape[1]
    xa = torch.zeros((len(x), (d + 1 + 7) // 8 * 8), dtype=x.dtype, device=x.device)
    xa[:, :d] = x
    xa[:, d] = 1.0
    return xa


def _augment_centroids(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[-2 c, ||c||^2, 0...] as wide as the augmented rows `like`: their product is ||x - c||^2 - ||x||^2."""
    d = c.shape[1]
    ca = torch.zeros((len(c), like.shape[1]), dtype=like.dtype, device=like.device)
    ca[:, :d] = -2.0 * c
    ca[:, d] = (c * c).sum(1)
    return ca


def _argmin_aug(xa: torch.Tensor, c: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """argmin_j ||x - c_j||^2 = argmin_j [x, 1] . [-2 c_j, ||c_j||^2]: one plain GEMM and one argmin per chunk
    (addmm's broadcast bias cost an extra pass over the [rows, codes] block)."""
    ca = _augment_centroids(c, xa)
    chunk = chunk or max(1, GPU_SCORES_BUDGET // max(1, len(c)))
    codes = torch.empty(len(xa), dtype=torch.long, device=xa.device)
    for s in range(0, len(xa), chunk):
        torch.argmin(xa[s: s + chunk] @ ca.T, 1, out=codes[s: s + chunk])
    return codes


def assign_levels(x: torch.Tensor, centroids: list[torch.Tensor], kernel: str = "auto") -> torch.Tensor:
    """Residual assignment through every level: codes [n, levels]. On GPU one fused Triton kernel a level (see
    gpu_kernel); on the GEMM path x is augmented once and its residual updated in place, so a level costs one GEMM,
    one argmin and (but the last) one subtraction."""
    fused = gpu_kernel(x, kernel)
    if x.device.type == "cpu" or not centroids:
        r, out = x, []
        for c in centroids:
            idx, _ = _assign(r, c)
            out.append(idx)
            r = r - c[idx]
        return torch.stack(out, 1) if out else torch.zeros((len(x), 0), dtype=torch.long)
    if fused is not None:
        return fused.assign_levels(x, centroids)
    d, ra = x.shape[1], _augment_torch(x)
    out = torch.empty((len(centroids), len(x)), dtype=torch.long, device=x.device)
    for lvl, c in enumerate(centroids):
        out[lvl] = _argmin_aug(ra, c)
        if lvl + 1 < len(centroids):
            ra[:, :d] -= c[out[lvl]]
    return out.T


def _sq_dist(x: torch.Tensor, c: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return ((x - c[codes]) ** 2).sum(1)


class _single_thread:
    def __init__(self, on: bool):
        self.on, self.prev = on, torch.get_num_threads()

    def __enter__(self):
        if self.on:
            torch.set_num_threads(1)

    def __exit__(self, *exc):
        if self.on:
            torch.set_num_threads(self.prev)


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding; the sampling runs where x lives (no host round trip per centroid on GPU)."""
    n = len(x)
    if x.device.type != "cpu":
        return _kmeanspp_gpu(x, k, gen)
    first = int(torch.randint(n, (1,), generator=gen))
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    idx[0] = first
    d2 = ((x - x[first]) ** 2).sum(1)
    for j in range(1, k):
        p = d2.clamp_min(0) + 1e-12  # never all-zero: duplicate points stay drawable
        nxt = torch.multinomial(p, 1, generator=gen)
        idx[j] = nxt[0]
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[idx].clone()


def _kmeanspp_gpu(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ by inverse-CDF sampling with uniforms drawn up front, so a step has no RNG and no host sync; on
    CUDA the step is captured once as a CUDA graph and replayed k - 2 times (the eager loop was launch-bound:
    ~10 small kernels a centroid). Any other device runs the same step eagerly."""
    n = len(x)
    u = torch.rand(k, generator=torch.Generator(device=x.device).manual_seed(int(gen.initial_seed())),
                   device=x.device, dtype=torch.float64)
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    idx[:1] = (u[:1] * n).long().clamp_max(n - 1)
    # + 1e-12 a point: never all-zero, so duplicate points stay drawable
    d2 = ((x - x[idx[:1]]) ** 2).sum(1).double() + 1e-12
    j = torch.ones(1, dtype=torch.long, device=x.device)  # the step's centroid slot, advanced on the device

    def step():
        cdf = torch.cumsum(d2, 0)
        nxt = torch.searchsorted(cdf, u.index_select(0, j) * cdf[-1:]).clamp_max_(n - 1)
        idx.index_copy_(0, j, nxt)
        torch.minimum(d2, ((x - x.index_select(0, nxt)) ** 2).sum(1).double().add_(1e-12), out=d2)
        j.add_(1)

    if x.device.type != "cuda" or k < 3:
        for _ in range(1, k):
            step()
        return x[idx].clone()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        step()  # the first step, eagerly: CUDA graphs want a warm-up run off the capturing stream
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()  # recorded, not run
    for _ in range(k - 2):
        graph.replay()
    return x[idx].clone()


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, init: torch.Tensor | None = None,
           init_sample: int = 16) -> torch.Tensor:
    """Lloyd's k-means on all points. Init: given centroids (warm start from a parent) or k-means++ on a
    sample of `init_sample * k` points. Empty clusters are re-seeded with the worst-fit points."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    if n < k:
        raise ValueError(f"k-means: {n} points cannot fill {k} codes; use fewer codes per level")
    if init is not None:
        c = init.to(x.device, x.dtype).clone()
    else:
        sample = x if n <= init_sample * k else x[torch.randperm(n, generator=gen)[: init_sample * k].to(x.device)]
        c = _kmeanspp(sample, k, gen)
    # the GEMM paths' augmented copy, built once and reused every iteration (the fused GPU kernel needs none)
    xa = _augment(x) if x.device.type == "cpu" else None if gpu_kernel(x) else _augment_torch(x)
    for _ in range(iters):
        codes, dist = _assign(x, c, xa=xa)
        with _single_thread(x.device.type == "cpu"):  # BLAS threads still spin after the GEMM: don't fight them
            counts = torch.bincount(codes, minlength=k)
            sums = torch.zeros_like(c).index_add_(0, codes, x)
        empty = counts == 0
        c = torch.where(empty.unsqueeze(1), c, sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype))
        if bool(empty.any()):  # this check is an iteration's one host sync; re-seeding itself is rare
            dist = _sq_dist(x, c, codes)
            worst = torch.topk(dist, int(empty.sum())).indices
            c[empty] = x[worst]
    return c


# ---------------------------------------------------------------- matching a rebuild to its parent

# solves the linear assignment problem like scipy.optimize.linear_sum_assignment: cost [n, n] -> (rows, cols).
# `models/` imports only torch and numpy, so the caller hands the solver in (flows/ passes scipy's).
AssignmentSolver = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def match_to_parent(new: torch.Tensor, parent: torch.Tensor, solve: AssignmentSolver) -> torch.Tensor:
    """Permute `new` centroids so that slot j is the new centroid closest (jointly, minimum total distance) to
    parent slot j."""
    cost = torch.cdist(parent.double(), new.double()).cpu().numpy()
    rows, cols = solve(cost)  # parent slot rows[i] -> new centroid cols[i]
    col_of_row = np.empty(len(cost), dtype=np.int64)
    col_of_row[np.asarray(rows)] = np.asarray(cols)
    return new[torch.as_tensor(col_of_row, device=new.device)]


def procrustes(new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Orthogonal R minimising ||new @ R - old|| over paired rows. A retrained encoder may land in a rotated
    copy of the old space; rotating it back (cosines unchanged) lets the parent's centroids still fit."""
    u, _, vt = np.linalg.svd(np.asarray(new, np.float64).T @ np.asarray(old, np.float64))
    return (u @ vt).astype(np.float32)
