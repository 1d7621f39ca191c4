"""CTR ranker with modal-behavior alignment (design section 1.3) and its baselines, in one code path.

Every item has two views:
  behavior view  b = item-ID embedding (shared out-of-vocabulary row for items unseen in training)
  modal view     m = projection of the item's content embedding (+ the alignment block in `full`)
Alignment block: one zero-initialised table per SID level -> concat -> fusion MLP whose last layer is
zero-initialised -> added to the projected content. At step 0 the aligned embedding equals the projected
content; the CTR loss then moves per-code residuals, so a cold item inherits what warm items sharing its
codes taught. Four DIN-style target attentions over the history (modal, modal->behavior,
behavior->modal, behavior) feed a DNN with user features.

Levers of `full`: `cold_behavior="generated"` replaces the shared out-of-vocabulary row of items without an ID row
(unseen, or dropped by item-ID dropout) with a behavior vector generated from their SIDs + content, distilled from
the detached ID rows of items seen in training; `align_levels` / `code_dropout` limit how deep the SID tables read.

Variants (same loop, same budget): full, id_only, content, aligned_content, sid_ngram, logreg; and at a bounded
item table (`id_buckets` rows, several items per row): hashed_id (item IDs hashed into the rows), sid (each item's SID
prefix n-grams hashed into the same rows: no per-item row, no dense vector), and both "+dense" (the aligned vector
beside them, optionally compressed: `content_codec`).
Training (the loop, the CUDA-graph step, DDP helpers) lives beside it in `ranker_training.py`.
Imports only torch and numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("full", "id_only", "content", "aligned_content", "sid_ngram", "logreg",
            "hashed_id", "hashed_id+dense", "sid", "sid+dense")
BOUNDED = ("hashed_id", "hashed_id+dense")     # need id_buckets > 0
SID_ROWS = ("sid", "sid+dense")                # the behavior view is the item's SID n-gram rows


@dataclass
class RankerConfig:
    variant: str = "full"
    d: int = 64
    align_dim: int = 32
    att_hidden: int = 32
    hidden: tuple[int, ...] = (128, 64)
    dropout: float = 0.1
    cross_attention: bool = True       # ablation: False keeps only modal + behavior attention
    align_init: str = "zero"           # ablation: "random"
    keep_raw_content: bool = True      # feed the frozen generic content beside the aligned one (chosen on validation)
    id_dropout: float = 0.1            # share of items seen as cold per training step (chosen on validation)
    cold_behavior: str = "oov"         # behavior view of items without an ID row: "oov" (one shared row) or
                                       # "generated" from SIDs + content, distilled from warm items' ID rows (full)
    distill_weight: float = 1.0        # weight of the generator's distillation loss (relative squared error)
    align_levels: int = 0              # SID levels the alignment block and generator read (0 = all); deep levels
                                       # are nearly one item each, so they memorise like item IDs
    code_dropout: float = 0.0          # per item and step, each level below the first is dropped (with all deeper
                                       # ones) with this probability, so a code must generalise to cold items
    cold_view: float = 0.0             # weight of a second loss on every training event with only the candidate's
                                       # ID hidden (history keeps its IDs): the test condition of a new item, so the
                                       # content/SID path learns to stand in for the ID without costing the warm path
    ngram: bool = False                # full: SID prefix n-gram embeddings added to the behavior view (as in
                                       # sid_ngram), beside the alignment block on the modal view
    ngram_buckets: int = 1 << 16
    id_buckets: int = 0                # rows of the item-ID table (sid: of the n-gram table); 0 = one row per training
                                       # item. >0: every item's ID hashes (seeded by `seed`) into a row, seen or not
    content_codec: str = "float"       # the aligned vector as served: float, int8, pq4/8/16/32 (bytes per item)
    code_vectors: str = "frozen"       # sid: the modal view decodes the item's codes through the codebook's
                                       # centroids (model parameters, no per-item bytes): "frozen", "trained"
                                       # (init from the centroids, moved by the CTR loss) or "off"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024
    max_epochs: int = 10
    patience: int = 2
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown ranker variant '{self.variant}': expected one of {VARIANTS}")
        if self.align_init not in ("zero", "random"):
            raise ValueError("align_init must be 'zero' or 'random'")
        if self.cold_behavior not in ("oov", "generated"):
            raise ValueError("cold_behavior must be 'oov' or 'generated'")
        if self.cold_behavior == "generated" and self.variant != "full":
            raise ValueError("cold_behavior='generated' needs the SIDs and content of variant 'full'")
        if self.ngram and self.variant != "full":
            raise ValueError("ngram=True adds SID n-grams to 'full'; variant 'sid_ngram' is them without the block")
        if self.cold_view < 0:
            raise ValueError("cold_view is a loss weight: expected >= 0")
        if self.id_buckets < 0:
            raise ValueError("id_buckets is a number of rows: expected >= 0 (0 = one row per item)")
        if self.variant in BOUNDED and not self.id_buckets:
            raise ValueError(f"variant '{self.variant}' hashes item IDs into a bounded table: set id_buckets > 0")
        from .compact import CODECS

        if self.code_vectors not in ("frozen", "trained", "off"):
            raise ValueError("code_vectors must be 'frozen', 'trained' or 'off'")
        if self.content_codec not in CODECS:
            raise ValueError(f"content_codec must be one of {CODECS}")

    @property
    def reads_aligned(self) -> bool:
        """Whether the model reads the item's aligned vector (serving must fetch it)."""
        return self.variant in ("full", "aligned_content", "sid_ngram", "hashed_id+dense", "sid+dense")

    @property
    def reads_codes(self) -> bool:
        """Whether the model reads the item's semantic ID."""
        return self.variant in ("full", "sid_ngram", "sid", "sid+dense")

    @property
    def reads_raw(self) -> bool:
        """Whether the model reads the frozen text-tower (or generic content) vector."""
        return self.variant in ("content", "logreg") or (self.keep_raw_content and self.reads_aligned)


