"""Benchmark: time and peak memory of each heavy refresh stage against catalogue size, with growth exponents.

For each catalogue size the synthetic generator (`semalign.synth`, events = --events-per-item x items) writes a
dataset, then every stage runs in its own fresh subprocess, so one stage's memory never counts against
another's. A stage calls the function the refresh calls (flows/refresh.py, flows/semantic_ids.py,
flows/ranker_stages.py), with the refresh's default settings; its inputs come from the previous stages' outputs
in the work folder (not timed). Peak memory is the process RSS sampled every 20 ms during the stage (psutil:
numpy and torch allocations included), beside the RSS the process held before the stage began.

  stage          what is timed (the function the refresh calls)
  synth          semalign.synth.generate (the data itself; not a refresh stage)
  load           flows.semantic_ids.ingest: read + validate the data contract (load_dataset)
  input_suite    validation.suites.input_suite: the Great Expectations input suite (persistent context)
  text_tower     models.towers.TextTower.encode on a fixed sample of the catalogue's texts; the catalogue's
                 time is EXTRAPOLATED from that throughput (MiniLM on 2 CPU cores: ~hours at 1M items)
  tower_cache    models.towers.FeatureCache.get_or_compute as tower_features uses it: keying every text (sha256),
                 writing the cache (cold) and reading it back in a fresh process (warm: what a rerun pays)
  pairs          data.mine_pairs on the train, val and test windows (what encoder_stage mines)
  encoder_epoch  models.encoder.train_encoder for one epoch (its per-epoch val hit@30 included), then embed_items;
                 above --max-eval-pairs validation pairs it validates on a sample and the hit@30's share of the time
                 is EXTRAPOLATED to the pairs the refresh scores: all of them up to models.encoder.MAX_EVAL_PAIRS,
                 a sample of that many above it (its cost is queries x items: linear in the pairs at a fixed size)
  encoder_metrics flows.semantic_ids.encoder_metrics: hit@30 of the encoder and the raw vectors on the test pairs
                 (same sampling and extrapolation above --max-eval-pairs)
  codebook       models.codebook.build_codebook, RQ-KMeans with codebook_stage's arguments (codes sized to the
                 catalogue by default_codes, so the codes per level grow with sqrt(items) up to 256)
  sid_assign     flows.semantic_ids.sid_table: every item's SID, dedup level and catalogue metrics
  histories      features.build_frames: user histories (data.user_histories) of the train, val and test events
  user_table     features.user_table: the user features the refresh publishes
  ranker_epoch   models.ranker_training.train_ranker for one epoch (its validation pass included), the served variant
  evaluate       models.ranker.predict on the test events + flows.ranker_stages.window_metrics

Downstream of the tower, stages read stand-in 384-d text vectors (the item's category centroid plus noise, unit
norm) in place of MiniLM outputs: the tower cannot embed 1M texts on this CPU in the benchmark's time, and no
later stage's cost depends on the vectors' values.

  python bench/bench_scaling.py [--sizes 10000 30000 100000 1000000] [--stages load,pairs,...] [--heavy-max 100000]
                                [--profile codebook] [--before OLD.json] [--notes NOTES.md] [--tag scaling_cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import harness
import numpy as np

OUT = harness.RESULTS
STAGES = ("synth", "load", "input_suite", "text_tower", "tower_cache", "pairs", "encoder_epoch", "encoder_metrics",
          "codebook",
          "sid_assign", "histories", "user_table", "ranker_epoch", "evaluate")
NEEDS = {  # a stage runs only when the stages it reads from succeeded at that size
    "load": ("synth",), "input_suite": ("load",), "text_tower": ("load",), "tower_cache": ("load",),
    "pairs": ("load",), "encoder_epoch": ("pairs",), "encoder_metrics": ("encoder_epoch",),
    "codebook": ("encoder_epoch",), "sid_assign": ("codebook",),
    "histories": ("load",), "user_table": ("load",), "ranker_epoch": ("sid_assign", "histories"),
    "evaluate": ("ranker_epoch",)}
TEXT_DIM = 384
# stages whose cost on 2 CPU cores puts sizes above --heavy-max out of the benchmark's time budget
HEAVY = ("encoder_epoch", "encoder_metrics", "codebook", "sid_assign", "ranker_epoch", "evaluate")


# ---------------------------------------------------------------- measuring one stage (in a subprocess)

class PeakRss:
    """Samples this process's RSS on a thread while the block runs; with `machine=True` also the whole machine's
    used memory and, where NVML is there, GPU 0's used memory (a Ray stage computes in actor processes, which
    this process's RSS does not see)."""

    def __init__(self, every_s: float = 0.02, machine: bool = False):
        import psutil

        self.psutil, self.proc, self.every_s = psutil, psutil.Process(), every_s
        self.before = self.peak = self.proc.memory_info().rss
        self.machine, self.gpu = machine, None
        if machine:
            try:
                import pynvml

                pynvml.nvmlInit()
                self.gpu = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
            except Exception:  # noqa: BLE001 (no NVML, no GPU: machine memory only)
                self.gpu = None
        self._stop = threading.Event()

    def _machine_used(self) -> int:
        return self.psutil.virtual_memory().used

    def _gpu_used(self) -> int:
        return self.gpu[0].nvmlDeviceGetMemoryInfo(self.gpu[1]).used if self.gpu else 0

    def _sample(self):
        self.peak = max(self.peak, self.proc.memory_info().rss)
        if self.machine:
            self.machine_peak = max(self.machine_peak, self._machine_used())
            self.gpu_peak = max(self.gpu_peak, self._gpu_used())

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self):
        self.before = self.peak = self.proc.memory_info().rss
        if self.machine:
            self.machine_before = self.machine_peak = self._machine_used()
            self.gpu_before = self.gpu_peak = self._gpu_used()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self._sample()

    def extra(self) -> dict:
        """Machine-wide and GPU peaks above what was in use when the stage began (GB)."""
        if not self.machine:
            return {}
        out = {"machine_peak_gb_above_start": round((self.machine_peak - self.machine_before) / 2**30, 3)}
        if self.gpu:
            out.update(gpu_used_gb_peak=round(self.gpu_peak / 2**30, 3),
                       gpu_used_gb_above_start=round((self.gpu_peak - self.gpu_before) / 2**30, 3))
        return out


