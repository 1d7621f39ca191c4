"""Ray as the refresh's optional compute engine (design section 10; `SEMALIGN_RAY_ADDRESS`, `semalign run --ray`).

Unset, nothing here is imported and every stage computes in the refresh's process (flows/engines.py's LocalEngine).
Set, `RayEngine` (the same interface) hands the stages' heavy compute to the Ray cluster at that address and gets
back exactly what the in-process code would compute:
- tower inference: a Ray Data `map_batches` job on actors holding the text (or image) tower. Each row of the job is
  a run of whole batches of the in-process loop (up to ROW_BATCHES of the text tower's longest-first batches; one
  image-tower chunk), so every vector is computed with the same padding and batch as in-process: the same bits.
- aligned vectors of every item: the trained encoder on actors, over the same chunks `embed_items` uses.
- the ranker: a Ray Train `TorchTrainer` job whose workers call `models.ranker_training.train_ranker`, the function the
  in-process stage calls (DDP across workers). One worker with as many torch threads as this process has reduces
  in the same order and returns the same weights; more workers average gradients over shards of each batch,
  which changes float rounding (and dropout draws), not the recipe.
Everything that writes (Feast publish, MLflow logging, gates, promotion) stays in the refresh's process.

A set address that cannot be reached fails the refresh before any stage runs, naming the address; there is no
fallback to in-process compute. Ray is imported only here and only when an address is set."""
from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import socket
import sys
import threading
from typing import Callable

import numpy as np

from semalign.config import Settings
from semalign.errors import InvalidInputError, UnavailableError

ProgressFn = Callable[[int], None]
IMAGE_DIM = 1280  # models.towers.ImageTower.dim (EfficientNet-Lite0's pooled features)


class RayUnavailableError(UnavailableError):
    """SEMALIGN_RAY_ADDRESS is set but that cluster cannot be used (unreachable, Ray missing, too small)."""


_STATE: dict = {}
CONNECT_TIMEOUT_S = float(os.environ.get("SEMALIGN_RAY_CONNECT_TIMEOUT_S", 60))


def _probe(address: str, timeout: float = 5.0) -> None:
    """A TCP connect to host:port first, so a wrong address fails in seconds with its name, not after Ray's
    own retries ("auto" has nothing to probe: Ray finds the local cluster or says there is none)."""
    hostport = address.removeprefix("ray://")
    if hostport == "auto" or ":" not in hostport:
        return
    host, port = hostport.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RayUnavailableError(f"Ray cluster at SEMALIGN_RAY_ADDRESS={address} is unreachable ({e}); start it "
                                  "(`ray start --head`) or unset SEMALIGN_RAY_ADDRESS; nothing was published") from e


