"""Training of the ranker (`ranker.py`): `train_ranker`, the loop the refresh, the experiment and Ray Train's workers
run (Adam on BCE, seeded data order, early stopping on validation AUC); `TrainStep`, one optimizer step, replayed as a
CUDA graph on CUDA; and the helpers torch DDP needs (`DDP_OPTIONS`, `wrap_for_graph`).
Imports only torch and numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .ranker import Frame, ItemTables, Ranker, RankerConfig, predict


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from .metrics import auc

    return auc(y, p)


@dataclass
class TrainResult:
    model: Ranker
    history: list[dict]
    best_epoch: int
    best_val_auc: float
    samples_per_s: float
    step_mode: str = "eager"  # "cuda-graph" / "compiled cuda-graph": how TrainStep ran full batches
    epoch_samples_per_s: list[float] = field(default_factory=list)  # each epoch's training steps; the first
    # holds the warm-up (graph capture, compiling), the later ones are the steady rate


class TrainStep:
    """One Adam step of `train_ranker` on rows `idx` of device-resident training tensors (u, c, h, y); returns the
    step's loss as a device tensor (no host sync).

    cuda_graph=True (CUDA; one process, or DDP ranks, see __init__): after `warmup` eager steps the whole step of a full batch (row gather,
    forward, backward, Adam) is captured once as a CUDA graph and replayed, so the host only copies the batch's
    indices: eager, the step is bound by launching hundreds of small kernels. The forward then takes no
    data-dependent shapes (`Ranker.view_rows = "static"`) and Adam keeps its step count on the device
    (capturable). A smaller batch (the epoch's last) runs eagerly on the same parameters, gradients and optimizer
    state. compile_model=True also compiles the captured step's model (torch.compile, fused kernels; compiled
    during the warm-up steps, once, for the full batch's shape only). Random draws (dropout, ID/code dropout)
    come from the seeded CUDA generator either way, but graph and eager runs of one seed draw differently.
    `bench/bench_ranker.py` measures it against a plain-torch DIN of the same shapes."""

    warmup = 3

    def __init__(self, model: "Ranker", opt: torch.optim.Optimizer, cfg: RankerConfig, data: tuple, device: str,
                 step_model: nn.Module | None = None, cuda_graph: bool = False, compile_model: bool = False,
                 world_size: int = 1):
        """world_size > 1 (step_model a DistributedDataParallel built on a side stream): a rank's full share of a
        batch is graphed. A DDP step_model (any world size) takes 11 eager warm-up steps before the capture (DDP
        settles its gradient buckets first)."""
        if cuda_graph and not str(device).startswith("cuda"):
            raise ValueError("cuda_graph needs a CUDA device")
        if compile_model and not cuda_graph:
            raise ValueError("compile_model compiles the captured step: it needs cuda_graph")
        self.model, self.opt, self.cfg = model, opt, cfg
        self.step_model = model if step_model is None else step_model  # a compiled module has no truth value
        self.graph_model = torch.compile(self.step_model) if compile_model else self.step_model
        self.u, self.c, self.h, self.y = data
        self.cuda = str(device).startswith("cuda")
        self.cuda_graph, self.compiled, self.graph, self.warm = cuda_graph, compile_model, None, 0
        # a rank's share of a full batch; every rank's the same or none is graphed (their collectives must match)
        self.graph_rows = cfg.batch_size // world_size if cfg.batch_size % world_size == 0 else -1
        if world_size > 1 or isinstance(self.step_model, nn.parallel.DistributedDataParallel):
            self.warmup = 11
        self.cold_view = cfg.cold_view > 0 and cfg.variant != "logreg"
        if cuda_graph:
            model.view_rows = "static"

    def _loss(self, idx: torch.Tensor, net: nn.Module, capturing: bool = False) -> torch.Tensor:
        model, cfg = self.model, self.cfg
        model.aux_loss = None
        # autocast's cast cache may not outlive a graph capture
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.cuda, cache_enabled=not capturing):
            if self.cold_view:  # every event twice in one forward (DDP-safe): as is, then with the candidate's ID hidden
                n = len(idx)
                logit = net(self.u[idx].repeat(2, 1), self.c[idx].repeat(2), self.h[idx].repeat(2, 1),
                            cold=torch.arange(2 * n, device=self.c.device) >= n)
            else:
                logit = net(self.u[idx], self.c[idx], self.h[idx])
        loss = F.binary_cross_entropy_with_logits(logit[: len(idx)].float(), self.y[idx])
        if self.cold_view:
            loss = loss + cfg.cold_view * F.binary_cross_entropy_with_logits(logit[len(idx):].float(), self.y[idx])
        if model.aux_loss is not None:
            loss = loss + cfg.distill_weight * model.aux_loss.float()
        return loss

    def _eager(self, idx: torch.Tensor, net: nn.Module) -> torch.Tensor:
        # zeroed in place once gradients live in the graph's memory, which its replays write
        self.opt.zero_grad(set_to_none=self.graph is None)
        loss = self._loss(idx, net)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graph or len(idx) != self.graph_rows:
            return self._eager(idx, self.step_model)  # never the compiled model: another shape would recompile it
        if self.graph is None:
            if self.warm < self.warmup:  # on a side stream, as capture needs (cuBLAS workspaces, autograd streams)
                self.warm += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    loss = self._eager(idx, self.graph_model)
                torch.cuda.current_stream().wait_stream(side)
                return loss
            self.static_idx = idx.clone()
            self.opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it then writes
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self.static_loss = self._loss(self.static_idx, self.graph_model, capturing=True)
                    self.static_loss.backward()
                    self.opt.step()
            except RuntimeError as e:  # an op that syncs the host (a model change): said, and the run goes on eager
                import warnings

                warnings.warn(f"ranker training step could not be captured as a CUDA graph, training eagerly: {e}")
                self.cuda_graph = False
                self.opt.zero_grad(set_to_none=True)
                return self._eager(idx, self.step_model)
            self.graph = graph
        self.static_idx.copy_(idx)
        self.graph.replay()
        return self.static_loss.detach().clone()


# DistributedDataParallel's options for the ranker: its buffers are constant item tables, which DDP's default
# re-broadcasts from rank 0 before every forward: every table's bytes a step, for nothing
DDP_OPTIONS = {"broadcast_buffers": False}


def wrap_for_graph(distributed: Callable[[nn.Module], nn.Module], model: nn.Module) -> nn.Module:
    """`distributed(model)` (a DDP) built on a side stream, as a DDP whose backward a CUDA graph captures must be."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        wrapped = distributed(model)
    torch.cuda.current_stream().wait_stream(side)
    return wrapped


COMPILE_MIN_STEPS = 10_000  # train_ranker compiles the graphed step from this many planned steps: compiling is a
# fixed warm-up that each faster step pays back only a little, so it pays off over thousands of steps only


def initial_model(cfg: RankerConfig, tables: ItemTables, n_user_feats: int) -> Ranker:
    """The model training starts from, seeded by `cfg.seed`: one configuration and one set of item tables give one
    set of initial weights, wherever it is trained."""
    torch.manual_seed(cfg.seed)
    return Ranker(cfg, tables, n_user_feats)


def train_ranker(cfg: RankerConfig, tables: ItemTables, train: Frame, val: Frame, device: str = "cpu",
                 on_epoch: Callable[[dict], None] | None = None,
                 distributed: Callable[[nn.Module], nn.Module] | None = None, rank: int = 0,
                 world_size: int = 1, cuda_graph: bool | None = None, compile_model: bool | None = None
                 ) -> TrainResult:
    """Adam on BCE; deterministic data order from the seed; early stopping on validation AUC.

    Data-parallel (torch DDP, e.g. under Ray Train): every rank draws the same permutation from the seed and takes
    its `rank::world_size` share of each global batch; `distributed` wraps the model (DistributedDataParallel), so
    gradients are averaged over ranks and every rank holds the same weights, sees the same validation AUC and stops
    at the same epoch. With one rank this is exactly the single-process loop. Wrap with `DDP_OPTIONS`
    (no buffer re-broadcast: the buffers are constant item tables).

    cuda_graph: replay each full batch's step as one CUDA graph (`TrainStep`); None = on CUDA with one process
    (under DDP only when asked: capturing a DDP step needs NCCL's async error handling off, which the caller's
    process group decides).
    compile_model: torch.compile the graphed step; None = where it is graphed and the run plans at least
    `COMPILE_MIN_STEPS` full batches (max_epochs x batches an epoch), so compiling pays for itself."""
    import time

    model = initial_model(cfg, tables, train.user_feats.shape[1]).to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    on_cuda = str(device).startswith("cuda")
    if cuda_graph is None:
        cuda_graph = on_cuda and distributed is None and world_size == 1
    if distributed is None:
        step_model = model
    elif cuda_graph:
        step_model = wrap_for_graph(distributed, model)
    else:
        step_model = distributed(model)
    # on CUDA one fused kernel steps every parameter, instead of a few kernel launches per parameter
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           fused=True if on_cuda else None, capturable=cuda_graph)
    u, c, h, y = train.tensors(device)
    if compile_model is None:
        compile_model = cuda_graph and cfg.max_epochs * (len(y) // cfg.batch_size) >= COMPILE_MIN_STEPS
    step = TrainStep(model, opt, cfg, (u, c, h, y), device, step_model=step_model, cuda_graph=cuda_graph,
                     compile_model=compile_model, world_size=world_size)
    best, history, bad, seen, busy, rates = (-1.0, 0, None), [], 0, 0, 0.0, []
    for epoch in range(cfg.max_epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen).to(device)
        t0, total, rows = time.perf_counter(), torch.zeros((), dtype=torch.float64, device=device), 0
        for s in range(0, len(perm), cfg.batch_size):
            idx = perm[s: s + cfg.batch_size]
            if world_size > 1:
                if len(idx) < world_size:  # every rank must take every step (DDP all-reduces each one)
                    break
                idx = idx[rank::world_size]
            total += step(idx) * len(idx)  # summed on the device: a per-step .item() would wait for the GPU
            rows += len(idx)
        total = float(total)
        took = time.perf_counter() - t0
        busy += took
        seen += rows
        rates.append(rows / max(took, 1e-9))
        val_auc = _auc(val.label, predict(model, val, device)) if len(val) else float("nan")
        rec = {"epoch": epoch + 1, "loss": total / max(rows, 1), "val_auc": val_auc}
        history.append(rec)
        if on_epoch:
            on_epoch(rec)
        if val_auc > best[0] or best[2] is None:
            best, bad = (val_auc, epoch + 1, {k: t.detach().clone() for k, t in model.state_dict().items()}), 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best[2])
    model.eval()
    model.view_rows = "auto"  # as any loaded model: the static shapes were for the graph
    return TrainResult(model=model, history=history, best_epoch=best[1], best_val_auc=best[0],
                       samples_per_s=seen / max(busy, 1e-9), epoch_samples_per_s=rates,
                       step_mode=("compiled " if step.compiled else "") + "cuda-graph" if step.graph else "eager")