class Work:
    """The work folder of one size: the data, the settings, and each stage's outputs for the next stages."""

    def __init__(self, folder: Path, size: int, events_per_item: int, seed: int, device: str = "cpu",
                 ray: str | None = None):
        from semalign.config import Settings

        self.dir, self.size, self.events_per_item, self.seed = folder, size, events_per_item, seed
        self.device, self.ray = device, ray
        self.data = folder / "data"
        self.settings = Settings(home=folder / "home", data=self.data, seed=seed, device=device, ray_address=ray)
        self._ds = self._split = None

    def ds(self):
        if self._ds is None:
            with open(self.dir / "dataset.pkl", "rb") as f:
                self._ds = pickle.load(f)
        return self._ds

    def split(self):
        from semalign.data import settings_split

        if self._split is None:
            self._split = settings_split(self.ds(), self.settings)
        return self._split

    def text(self) -> np.ndarray:
        """Stand-in text-tower vectors: the item's category centroid plus noise, unit norm (float32)."""
        ds = self.ds()
        cats, inv = np.unique(ds.items["category"].to_numpy(), return_inverse=True)
        rng = np.random.default_rng(self.seed)
        centroids = rng.standard_normal((len(cats), TEXT_DIM)).astype(np.float32)
        v = centroids[inv] + 0.7 * rng.standard_normal((len(inv), TEXT_DIM), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v

    def path(self, name: str) -> Path:
        return self.dir / name


def stage_synth(w: Work, m: PeakRss) -> dict:
    from semalign.synth import SynthConfig, generate

    cfg = SynthConfig(items=w.size, events=w.events_per_item * w.size, seed=w.seed)
    with m:
        res = generate(w.data, cfg, force=True)
    return {"events": res["events"], "events_per_s": res["events_per_s"], "bytes": res["bytes"]}


def stage_load(w: Work, m: PeakRss) -> dict:
    from semalign.flows.semantic_ids import ingest

    with m:
        ds = ingest(w.settings, w.data)
    with open(w.path("dataset.pkl"), "wb") as f:
        pickle.dump(ds, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"events": len(ds.interactions), "users": int(ds.n_users), "items": ds.n_items}


def stage_input_suite(w: Work, m: PeakRss) -> dict:
    from semalign.flows.gates import ge_root
    from semalign.validation.suites import input_suite

    ds = w.ds()
    with m:
        verdict = input_suite(ds.items, ds.interactions, ge_root=ge_root(w.settings))
    return {"passed": verdict.passed}


def stage_text_tower(w: Work, m: PeakRss, sample: int) -> dict:
    from semalign.models.towers import TextTower

    if w.ray:  # the whole catalogue through Ray Data actors (what tower_features does with an address set)
        from semalign.flows import ray_engine

        texts = w.ds().items["text"].tolist()
        t = time.perf_counter()
        ray_engine.connect(w.settings)
        connect_s = time.perf_counter() - t
        with m:
            vec = ray_engine.text_vectors(w.settings, texts)
        return {"texts": len(texts), "texts_per_s": round(len(texts) / m.seconds, 1), "dim": int(vec.shape[1]),
                "ray_connect_s": round(connect_s, 2), "ray_jobs": ray_engine.jobs()}
    texts = w.ds().items["text"].tolist()[:sample]
    t = time.perf_counter()
    tower = TextTower(w.settings.resolved_text_model(), device=w.device)
    tower.encode(texts[:8])  # warm-up: first-call allocations are not throughput
    load_s = time.perf_counter() - t
    with m:
        tower.encode(texts)
    tokens = tower.tokenizer(texts, truncation=True, max_length=tower.max_length)["input_ids"]
    rate = len(texts) / m.seconds
    m.seconds = w.size / rate  # the catalogue's time, from the sample's throughput
    return {"extrapolated": True, "sample": len(texts), "texts_per_s": round(rate, 1),
            "tokens_per_text": round(float(np.mean([len(t) for t in tokens])), 1),
            "measured_s": round(len(texts) / rate, 2), "model_load_s": round(load_s, 2)}


def stage_tower_cache(w: Work, m: PeakRss) -> dict:
    from semalign.models.towers import FeatureCache, text_key

    texts = w.ds().items["text"].tolist()
    vectors = w.text()
    root = w.path("feature_cache")
    with m:
        keys = [text_key(t) for t in texts]
        FeatureCache(root, "standin").get_or_compute(keys, lambda missing: (vectors[missing], np.ones(len(missing), bool)))
    # a rerun: a fresh process reads the cache back (keys.json + vectors)
    warm = subprocess.run([sys.executable, "-c", WARM_READ, str(root), str(w.data)], capture_output=True, text=True,
                          check=True)
    return {"warm_read": json.loads(warm.stdout.strip().splitlines()[-1])}


WARM_READ = """
import json, resource, sys, time
import pandas as pd
from semalign.models.towers import FeatureCache, text_key
texts = pd.read_parquet(sys.argv[2] + "/items.parquet", columns=["text"])["text"].tolist()
t = time.perf_counter()
v, ok, n = FeatureCache(sys.argv[1], "standin").get_or_compute([text_key(x) for x in texts], None)
print(json.dumps({"seconds": round(time.perf_counter() - t, 3), "computed": n,
                  "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}))
"""


def stage_pairs(w: Work, m: PeakRss) -> dict:
    from semalign.data import mine_pairs

    split, s = w.split(), w.settings
    with m:
        pairs = {p: mine_pairs(split.part(p), s.pair_window, s.pair_max_gap_s) for p in ("train", "val", "test")}
    for p, v in pairs.items():
        np.save(w.path(f"pairs_{p}.npy"), v)
    return {f"{p}_pairs": int(len(v)) for p, v in pairs.items()}


def _eval_scale(n_all: int, n_eval: int) -> float:
    """How much longer the refresh's hit@30 takes than the bench's on n_eval pairs: the refresh scores
    min(n_all, MAX_EVAL_PAIRS) of them (models.encoder.hit_at_k samples above its cap)."""
    from semalign.models.encoder import MAX_EVAL_PAIRS

    return min(n_all, MAX_EVAL_PAIRS) / max(n_eval, 1)


def _sample_pairs(pairs: np.ndarray, cap: int) -> np.ndarray:
    if len(pairs) <= cap:
        return pairs
    return pairs[np.sort(np.random.default_rng(0).choice(len(pairs), size=cap, replace=False))]


def stage_encoder_epoch(w: Work, m: PeakRss, max_eval_pairs: int) -> dict:
    from semalign.models.encoder import EncoderConfig, embed_items, hit_at_k, train_encoder

    s = w.settings
    text = w.text()
    pairs, all_val = np.load(w.path("pairs_train.npy")), np.load(w.path("pairs_val.npy"))
    val_pairs = _sample_pairs(all_val, max_eval_pairs)
    # encoder_stage's config, one epoch
    cfg = EncoderConfig(text_dim=TEXT_DIM, image_dim=0, hidden=s.encoder_hidden, out_dim=s.embed_dim, epochs=1,
                        batch_size=s.encoder_batch, lr=s.encoder_lr, content_weight=s.encoder_content_weight,
                        seed=s.seed, hard_negative_share=s.encoder_hard_negative_share)
    with m:
        res = train_encoder(text, None, np.zeros(len(text), bool), pairs, val_pairs, cfg, w.device)
        if w.ray:  # encoder_stage's inference on the cluster
            from semalign.flows import ray_engine

            emb = ray_engine.embed_items(w.settings, res.model, text, None, None)
        else:
            emb = embed_items(res.model, text, None, None, w.device)
    np.save(w.path("embeddings.npy"), emb)
    t = time.perf_counter()  # the validation hit@30 alone (it runs once per epoch inside train_encoder)
    hit_at_k(emb, val_pairs, cfg.eval_k, device=w.device)
    val_hit_s = time.perf_counter() - t
    out = {"train_pairs": int(len(pairs)), "val_pairs": int(len(all_val)), "val_hit_s": round(val_hit_s, 2)}
    if _eval_scale(len(all_val), len(val_pairs)) > 1:
        extra = val_hit_s * (_eval_scale(len(all_val), len(val_pairs)) - 1)
        out.update(extrapolated=True, measured_s=round(m.seconds, 2), evaluated_pairs=int(len(val_pairs)),
                   val_hit_all_pairs_s=round(val_hit_s + extra, 1))
        m.seconds += extra
    return out


def stage_encoder_metrics(w: Work, m: PeakRss, max_eval_pairs: int) -> dict:
    from semalign.flows.semantic_ids import TowerFeatures, encoder_metrics

    text = w.text()
    feats = TowerFeatures(text=text, image=None, has_image=np.zeros(len(text), bool), text_model="standin",
                          image_model=None, computed={})
    emb = np.load(w.path("embeddings.npy"))
    all_test = np.load(w.path("pairs_test.npy"))
    test_pairs = _sample_pairs(all_test, max_eval_pairs)
    with m:
        metrics = encoder_metrics(emb, feats, w.split(), test_pairs, 30, w.device)
    out = {"test_pairs": int(len(all_test)), "hit@30": round(metrics["hit@30"]["encoder"], 4)}
    if _eval_scale(len(all_test), len(test_pairs)) > 1:
        out.update(extrapolated=True, measured_s=round(m.seconds, 2), evaluated_pairs=int(len(test_pairs)))
        m.seconds *= _eval_scale(len(all_test), len(test_pairs))
    return out


def stage_codebook(w: Work, m: PeakRss) -> dict:
    from scipy.optimize import linear_sum_assignment

    from semalign.models.codebook import build_codebook, default_codes

    s = w.settings
    fit_items = w.split().train_items
    emb = np.load(w.path("embeddings.npy"))
    codes = s.codebook_codes or default_codes(len(fit_items))
    with m:
        cb = build_codebook(emb[fit_items], levels=s.codebook_levels, codes=codes, method="rqkmeans",
                            iters=s.kmeans_iters, seed=s.seed, parent=None, solve_assignment=linear_sum_assignment,
                            device=w.device)
    cb.save(w.path("codebook"))
    return {"fit_items": int(len(fit_items)), "levels": s.codebook_levels, "codes": codes, "device": w.device}


def stage_sid_assign(w: Work, m: PeakRss) -> dict:
    from semalign.flows.semantic_ids import sid_table
    from semalign.models.codebook import Codebook

    cb = Codebook.load(w.path("codebook"))
    emb = np.load(w.path("embeddings.npy"))
    item_ids = w.ds().items["item_id"].tolist()
    with m:
        sids, metrics = sid_table(cb, item_ids, emb, rotated=False)
    np.save(w.path("codes.npy"), sids[[f"sid_{lvl}" for lvl in range(cb.levels)]].to_numpy())
    return {"max_dedup": metrics["max_dedup"], "collision_rate": round(metrics["catalogue_collision_rate"], 4)}


def stage_histories(w: Work, m: PeakRss) -> dict:
    from semalign.features import build_frames, user_features

    split = w.split()
    ufeat = user_features(split, w.ds().n_users)
    with m:
        frames = build_frames(split, ufeat, w.settings.hist_len)
    with open(w.path("frames.pkl"), "wb") as f:
        pickle.dump(frames, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {f"{k}_events": len(v) for k, v in frames.items()}


def stage_user_table(w: Work, m: PeakRss) -> dict:
    from semalign.features import user_table

    split = w.split()
    with m:
        table = user_table(w.ds(), split, w.settings.hist_len)
    return {"users": len(table)}


def _ranker_inputs(w: Work):
    from semalign.features import item_tables
    from semalign.models.codebook import Codebook
    from semalign.spec import ranker_config

    s = w.settings.model_copy(update={"ranker_epochs": 1})
    cfg = ranker_config(s)
    codes = np.load(w.path("codes.npy"))
    cb = Codebook.load(w.path("codebook"))
    emb = np.load(w.path("embeddings.npy"))
    tables = item_tables(w.ds(), w.split(), emb, w.text() if cfg.keep_raw_content else None, codes, cb.codes)
    with open(w.path("frames.pkl"), "rb") as f:
        frames = pickle.load(f)
    return cfg, tables, frames


def _subsample(frame, n: int, seed: int):
    from semalign.models.ranker import Frame

    keep = np.sort(np.random.default_rng(seed).choice(len(frame), size=n, replace=False))
    return Frame(user_feats=frame.user_feats[keep], cand=frame.cand[keep], hist=frame.hist[keep],
                 label=frame.label[keep])


def stage_ranker_epoch(w: Work, m: PeakRss, max_train: int) -> dict:
    import torch

    from semalign.models.ranker_training import train_ranker

    cfg, tables, frames = _ranker_inputs(w)
    train, val = frames["train"], frames["val"]
    scale = 1.0
    if len(train) > max_train:  # a uniform sample; the epoch's time scales with the events it sees
        scale = len(train) / max_train
        val = _subsample(val, max(1, int(len(val) / scale)), 1)
        train = _subsample(train, max_train, 0)
    with m:
        if w.ray:  # ranker_stage's Ray Train job (TorchTrainer, settings.ray_train_workers workers)
            from semalign.flows import ray_engine

            res = ray_engine.train_ranker(w.settings, cfg, tables, train, val)
        else:
            res = train_ranker(cfg, tables, train, val, w.device)
    torch.save(res.model.state_dict(), w.path("ranker.pt"))
    out = {"variant": cfg.variant, "train_events": len(frames["train"]), "samples_per_s": round(res.samples_per_s),
           "val_auc": round(res.best_val_auc, 4), "step_mode": res.step_mode,
           "epoch_samples_per_s": [round(r) for r in res.epoch_samples_per_s]}
    if scale > 1:
        out.update(extrapolated=True, measured_s=round(m.seconds, 2), trained_events=len(train))
        m.seconds *= scale
    return out


def stage_evaluate(w: Work, m: PeakRss) -> dict:
    import torch

    from semalign.flows.ranker_stages import window_metrics
    from semalign.models.ranker import Ranker, predict

    cfg, tables, frames = _ranker_inputs(w)
    model = Ranker(cfg, tables, frames["train"].user_feats.shape[1])
    model.load_state_dict(torch.load(w.path("ranker.pt")))
    model.to(w.device).eval()
    split = w.split()
    with m:
        p = predict(model, frames["test"], w.device)
        metrics = window_metrics(split, p)
    return {"test_events": len(p), "auc": round(metrics["all"]["auc"], 4),
            "unseen_auc": round(metrics.get("unseen", {}).get("auc", float("nan")), 4)}


def run_stage(stage: str, size: int, work: Path, args) -> dict:
    import torch

    w = Work(work, size, args.events_per_item, args.seed, args.device, args.ray)
    load_before = os.getloadavg()[0]  # the box may be shared: a busy neighbour slows a stage down
    m = PeakRss(machine=args.device != "cpu" or bool(args.ray))
    fn = globals()[f"stage_{stage}"]
    kw = {"sample": args.tower_sample} if stage == "text_tower" else \
        {"max_train": args.ranker_max_train} if stage == "ranker_epoch" else \
        {"max_eval_pairs": args.max_eval_pairs} if stage in ("encoder_epoch", "encoder_metrics") else {}
    if args.profile_stage:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        extra = fn(w, m, **kw)
        prof.disable()
        stats = pstats.Stats(prof).sort_stats("tottime")
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:8]
        extra["profile_top_tottime"] = [{"function": f"{Path(f[0]).name}:{f[1]}({f[2]})", "tottime_s": round(v[2], 2),
                                         "calls": v[1]} for f, v in top]
    else:
        extra = fn(w, m, **kw)
    return {"stage": stage, "items": size, "seconds": round(m.seconds, 3), "peak_gb": round(m.peak / 2**30, 3),
            "rss_before_gb": round(m.before / 2**30, 3),
            "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "torch_threads": torch.get_num_threads(), "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2), "device": w.device, "ray": bool(w.ray), **m.extra(),
            **extra}


