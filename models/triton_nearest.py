"""Nearest-centroid assignment on CUDA as one Triton kernel per level (Triton ships with torch's CUDA builds).

A row block keeps its vectors in registers, walks the codes in tiles and keeps a running (min, argmin), so the
[rows, codes] score block of the cuBLAS path (1 GB at 1M x 256) is never written or read back; for residual
quantization the same kernel also writes the row's residual for the next level. Dot products run on tensor cores
as 3xTF32 (fp32 split into a high and a low TF32 part, three products): fp32 accuracy, unlike plain TF32, whose
rounding moves some rows to another code. Ties go to the lowest code, as torch.argmin does.

Imported only on the CUDA path (models/kmeans.py); importing this module imports triton."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_DIM = 256  # wider vectors would not fit a row block in registers / shared memory: callers use cuBLAS


@triton.jit
def _nearest_kernel(X, C, CN, CODES, n, codes_stride, k, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                    BN: tl.constexpr, RESIDUAL: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)  # int64: rows * D passes 2^31 at 17M x 128
    rmask = rows < n
    dk = tl.arange(0, DP)
    dmask = dk < D
    xmask = rmask[:, None] & dmask[None, :]
    x = tl.load(X + rows[:, None] * D + dk[None, :], mask=xmask, other=0.0)
    best = tl.full([BM], float("inf"), tl.float32)
    best_code = tl.zeros([BM], tl.int32)
    for j in range(0, k, BN):
        cols = j + tl.arange(0, BN)
        cmask = cols < k
        c = tl.load(C + cols[None, :] * D + dk[:, None], mask=cmask[None, :] & dmask[:, None], other=0.0)
        # ||x - c||^2 - ||x||^2 = ||c||^2 - 2 x.c; codes past k score +inf
        s = tl.load(CN + cols, mask=cmask, other=float("inf"))[None, :] - 2.0 * tl.dot(x, c, input_precision="tf32x3")
        m = tl.min(s, 1)
        better = m < best  # strict: an equal score in a later tile keeps the earlier (lower) code
        best_code = tl.where(better, tl.argmin(s, 1) + j, best_code)
        best = tl.where(better, m, best)
    tl.store(CODES + rows * codes_stride, best_code.to(tl.int64), mask=rmask)
    if RESIDUAL:
        nearest = tl.load(C + best_code.to(tl.int64)[:, None] * D + dk[None, :], mask=xmask, other=0.0)
        tl.store(X + rows[:, None] * D + dk[None, :], x - nearest, mask=xmask)


def _launch(r: torch.Tensor, c: torch.Tensor, codes: torch.Tensor, residual: bool) -> None:
    n, d = r.shape
    dp = max(16, triton.next_power_of_2(d))  # tl.dot wants a power-of-two inner size of at least 16
    # 128 x 64 tiles, 8 warps: the fastest shape tried for 128-wide vectors (64 x 128 and 128 x 128 run out of
    # shared memory with 3xTF32); a 256-wide row block halves both tiles to stay inside it
    bm, bn, warps = (128, 64, 8) if dp <= 128 else (64, 32, 4)
    cc = c.to(r.device, torch.float32).contiguous()
    _nearest_kernel[(triton.cdiv(n, bm),)](r, cc, (cc * cc).sum(1), codes, n, codes.stride(0), len(cc), D=d, DP=dp,
                                           BM=bm, BN=bn, RESIDUAL=residual, num_warps=warps, num_stages=2)


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmin_j ||x_i - c_j||^2 per row: codes [n] (int64)."""
    codes = torch.empty(len(x), dtype=torch.long, device=x.device)
    if len(x):
        _launch(x.float().contiguous(), c, codes, residual=False)
    return codes


def assign_levels(x: torch.Tensor, centroids: list[torch.Tensor]) -> torch.Tensor:
    """Residual assignment through every level: codes [n, levels]; one kernel a level, the residual kept in one
    fp32 copy of x updated in place."""
    codes = torch.empty((len(x), len(centroids)), dtype=torch.long, device=x.device)
    if len(x) and centroids:
        r = x.to(torch.float32, copy=True).contiguous()
        for lvl, c in enumerate(centroids):
            _launch(r, c, codes[:, lvl], residual=lvl + 1 < len(centroids))
    return codes