def _loopback(address: str) -> bool:
    host = address.removeprefix("ray://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def connect(settings: Settings):
    """The `ray` module, connected to the cluster at `settings.ray_address` (once per process and address)."""
    address = settings.ray_address
    if not address:
        raise InvalidInputError("connect() needs SEMALIGN_RAY_ADDRESS (a Ray cluster's address)")
    if _loopback(address) and "ray" not in sys.modules:
        # a cluster on loopback is one machine: Ray would otherwise swap 127.0.0.1 for the host's network address
        # and wait forever for a head that listens on loopback only (read when Ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as e:
        raise RayUnavailableError(f"SEMALIGN_RAY_ADDRESS={address} is set but Ray is not installed "
                                  "(pip install -e '.[ray]'); nothing was published") from e
    if _STATE.get("address") == address and ray.is_initialized():
        return ray
    _probe(address)
    if ray.is_initialized():  # connected elsewhere by this process: this address wins
        ray.shutdown()
    outcome: dict = {}

    def init():
        try:  # worker logs stay on the cluster (stdout carries `--json`); failures come back as exceptions
            ray.init(address=address, namespace="semalign", log_to_driver=False, logging_level="WARNING")
            outcome["ok"] = True
        except BaseException as e:  # noqa: BLE001 (handed to the caller below)
            outcome["error"] = e

    # ray.init retries a head it cannot reach without end; a daemon thread bounds the wait (and dies with us)
    t = threading.Thread(target=init, name="ray-connect", daemon=True)
    t.start()
    t.join(CONNECT_TIMEOUT_S)
    if "ok" not in outcome:
        e = outcome.get("error")
        why = f"{type(e).__name__}: {str(e).strip()[:300]}" if e else f"no answer within {CONNECT_TIMEOUT_S:g} s"
        raise RayUnavailableError(f"could not connect to the Ray cluster at SEMALIGN_RAY_ADDRESS={address}: {why}; "
                                  "nothing was published") from e
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False  # progress is the refresh's own display
    logging.getLogger("ray.data").setLevel(logging.WARNING)   # per-job INFO lines would drown it
    _STATE["address"] = address
    return ray


def cluster_info(settings: Settings) -> dict:
    """What the refresh reports about the cluster it computes on."""
    ray = connect(settings)
    res = ray.cluster_resources()
    return {"address": settings.ray_address, "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0), "device": device(settings),
            "train_workers": settings.ray_train_workers, "cpus_per_worker": threads(settings)}


def device(settings: Settings) -> str:
    """Where Ray actors and train workers run: `cpu`/`cuda` as set, else GPUs when the cluster has any (the
    refresh's own process may have none)."""
    if settings.device != "auto":
        return settings.device
    ray = connect(settings)
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def threads(settings: Settings) -> int:
    """CPUs (and torch threads) per actor / train worker: as set, else this process's torch thread count, the
    count the in-process path computes with (the ranker's float reductions depend on it)."""
    if settings.ray_cpus_per_worker:
        return int(settings.ray_cpus_per_worker)
    import torch

    return int(torch.get_num_threads())


def _resources(settings: Settings) -> tuple[int, int]:
    """(CPUs, GPUs) one actor or train worker reserves; refuses a request no live node can ever grant (Ray would
    wait for it forever)."""
    ray = connect(settings)
    cpus, gpus = threads(settings), int(device(settings) == "cuda")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= cpus and r.get("GPU", 0) >= gpus for r in nodes):
        have = [f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes]
        raise RayUnavailableError(f"no node of the Ray cluster at {settings.ray_address} offers {cpus} CPU"
                                  f"{f' + {gpus} GPU' if gpus else ''} for one worker (nodes: {have or 'none'}); set "
                                  "SEMALIGN_RAY_CPUS_PER_WORKER to what a node has; nothing was published")
    return cpus, gpus


def _pool(settings: Settings, cpus: int, gpus: int) -> int:
    """How many inference actors: as set, else as many as the cluster's CPUs (GPUs) fit."""
    if settings.ray_actors:
        return max(1, int(settings.ray_actors))
    res = connect(settings).cluster_resources()
    fit = res.get("GPU", 0) // gpus if gpus else res.get("CPU", 0) // max(cpus, 1)
    return max(1, int(fit))


def _run_map(settings: Settings, job: str, rows: list[dict], actor, kwargs: dict, n_out: int, dim: int,
             progress: ProgressFn | None) -> tuple[np.ndarray, np.ndarray]:
    """Runs `actor` over `rows` as a Ray Data map_batches job and scatters its output rows ({"pos", "vec", "ok"})
    back by position: (vectors [n_out, dim], ok [n_out])."""
    ray = connect(settings)
    cpus, gpus = _resources(settings)
    actors = min(_pool(settings, cpus, gpus), len(rows))
    out, ok = np.zeros((n_out, dim), np.float32), np.zeros(n_out, bool)
    if not rows:
        return out, ok
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), actors * 4))
    ds = ds.map_batches(actor, fn_constructor_kwargs={**kwargs, "device": device(settings), "threads": cpus},
                        batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                        num_cpus=cpus, num_gpus=gpus or None)
    done = np.zeros(n_out, bool)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        pos = np.asarray(batch["pos"], np.int64)
        out[pos], ok[pos], done[pos] = batch["vec"], batch["ok"], True
        if progress:
            progress(len(pos))
    if not done.all():  # a lost row would be a zero vector: refuse instead
        raise RuntimeError(f"the Ray job returned {int(done.sum())} of {n_out} rows")
    _record(job, items=n_out, rows=len(rows), actors=actors, cpus_per_actor=cpus, gpus_per_actor=gpus)
    return out, ok


def _record(job: str, **facts) -> None:
    _STATE.setdefault("jobs", []).append({"job": job, **facts})