@dataclass
class ItemTables:
    """Per-item inputs, row 0 = padding; row i+1 = item index i."""
    id_vocab: np.ndarray            # [n+1] int: row in the ID table, 0 = out of vocabulary
    content: np.ndarray | None      # [n+1, dc] projected-content input (aligned encoder embedding)
    raw: np.ndarray | None          # [n+1, dr] frozen generic tower embedding
    codes: np.ndarray | None        # [n+1, L] semantic IDs
    n_codes: int = 0
    dedup: np.ndarray | None = None  # [n+1] the SID's dedup level (variants that read the full SID)
    code_vectors: np.ndarray | None = None  # [L, K, dz] the codebook's centroids (sid decodes codes with them)
    n_ids: int = field(init=False)

    def __post_init__(self):
        self.n_ids = int(self.id_vocab.max()) + 1


def _at(table: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Rows `idx` of a per-item table; None = the whole table as it is."""
    return table if idx is None else table[idx]


class TargetAttention(nn.Module):
    """DIN attention. The MLP over [q, k, q-k, q*k] is split by linearity: q's share is computed once per
    row and k's share once per catalogue item (`key_table`), so only the q*k share runs per history slot."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.wq = nn.Linear(d, hidden)
        self.wk = nn.Linear(d, hidden, bias=False)
        self.wp = nn.Linear(d, hidden, bias=False)
        self.out = nn.Linear(hidden, 1)

    def forward(self, q, k, v, mask, k_proj=None):
        k_proj = self.wk(k) if k_proj is None else k_proj
        h = self.wq(q).unsqueeze(1) + k_proj + self.wp(q.unsqueeze(1) * k)
        s = self.out(F.gelu(h)).squeeze(-1).masked_fill(~mask, -1e4)
        w = torch.softmax(s, dim=1) * mask  # empty histories give a zero vector
        return torch.bmm(w.unsqueeze(1), v).squeeze(1)


class BehaviorGenerator(nn.Module):
    """Behavior view of an item from its content embedding and its semantic IDs: per-level code tables
    (items sharing codes share behavior) plus a content projection, through a small MLP.
    Shapes: content [..., dc], codes [..., L] -> [..., d]."""

    def __init__(self, content_dim: int, n_codes: int, levels: int, d: int):
        super().__init__()
        self.content = nn.Linear(content_dim, d)
        self.codes = nn.ModuleList(nn.Embedding(n_codes, d) for _ in range(levels))
        for t in self.codes:
            nn.init.normal_(t.weight, std=0.05)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(d, d))

    def forward(self, content: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        h = self.content(content) + sum(t(codes[..., lvl]) for lvl, t in enumerate(self.codes))
        return h + self.out(h)


class Ranker(nn.Module):
    def __init__(self, cfg: RankerConfig, tables: ItemTables, n_user_feats: int):
        super().__init__()
        self.cfg = cfg
        self.aux_loss = None  # set by a training forward that has an auxiliary (distillation) loss
        self.view_rows = "auto"  # "static": no data-dependent shapes in forward (see forward), for CUDA graphs
        v = cfg.variant
        self.register_buffer("id_vocab", torch.as_tensor(tables.id_vocab, dtype=torch.long))
        self.has_ids = v != "logreg"
        self.decodes_codes = v == "sid" and cfg.code_vectors != "off"
        self.has_modal = cfg.reads_aligned or v == "content" or self.decodes_codes
        self.uses_aligned = cfg.reads_aligned
        self.uses_sid_rows = v in SID_ROWS
        self.uses_raw = cfg.reads_raw
        if self.uses_aligned:
            self.register_buffer("content", torch.as_tensor(tables.content, dtype=torch.float32))
            self.proj = nn.Linear(tables.content.shape[1], cfg.d)
        if self.uses_raw:
            self.register_buffer("raw", torch.as_tensor(tables.raw, dtype=torch.float32))
            self.proj_raw = nn.Linear(tables.raw.shape[1], 1 if v == "logreg" else cfg.d)
        if v in ("full", "sid_ngram"):
            self.register_buffer("codes", torch.as_tensor(tables.codes, dtype=torch.long))
            levels = tables.codes.shape[1]
            if v == "full" and cfg.align_levels:
                levels = min(levels, cfg.align_levels)
        if self.uses_sid_rows:
            from .compact import sid_ngram_params

            if tables.codes is None or tables.dedup is None:
                raise ValueError(f"variant '{v}' reads each item's SID and dedup level: the tables hold none")
            self.register_buffer("codes", torch.as_tensor(tables.codes, dtype=torch.long))
            self.register_buffer("dedup", torch.as_tensor(tables.dedup, dtype=torch.long))
            # derived from the seed: not saved with the weights, recomputed by a loaded model
            for name, t in zip(("ngram_mult", "ngram_a", "ngram_b"),
                               sid_ngram_params(tables.codes.shape[1], tables.n_codes, cfg.seed)):
                self.register_buffer(name, t, persistent=False)
        if self.decodes_codes:
            if tables.code_vectors is None:
                raise ValueError("variant 'sid' decodes codes through the codebook's centroids: the tables hold "
                                 "none (code_vectors='off' trains without them)")
            cv = torch.as_tensor(np.asarray(tables.code_vectors, np.float32))
            # parameters (saved with the ranker) whether trained or not: the scorer needs no codebook to score
            self.code_vec = nn.ModuleList(nn.Embedding.from_pretrained(cv[lvl].clone(),
                                                                       freeze=cfg.code_vectors == "frozen")
                                          for lvl in range(cv.shape[0]))
            self.proj_codes = nn.Linear(cv.shape[2], cfg.d)
        if v == "logreg":
            self.user_lin = nn.Linear(n_user_feats, 1)
            return
        # a bounded table has its budget's rows whatever the catalogue; sid with no budget: one row per item
        self.n_id_rows = cfg.id_buckets + 1 if cfg.id_buckets else tables.n_ids
        if tables.n_ids > self.n_id_rows and not self.uses_sid_rows:
            raise ValueError(f"the item tables give ID rows up to {tables.n_ids - 1} but the table has "
                             f"{cfg.id_buckets} (id_buckets): build them with the same configuration")
        self.id_emb = nn.Embedding(self.n_id_rows, cfg.d)
        nn.init.normal_(self.id_emb.weight, std=0.05)
        if v == "full":
            self.align = nn.ModuleList(nn.Embedding(tables.n_codes, cfg.align_dim) for _ in range(levels))
            for t in self.align:
                (nn.init.zeros_ if cfg.align_init == "zero" else lambda w: nn.init.normal_(w, std=0.05))(t.weight)
            self.fusion = nn.Sequential(nn.Linear(levels * cfg.align_dim, cfg.d), nn.GELU(), nn.Linear(cfg.d, cfg.d))
            nn.init.zeros_(self.fusion[-1].weight)
            nn.init.zeros_(self.fusion[-1].bias)
        if v == "full" and cfg.cold_behavior == "generated":
            self.generator = BehaviorGenerator(tables.content.shape[1], tables.n_codes, levels, cfg.d)
        self.uses_ngram = v == "sid_ngram" or (v == "full" and cfg.ngram)
        if self.uses_ngram:
            self.ngram = nn.ModuleList(nn.Embedding(cfg.ngram_buckets, cfg.d) for _ in range(levels))
            for t in self.ngram:
                nn.init.normal_(t.weight, std=0.05)
            self.register_buffer("prefix_mult", torch.as_tensor([tables.n_codes ** i for i in range(levels)]))
        n_att = 1 + (3 if self.has_modal and cfg.cross_attention else (1 if self.has_modal else 0))
        self.att = nn.ModuleList(TargetAttention(cfg.d, cfg.att_hidden) for _ in range(n_att))
        width = n_user_feats + cfg.d * (1 + int(self.has_modal)) + cfg.d * n_att
        layers, w = [], width
        for h in cfg.hidden:
            layers += [nn.Linear(w, h), nn.GELU(), nn.Dropout(cfg.dropout)]
            w = h
        self.dnn = nn.Sequential(*layers, nn.Linear(w, 1))

    # --- item tables: the model's buffers, or per-call tables (serving builds them per request, so concurrent
    # requests share the parameters and never the item rows)
    TABLES = ("id_vocab", "content", "raw", "codes", "dedup")

    def tables(self, given: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """{id_vocab [n], content [n, dc], raw [n, dr], codes [n, L], dedup [n]} for the parts this variant has: `given`
        where it holds them, else the model's buffers. Row 0 is padding."""
        given = given or {}
        return {k: given[k] if k in given else getattr(self, k) for k in self.TABLES if hasattr(self, k)}

    # --- item views
    def modal_view(self, idx: torch.Tensor | None, tab: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Modal view of item rows `idx` (1-based, 0 = padding; None = every row, no gather)."""
        tab = tab or self.tables()
        parts = []
        if self.uses_aligned:
            parts.append(self.proj(_at(tab["content"], idx)))
        if self.uses_raw:
            parts.append(self.proj_raw(_at(tab["raw"], idx)))
        if self.decodes_codes:  # the item's vector as its codes decode it: sum of its per-level centroids
            codes = _at(tab["codes"], idx)
            parts.append(self.proj_codes(sum(t(codes[..., lvl]) for lvl, t in enumerate(self.code_vec))))
        m = sum(parts)
        if self.cfg.variant == "full":
            codes = _at(tab["codes"], idx)
            a = torch.stack([t(codes[..., lvl]) for lvl, t in enumerate(self.align)], -2)  # [..., L, da]
            # drawn per catalogue row, then read at idx: an item is kept or dropped alike in every slot it fills
            keep = self.level_keep((tab["codes"].shape[0], a.shape[-2]), a.device)
            if keep is not None:
                a = a * _at(keep, idx).unsqueeze(-1)
            m = m + self.fusion(a.flatten(-2))
        return m

    def level_keep(self, shape, device) -> torch.Tensor | None:
        """Training-time code dropout: [..., L] 0/1 mask keeping a prefix of the levels (level 0 always)."""
        if not (self.training and self.cfg.code_dropout > 0) or shape[-1] < 2:
            return None
        drop = torch.rand(shape, device=device) < self.cfg.code_dropout
        drop[..., 0] = False
        return (torch.cumsum(drop.int(), -1) == 0).float()

    def behavior_view(self, idx: torch.Tensor | None, dropped: torch.Tensor | None = None,
                      tab: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        tab = tab or self.tables()
        if self.uses_sid_rows:
            from .compact import sid_ngram_rows

            rows = sid_ngram_rows(_at(tab["codes"], idx), _at(tab["dedup"], idx), self.ngram_mult, self.ngram_a,
                                  self.ngram_b, self.n_id_rows - 1)
            if dropped is not None:  # ID dropout drops the full SID's row (nearly one item each: it memorises)
                rows = torch.cat([rows[..., :-1], rows[..., -1:] * ~_at(dropped, idx).unsqueeze(-1)], -1)
            return self.id_emb(rows).sum(-2)
        ids = _at(tab["id_vocab"], idx)
        if dropped is not None:
            ids = ids * ~_at(dropped, idx)
        b = self.id_emb(ids)
        if hasattr(self, "generator"):
            # items without an ID row (unseen, or dropped this step) get a behavior vector generated from their
            # SIDs + content; warm rows teach the generator (distillation against their detached ID rows)
            g = self.generator(_at(tab["content"], idx), _at(tab["codes"], idx)[..., : len(self.generator.codes)])
            if self.training:  # means over warm rows by weights, not by boolean indexing: no host sync per step
                vocab = _at(tab["id_vocab"], idx)
                warm = (vocab > 0).float()
                n_warm = warm.sum().clamp_min(1.0)
                t = self.id_emb(vocab).detach()
                err = (((g - t) ** 2).sum(-1) * warm).sum() / n_warm
                self.aux_loss = err / (((t ** 2).sum(-1) * warm).sum() / n_warm + 1e-8)
            b = torch.where((ids == 0).unsqueeze(-1), g.to(b.dtype), b)
        if self.uses_ngram:
            c = _at(tab["codes"], idx)[..., : len(self.ngram)]
            prefix = torch.cumsum(c * self.prefix_mult, -1) % self.cfg.ngram_buckets
            b = b + sum(t(prefix[..., lvl]) for lvl, t in enumerate(self.ngram))
        return b

    def forward(self, user_feats: torch.Tensor, cand: torch.Tensor, hist: torch.Tensor,
                tables: dict[str, torch.Tensor] | None = None, cold: torch.Tensor | None = None) -> torch.Tensor:
        """pCTR logits. cand [B] and hist [B, H] are item rows (0 = padding) of `tables` (default: the model's
        buffers); user_feats [B, F]. Where `cold` [B] is true the candidate is scored as an item without an ID
        row (the shared OOV row, or the generated behavior view), its history unchanged: how a new item is scored."""
        tab = self.tables(tables)
        if self.cfg.variant == "logreg":
            return (self.proj_raw(tab["raw"][cand]) + self.user_lin(user_feats)).squeeze(-1)
        mask = hist > 0
        n_rows = tab["id_vocab"].shape[0]
        # item-ID dropout, per item and step: a dropped item is seen through the OOV row everywhere in the batch
        dropped = (torch.rand(n_rows, device=cand.device) < self.cfg.id_dropout) \
            if self.training and self.cfg.id_dropout > 0 else None
        # views computed once per row, not per history slot: over the whole table when it is small next to
        # the batch (small catalogues, CPU), else over the rows this batch touches. "static" (a CUDA graph replays
        # fixed shapes, and torch.unique's size is data: a host sync) takes the smaller of the whole table and
        # the batch's slots
        n_slots = cand.numel() + hist.numel()
        if self.view_rows == "static":
            how = "table" if n_rows <= n_slots else "slots"
        else:
            how = "table" if n_rows * 4 <= hist.numel() else "unique"
        if how == "table":
            table_idx = None  # every row, in order: the views need no gather
        elif how == "slots":
            table_idx = torch.cat([cand, hist.reshape(-1)])
        else:
            table_idx, inv = torch.unique(torch.cat([cand, hist.reshape(-1)]), return_inverse=True)

        b_tab = self.behavior_view(table_idx, dropped, tab)
        att_b = self.att[1 if self.has_modal else 0]
        cols = [b_tab]  # every per-row table the batch reads
        if self.has_modal:
            m_tab = self.modal_view(table_idx, tab)
            cols += [m_tab, self.att[0].wk(m_tab)]
            if self.cfg.cross_attention:
                cols += [self.att[2].wk(m_tab), self.att[3].wk(b_tab)]
        cols.append(att_b.wk(b_tab))

        def gather(t):  # per-row table -> (candidate rows [B, w], history rows [B, H, w])
            if how == "table":
                return F.embedding(cand, t), F.embedding(hist, t)
            if how == "slots":
                return t[: len(cand)], t[len(cand):].reshape(*hist.shape, -1)
            return F.embedding(inv[: len(cand)], t), F.embedding(inv[len(cand):].reshape(hist.shape), t)

        if cand.is_cuda:
            # side by side, so one gather (and one sorting embedding backward) serves them all: one each made the
            # embedding backwards over skewed history rows a large share of the GPU step. Not on CPU, where it
            # ran slower
            dt, widths = cols[-1].dtype, [t.shape[-1] for t in cols]  # a Linear's output: autocast's dtype
            at_cand, at_hist = (torch.split(x, widths, -1) for x in gather(torch.cat([t.to(dt) for t in cols], -1)))
        else:
            at_cand, at_hist = zip(*map(gather, cols))
        b_c, b_h = at_cand[0], at_hist[0]
        if cold is not None:
            aux = self.aux_loss  # the distillation loss stays the one over the whole batch's rows
            no_id = self.behavior_view(cand, torch.ones(n_rows, dtype=torch.bool, device=cand.device), tab)
            self.aux_loss = aux
            b_c = torch.where(cold.unsqueeze(-1), no_id.to(b_c.dtype), b_c)
        feats = [user_feats, b_c]
        if self.has_modal:
            m_c, m_h = at_cand[1], at_hist[1]
            feats.append(m_c)
            feats.append(self.att[0](m_c, m_h, m_h, mask, at_hist[2]))              # modal
            if self.cfg.cross_attention:
                feats.append(self.att[2](m_c, m_h, b_h, mask, at_hist[3]))          # modal->behavior
                feats.append(self.att[3](b_c, b_h, m_h, mask, at_hist[4]))          # behavior->modal
        feats.append(att_b(b_c, b_h, b_h, mask, at_hist[-1]))                       # behavior
        return self.dnn(torch.cat(feats, -1)).squeeze(-1)


# ---------------------------------------------------------------- inputs and inference

@dataclass
class Frame:
    """Model inputs of a set of events (numpy); hist holds item rows (item index + 1), 0 = padding."""
    user_feats: np.ndarray
    cand: np.ndarray
    hist: np.ndarray
    label: np.ndarray

    def __len__(self):
        return len(self.label)

    def tensors(self, device):
        return (torch.as_tensor(self.user_feats, dtype=torch.float32, device=device),
                torch.as_tensor(self.cand, dtype=torch.long, device=device),
                torch.as_tensor(self.hist, dtype=torch.long, device=device),
                torch.as_tensor(self.label, dtype=torch.float32, device=device))


@torch.no_grad()
def predict(model: Ranker, frame: Frame, device: str = "cpu", batch: int = 8192) -> np.ndarray:
    model.eval()
    u, c, h, _ = frame.tensors(device)
    out = []
    for s in range(0, len(c), batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda")):
            out.append(torch.sigmoid(model(u[s:s + batch], c[s:s + batch], h[s:s + batch]).float()).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)