# ---------------------------------------------------------------- the orchestrator

def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    out = {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
           "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import ray

        out["ray"] = ray.__version__
    except ImportError:
        pass
    return out


def growth(results: list[dict]) -> dict:
    """Per stage: the least-squares slope of log(seconds) vs log(items) over the sizes measured, and the local
    slope between the two largest sizes."""
    out = {}
    for stage in STAGES:
        rows = sorted((r for r in results if r["stage"] == stage and r.get("seconds")), key=lambda r: r["items"])
        if len(rows) < 2:
            continue
        x = np.log([r["items"] for r in rows])
        y = np.log([max(r["seconds"], 1e-4) for r in rows])
        out[stage] = {"exponent": round(float(np.polyfit(x, y, 1)[0]), 2),
                      "last_pair": round(float((y[-1] - y[-2]) / (x[-1] - x[-2])), 2),
                      "extrapolated": any(r.get("extrapolated") for r in rows)}
    return out


def dominant(results: list[dict], sizes: list[int]) -> dict:
    """Per size: the slowest stage with the text tower set aside (it is always extrapolated), and the slowest
    of all."""
    out = {}
    for n in sizes:
        rows = [r for r in results if r["items"] == n and r.get("seconds") and r["stage"] != "synth"]
        rest = [r for r in rows if r["stage"] != "text_tower"]
        if rows:
            top = max(rest, key=lambda r: r["seconds"]) if rest else None
            out[str(n)] = {"measured": top["stage"] if top else None,
                           "extrapolated": bool(top and top.get("extrapolated")),
                           "any": max(rows, key=lambda r: r["seconds"])["stage"]}
    return out


def to_markdown(res: dict) -> str:
    sizes, results = res["sizes"], res["results"]
    by = {(r["stage"], r["items"]): r for r in results}
    lines = [f"# {res['tag']}", "", f"command: `{res['command']}`", "",
             f"machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, {res['machine']['memory_gb']} GiB; "
             f"Python {res['machine']['python']}, torch {res['machine']['torch']}, numpy {res['machine']['numpy']}"
             + (f"; GPU {res['machine']['gpu']} ({res['machine']['gpu_memory_gb']} GiB)" if res['machine'].get('gpu') else "")
             + (f"; Ray {res['machine']['ray']}" if res.get("ray") and res['machine'].get('ray') else ""), "",
             f"Model stages on `{res.get('device', 'cpu')}`"
             + ("; the text tower, encoder inference and ranker training through a local Ray cluster (Ray Data "
                "actors, Ray Train), as the refresh runs them with SEMALIGN_RAY_ADDRESS; encoder training, codebook "
                "and SID assignment in the stage's own process. A cell's RSS is the stage's own process (the Ray "
                "driver); `machine +x` is the whole machine's used memory above the stage's start (actors "
                "included), `GPU y` the GPU's used memory at its peak." if res.get("ray") else ".")
             if res.get("device", "cpu") != "cpu" or res.get("ray") else "",
             f"Synthetic catalogues (`semalign data synth`, seed {res['seed']}), {res['events_per_item']} events per "
             f"item, users = items / 2; refresh defaults (split {res['split']}, ranker `{res['ranker_variant']}`). "
             "Each cell: seconds / peak RSS GB of a fresh process running that stage (RSS sampled every 20 ms; it "
             "includes the stage's inputs, loaded before the clock starts). *italic* = extrapolated (see the notes).",
             "", "| stage | " + " | ".join(f"{n:,} items" for n in sizes) + " | exponent (fit) | last pair |",
             "|---" * (len(sizes) + 3) + "|"]
    g = res["growth"]
    for stage in STAGES:
        if not any((stage, n) in by for n in sizes):
            continue
        cells = []
        for n in sizes:
            r = by.get((stage, n))
            if r is None:
                cells.append("-")
            elif r.get("error"):
                cells.append(f"failed: {r['error'][:60]}")
            else:
                cell = f"{r['seconds']:,.2f} s / {r['peak_gb']:.2f} GB"
                if "machine_peak_gb_above_start" in r:
                    cell += f" (machine +{r['machine_peak_gb_above_start']:.1f}" + (
                        f", GPU {r['gpu_used_gb_peak']:.1f}" if "gpu_used_gb_peak" in r else "") + ")"
                cells.append(f"*{cell}*" if r.get("extrapolated") else cell)
        e = g.get(stage, {})
        flag = " **superlinear**" if e.get("exponent", 0) > 1.2 else ""
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {e.get('exponent', '-')}{flag} | {e.get('last_pair', '-')} |")
    lines += ["", "Slowest stage per size, the text tower aside (*: its cell is extrapolated): " + "; ".join(
        f"{int(n):,}: {d['measured']}{'*' if d.get('extrapolated') else ''}" for n, d in res["dominant"].items())
        + (". With the text tower counted it is the text tower at every size." if all(
            d["any"] == "text_tower" for d in res["dominant"].values()) else "."), ""]
    details = [r for r in results if r.get("extrapolated")]
    if details:
        lines += ["Extrapolated cells:"]
        for r in details:
            if r["stage"] == "text_tower":
                lines.append(f"- text_tower at {r['items']:,}: MiniLM on {r['sample']} of the catalogue's texts took "
                             f"{r['measured_s']} s ({r['texts_per_s']} texts/s); the cell is items / that rate.")
            elif r["stage"] in ("encoder_epoch", "encoder_metrics"):
                lines.append(f"- {r['stage']} at {r['items']:,}: hit@30 evaluated on {r['evaluated_pairs']:,} of "
                             f"{r.get('val_pairs', r.get('test_pairs')):,} pairs (measured {r['measured_s']} s); the "
                             "cell adds the remaining pairs' share at the measured cost per pair.")
            else:
                lines.append(f"- {r['stage']} at {r['items']:,}: trained on {r['trained_events']:,} of "
                             f"{r['train_events']:,} training events (uniform sample) in {r['measured_s']} s; the cell "
                             "scales that by the ratio.")
        lines.append("")
    profiled = [r for r in results if r.get("profile_top_tottime")]
    for r in profiled:
        lines += [f"Profile of `{r['stage']}` at {r['items']:,} items (cProfile, top functions by own time):", "",
                  "| function | own s | calls |", "|---|---|---|"]
        lines += [f"| `{p['function']}` | {p['tottime_s']} | {p['calls']:,} |" for p in r["profile_top_tottime"]]
        lines.append("")
    if res.get("before"):
        lines += [f"Before / after the fixes in this change: before = `{res['before']['command']}` at the commit "
                  f"before them (`{res['before']['source']}`), after = this run:", "",
                  "| stage | items | before s / GB (load avg) | after s / GB (load avg) |", "|---|---|---|---|"]

        def cell(r):
            c = f"{r['seconds']:,.2f} / {r['peak_gb']:.2f}"
            c = f"*{c}*" if r.get("extrapolated") else c
            return c + (f" ({r['loadavg_1m_before']})" if "loadavg_1m_before" in r else "")
        for b in res["before"]["results"]:
            a = by.get((b["stage"], b["items"]))
            if a is not None and not b.get("error") and b["stage"] in res["before"].get("compare", STAGES):
                lines.append(f"| {b['stage']} | {b['items']:,} | {cell(b)} | {cell(a)} |")
        lines.append("")
    if res.get("skipped"):
        lines += ["Not run: " + "; ".join(res["skipped"]), ""]
    if res.get("notes"):
        lines += [res["notes"].strip(), ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, stage in enumerate(STAGES):
        rows = sorted((r for r in res["results"] if r["stage"] == stage and r.get("seconds")), key=lambda r: r["items"])
        if rows:
            e = res["growth"].get(stage, {}).get("exponent")
            ax.plot([r["items"] for r in rows], [r["seconds"] for r in rows], marker="os^Dv"[i % 5],
                    color=plt.cm.tab20(i / len(STAGES)),
                    linestyle="--" if any(r.get("extrapolated") for r in rows) else "-",
                    label=f"{stage}" + (f" (n^{e})" if e is not None else ""))
    n = np.array(res["sizes"], float)
    ax.plot(n, n / n[0] * 0.1, color="grey", linewidth=0.8, linestyle=":", label="linear reference")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("catalogue items (events = %d x items)" % res["events_per_item"])
    ax.set_ylabel("seconds")
    ax.set_title("refresh stages vs catalogue size (dashed: extrapolated)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 100_000, 1_000_000])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of: " + ",".join(STAGES))
    ap.add_argument("--events-per-item", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tower-sample", type=int, default=256, help="texts the text tower encodes per size")
    ap.add_argument("--heavy-max", type=int, default=100_000,
                    help="largest size the model stages (%s) run at" % ", ".join(HEAVY))
    ap.add_argument("--max-eval-pairs", type=int, default=10_000,
                    help="hit@30 pairs evaluated; above it a sample is evaluated and its time extrapolated to the "
                         "pairs the refresh scores (at most models.encoder.MAX_EVAL_PAIRS)")
    ap.add_argument("--ranker-max-train", type=int, default=200_000,
                    help="training events per ranker epoch; above it a uniform sample is trained, time extrapolated")
    ap.add_argument("--stage-timeout", type=int, default=900, help="seconds; a stage over it is recorded as failed")
    ap.add_argument("--profile", default="", help="comma-separated stages to also run under cProfile at the "
                                                   "largest size they ran at")
    ap.add_argument("--before", default=None, help="a previous run's JSON: its cells are shown beside this run's")
    ap.add_argument("--notes", default=None, help="a markdown file appended to the table (findings, profiles)")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="where the model stages compute (the refresh's SEMALIGN_DEVICE)")
    ap.add_argument("--ray", default=None, help="a Ray cluster's address: the text tower, encoder inference and "
                    "ranker training run there, as the refresh runs them with SEMALIGN_RAY_ADDRESS")
    ap.add_argument("--tag", default="scaling_cpu")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render", default=None, help="only rewrite the .md and .png of this run's JSON (with --notes, "
                                                   "--before)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RUN.json",
                    help="only combine runs of one machine (e.g. calls that each ran some stages on one kept --work "
                         "folder) into --tag: a cell measured in a later run replaces the same cell of an earlier "
                         "one, failed cells never replace measured ones")
    ap.add_argument("--stage", help=argparse.SUPPRESS)       # internal: run one stage in this process
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--profile-stage", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, args.size, Path(args.work), args)), flush=True)
        return
    if args.merge:
        merge(args)
        return
    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["dominant"] = dominant(res["results"], res["sizes"])
        write(res, args, Path(args.render).parent, res["tag"])
        return
    import shutil
    import tempfile

    from semalign.config import Settings

    stages = [s for s in STAGES if s in args.stages.split(",")]
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}")
    work_root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="semalign-scaling-"))
    s = Settings()
    res = {"tag": args.tag, "command": harness.command(),
           "machine": machine(), "sizes": sorted(args.sizes), "events_per_item": args.events_per_item, "seed": args.seed,
           "split": s.split, "ranker_variant": s.ranker_variant, "device": args.device, "ray": bool(args.ray), "stages": stages, "results": [], "skipped": []}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("SEMALIGN_HOME", None)
    t_all = time.perf_counter()

    def child(stage, n, profile=False):
        cmd = [sys.executable, __file__, "--stage", stage, "--size", str(n), "--work", str(work_root / str(n)),
               "--events-per-item", str(args.events_per_item), "--seed", str(args.seed),
               "--tower-sample", str(args.tower_sample), "--ranker-max-train", str(args.ranker_max_train),
               "--max-eval-pairs", str(args.max_eval_pairs), "--device", args.device] + \
            (["--ray", args.ray] if args.ray else [])
        if profile:
            cmd.append("--profile-stage")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.stage_timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"stage": stage, "items": n, "error": f"over the {args.stage_timeout} s stage timeout"}
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1]
            return {"stage": stage, "items": n, "error": f"exit {p.returncode}: {tail}"}
        return json.loads(p.stdout.strip().splitlines()[-1])

    for n in sorted(args.sizes):
        (work_root / str(n)).mkdir(parents=True, exist_ok=True)
        ok = {"synth"} if (work_root / str(n) / "data" / "items.parquet").exists() and "synth" not in stages else set()
        ok |= {st for st in STAGES if st not in stages and (st != "synth") and _output_exists(work_root / str(n), st)}
        for stage in stages:
            if stage in HEAVY and n > args.heavy_max:
                res["skipped"].append(f"{stage} at {n:,} (above --heavy-max {args.heavy_max:,})")
                continue
            missing = [d for d in NEEDS.get(stage, ()) if d not in ok]
            if missing:
                res["skipped"].append(f"{stage} at {n:,} (needs {', '.join(missing)})")
                continue
            r = child(stage, n)
            res["results"].append(r)
            print(json.dumps(r), flush=True)
            if not r.get("error"):
                ok.add(stage)
    for stage in filter(None, args.profile.split(",")):
        done = [r for r in res["results"] if r["stage"] == stage and not r.get("error")]
        if done:
            n = max(r["items"] for r in done)
            prof = child(stage, n, profile=True)
            by = next(r for r in res["results"] if r["stage"] == stage and r["items"] == n)
            by["profile_top_tottime"] = prof.get("profile_top_tottime")
            by["profile_wall_s"] = prof.get("seconds")
    res["wall_s"] = round(time.perf_counter() - t_all, 1)
    res["growth"] = growth(res["results"])
    res["dominant"] = dominant(res["results"], res["sizes"])
    write(res, args, Path(args.out), args.tag)
    if not args.work:
        shutil.rmtree(work_root, ignore_errors=True)