def jobs() -> list[dict]:
    """The Ray jobs this process ran (for the refresh's summary: what ran on the cluster)."""
    return list(_STATE.get("jobs", []))


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


# ---------------------------------------------------------------- towers

ROW_BATCHES = 64  # text-tower batches per Ray Data row (at most; fewer when the job would have < 4 rows an actor)


class _TextActor:
    """Holds one text tower; each row is a run of consecutive batches of the in-process loop (longest-first)."""

    def __init__(self, model_path: str, max_length: int, batch_size: int, device: str, threads: int):
        from semalign.models.towers import TextTower

        _set_threads(threads)
        # tokenizes in its own thread: forking tokenizer processes out of a Ray worker (gRPC threads) is not safe,
        # and Ray already spreads the rows over actors
        self.tower = TextTower(model_path, device=device, max_length=max_length, batch_size=batch_size,
                               tokenize_workers=0)

    def __call__(self, batch: dict) -> dict:
        pos = [np.asarray(p, np.int64) for p in batch["pos"]]
        vec = [self.tower.encode([str(t) for t in texts]) for texts in batch["text"]]
        n = sum(len(p) for p in pos)
        return {"pos": np.concatenate(pos), "vec": np.concatenate(vec), "ok": np.ones(n, bool)}


def text_vectors(settings: Settings, texts: list[str], progress: ProgressFn | None = None) -> np.ndarray:
    """Text-tower vectors [n, d] of `texts`, computed on the cluster in the in-process loop's batches."""
    from semalign.models.towers import TextTower, default_text_batch, length_batches, text_fingerprint

    # the in-process tower's defaults for the device the actors run on, so its batches (and bits)
    batch_size = default_text_batch(device(settings))
    max_length = inspect.signature(TextTower.__init__).parameters["max_length"].default
    model = settings.resolved_text_model()
    text_fingerprint(model, max_length)  # a model dir that is not one fails here, before the cluster is asked
    dim = int(json.loads((model / "config.json").read_text())["hidden_size"])
    batches = length_batches(texts, batch_size)
    # a row carries up to ROW_BATCHES consecutive batches: the tower's encode() re-sorts a contiguous run of the
    # longest-first order into exactly these batches (same padding, same bits), and Ray Data's fixed cost per row
    # is paid once per run, not per batch
    actors = _pool(settings, *_resources(settings))
    per_row = max(1, min(ROW_BATCHES, len(batches) // (4 * actors)))
    rows = [{"pos": np.concatenate(batches[s: s + per_row]).tolist(),
             "text": [texts[i] for idx in batches[s: s + per_row] for i in idx]}
            for s in range(0, len(batches), per_row)]
    vec, _ = _run_map(settings, "text tower", rows, _TextActor, {"model_path": str(model), "max_length": max_length,
                                                   "batch_size": batch_size}, len(texts), dim, progress)
    return vec


class _ImageActor:
    """Holds one image tower; each row is one chunk of the in-process loop. Files are read on the worker node: a
    file this refresh could read that the worker cannot is an error (a missing mount), never a silent ok=False."""

    def __init__(self, device: str, threads: int):
        from semalign.models.towers import ImageTower

        _set_threads(threads)
        self.tower = ImageTower(device=device)

    def __call__(self, batch: dict) -> dict:
        pos, vec, ok = [], [], []
        for p, paths, readable in zip(batch["pos"], batch["path"], batch["readable"]):
            paths = [str(x) if x is not None else None for x in paths]
            lost = [x for x, r in zip(paths, readable) if r and not os.access(x, os.R_OK)]
            if lost:
                raise FileNotFoundError(f"image {lost[0]} (and {len(lost) - 1} more) is readable where the refresh "
                                        f"runs but not on Ray node {socket.gethostname()}: mount the image folder "
                                        "at the same path on every Ray node")
            f, k = self.tower.encode(paths)
            pos.append(np.asarray(p, np.int64)), vec.append(f), ok.append(k)
        return {"pos": np.concatenate(pos), "vec": np.concatenate(vec), "ok": np.concatenate(ok)}


def image_vectors(settings: Settings, paths: list[str | None], progress: ProgressFn | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Image-tower features [n, 1280] and ok [n] of `paths`, computed on the cluster in the in-process chunks."""
    from semalign.models.towers import ImageTower

    chunk = inspect.signature(ImageTower.__init__).parameters["batch_size"].default
    rows = [{"pos": list(range(s, min(s + chunk, len(paths)))), "path": paths[s: s + chunk],
             "readable": [p is not None and os.access(p, os.R_OK) for p in paths[s: s + chunk]]}
            for s in range(0, len(paths), chunk)]
    return _run_map(settings, "image tower", rows, _ImageActor, {}, len(paths), IMAGE_DIM, progress)


# ---------------------------------------------------------------- encoder inference

class _EncoderActor:
    """Holds the trained encoder and the tower features (from the object store); each row is one chunk
    [start, stop) of `embed_items`' loop."""

    def __init__(self, payload: list, device: str, threads: int):
        import ray
        import torch

        from semalign.models.encoder import EncoderConfig, FusionEncoder

        _set_threads(threads)
        cfg, state, self.text, self.image, self.has_image = ray.get(payload[0])
        self.model = FusionEncoder(EncoderConfig(**cfg))
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        self.model = self.model.to(device).eval()
        self.device = device

    def __call__(self, batch: dict) -> dict:
        from semalign.models.encoder import embed_items

        pos, vec = [], []
        for start, stop in zip(batch["start"], batch["stop"]):
            s = slice(int(start), int(stop))
            vec.append(embed_items(self.model, self.text[s], None if self.image is None else self.image[s],
                                   None if self.has_image is None else self.has_image[s], self.device,
                                   batch=int(stop) - int(start)))
            pos.append(np.arange(int(start), int(stop)))
        n = sum(len(p) for p in pos)
        return {"pos": np.concatenate(pos), "vec": np.concatenate(vec), "ok": np.ones(n, bool)}


def embed_items(settings: Settings, model, text: np.ndarray, image: np.ndarray | None,
                has_image: np.ndarray | None) -> np.ndarray:
    """`models.encoder.embed_items` on the cluster: the same chunks, so the same vectors."""
    from dataclasses import asdict

    from semalign.models.encoder import embed_items as local

    ray = connect(settings)
    chunk = inspect.signature(local).parameters["batch"].default
    state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    # one copy in the object store, read zero-copy by every actor on a node
    payload = [ray.put((asdict(model.cfg), state, np.asarray(text, np.float32),
                        None if image is None else np.asarray(image, np.float32),
                        None if has_image is None else np.asarray(has_image, bool)))]
    rows = [{"start": s, "stop": min(s + chunk, len(text))} for s in range(0, len(text), chunk)]
    vec, _ = _run_map(settings, "encoder", rows, _EncoderActor, {"payload": payload}, len(text), model.cfg.out_dim, None)
    return vec


# ---------------------------------------------------------------- ranker training

def _writable(obj):
    """A dataclass whose numpy fields are private copies: arrays read from the object store are read-only views
    of shared memory, and DDP writes into the model's buffers (which share memory with them on the CPU)."""
    from dataclasses import fields, is_dataclass, replace

    if not is_dataclass(obj):
        return obj
    return replace(obj, **{f.name: np.array(getattr(obj, f.name)) for f in fields(obj)
                           if f.init and isinstance(getattr(obj, f.name), np.ndarray)})


def _train_loop(config: dict) -> dict:
    """One Ray Train worker: the in-process training function, DDP-wrapped when there is more than one worker.
    Rank 0's return value (the best weights) is what `TorchTrainer.fit` hands back."""
    import ray
    import ray.train
    import ray.train.torch

    from semalign.models.ranker_training import DDP_OPTIONS, train_ranker

    _set_threads(config["threads"])
    cfg, tables, train, val = (_writable(x) for x in ray.get(config["inputs"][0]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    dev = str(ray.train.torch.get_device()) if config["device"] == "cuda" else "cpu"
    wrap = None
    if world > 1:
        wrap = lambda m: ray.train.torch.prepare_model(  # noqa: E731 (DDP)
            m, move_to_device=False, parallel_strategy_kwargs=dict(DDP_OPTIONS))
    res = train_ranker(cfg, tables, train, val, dev,
                       distributed=wrap, rank=rank, world_size=world)
    if rank != 0:
        return {}
    # numpy, not tensors: Ray Train refuses to return tensors (same bytes either way)
    return {"state": {k: v.detach().cpu().numpy() for k, v in res.model.state_dict().items()}, "history": res.history,
            "best_epoch": res.best_epoch, "best_val_auc": res.best_val_auc, "samples_per_s": res.samples_per_s,
            "epoch_samples_per_s": res.epoch_samples_per_s, "step_mode": res.step_mode}


def train_ranker(settings: Settings, cfg, tables, train, val):
    """`models.ranker_training.train_ranker` as a Ray Train TorchTrainer job; returns its TrainResult with the model
    rebuilt here from rank 0's weights."""
    import uuid

    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from semalign.models.ranker import Ranker
    from semalign.models.ranker_training import TrainResult

    ray = connect(settings)
    cpus, gpus = _resources(settings)
    workers = max(1, int(settings.ray_train_workers))
    # the frames travel once, through the object store, not pickled inside train_loop_config (which Ray Train
    # copies through its controller, holding more copies of them in memory at once). A list keeps Ray from
    # resolving the reference before the worker asks for it
    config = {"inputs": [ray.put((cfg, tables, train, val))], "threads": cpus, "device": "cuda" if gpus else "cpu"}
    # Ray Train keeps a run folder (no checkpoints are written: the weights come back as rank 0's return value)
    storage, name = settings.home / "ray" / "train", f"ranker-{uuid.uuid4().hex[:8]}"
    storage.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(_train_loop, train_loop_config=config,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=bool(gpus),
                                                        resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
                           run_config=RunConfig(name=name, storage_path=str(storage)))
    try:
        out = trainer.fit().return_value
    except Exception as e:  # the workers' own errors, on one line (the refresh reports the first line)
        failures = getattr(e, "worker_failures", None) or {}
        detail = "; ".join(f"worker {rank}: {type(x).__name__}: {str(x).strip().splitlines()[-1][:300] if str(x).strip() else ''}"
                           for rank, x in sorted(failures.items())) or " ".join(str(e).split())[:500]
        raise RuntimeError(f"the ranker's Ray Train job failed: {detail}") from e
    finally:
        shutil.rmtree(storage / name, ignore_errors=True)  # only Ray Train's bookkeeping: the weights came back
    if not out or "state" not in out:
        raise RuntimeError("the Ray Train job ended without the ranker's weights")
    model = Ranker(cfg, tables, train.user_feats.shape[1])
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in out["state"].items()})  # writable copies
    model.eval()
    _record("ranker", samples=len(train), workers=workers, cpus_per_worker=cpus, gpus_per_worker=gpus)
    return TrainResult(model=model, history=out["history"], best_epoch=out["best_epoch"],
                       best_val_auc=out["best_val_auc"], samples_per_s=out["samples_per_s"],
                       epoch_samples_per_s=out["epoch_samples_per_s"], step_mode=out["step_mode"])


# ---------------------------------------------------------------- the engine (flows/engines.py's interface)

class RayEngine:
    """The compute engine of a Ray cluster: the same interface and results as flows.engines.LocalEngine."""

    name = "ray"

    def __init__(self, settings: Settings):
        self.settings = settings

    def connect(self) -> dict:
        """Connects (an unreachable cluster fails here, before anything is computed) and says what it is."""
        return cluster_info(self.settings)

    def jobs(self) -> list[dict]:
        return jobs()

    def stage_name(self, what: str) -> str:
        return f"{what} (ray)"

    def image_tower(self):
        """The tower here only names the features (its fingerprint keys the cache); the cluster computes them."""
        from semalign.models.towers import ImageTower

        return ImageTower(device=self.settings.resolved_device())

    def text_vectors(self, texts: list[str], progress: ProgressFn | None = None) -> np.ndarray:
        return text_vectors(self.settings, texts, progress=progress)

    def image_vectors(self, paths, progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
        return image_vectors(self.settings, paths, progress=progress)

    def item_embeddings(self, model, text, image, has_image) -> np.ndarray:
        return embed_items(self.settings, model, text, image, has_image)

    def train_ranker(self, cfg, tables, train, val, rep):
        with rep.stage(f"ranker (ray, {self.settings.ray_train_workers} worker(s))", None):
            return train_ranker(self.settings, cfg, tables, train, val)