def merge(args) -> None:
    runs = [json.loads(Path(p).read_text()) for p in args.merge]
    cells: dict = {}
    for run in runs:
        for r in run["results"]:
            key = (r["stage"], r["items"])
            if key not in cells or not r.get("error") or cells[key].get("error"):
                cells[key] = {**r, "run": run["tag"]}
    results = [cells[k] for k in sorted(cells, key=lambda k: (k[1], STAGES.index(k[0])))]
    first = runs[0]
    res = {**{k: first[k] for k in ("machine", "events_per_item", "seed", "split", "ranker_variant")},
           "device": first.get("device", "cpu"), "ray": first.get("ray", False), "tag": args.tag,
           "command": " ; ".join(f"[{r['tag']}] {r['command']}" for r in runs),
           "sizes": sorted({n for r in runs for n in r["sizes"]}), "stages": [st for st in STAGES if any(
               k[0] == st for k in cells)], "results": results,
           "skipped": [f"{st} at {n:,}" for st in STAGES for n in sorted({n for r in runs for n in r["sizes"]})
                       if (st, n) not in cells and st != "input_suite"],
           "merged_from": [{"tag": r["tag"], "command": r["command"], "wall_s": r.get("wall_s")} for r in runs],
           "wall_s": round(sum(r.get("wall_s") or 0 for r in runs), 1)}
    res["growth"] = growth(results)
    res["dominant"] = dominant(results, res["sizes"])
    write(res, args, Path(args.out), args.tag)


def write(res: dict, args, out: Path, tag: str) -> None:
    if args.before:
        old = json.loads(Path(args.before).read_text())
        res["before"] = {"source": Path(args.before).name, "command": old["command"], "results": old["results"],
                         "compare": ["histories", "encoder_epoch"]}  # the stages the fixes touched
    if args.notes:
        res["notes"] = Path(args.notes).read_text()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{tag}.md").write_text(to_markdown(res))
    plot(res, out / f"{tag}.png")
    print(to_markdown(res))


def _output_exists(folder: Path, stage: str) -> bool:
    """Whether an earlier run left this stage's output in a kept --work folder (so a --stages subset can run)."""
    files = {"load": "dataset.pkl", "pairs": "pairs_val.npy", "encoder_epoch": "embeddings.npy", "codebook": "codebook",
             "sid_assign": "codes.npy", "histories": "frames.pkl", "ranker_epoch": "ranker.pt"}
    return stage in files and (folder / files[stage]).exists()


if __name__ == "__main__":
    main()
