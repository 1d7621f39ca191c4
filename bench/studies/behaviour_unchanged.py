"""Behaviour unchanged by a refactor: the champion's weights, the published SIDs and the scores of fixed requests
of one `semalign run` home, captured under one version of the code and compared with another's.

    # under each version of the code (e.g. PYTHONPATH=<the old code installed with pip --target>):
    semalign run --data D --home H1
    python bench/studies/behaviour_unchanged.py capture --home H1 --data D --out C1
    python bench/studies/behaviour_unchanged.py compare C1 C2      # exit 1 unless identical

Reads only what both versions have (the registry, the ranker folder, the store's public reads), so the same
script captures both sides. Identical means bit for bit: torch.equal on every parameter, equal tables, equal
score arrays."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

N_USERS, N_CANDIDATES = 20, 50
NEW_ITEMS = ["A heist on a night train. Genres: Thriller|Crime",
             "A quiet documentary about beekeepers. Genres: Documentary",
             "Two robots fall in love on a space station. Genres: Sci-Fi|Romance"]


def capture(home: Path, data: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from semalign.config import Settings
    from semalign.data import load_dataset
    from semalign.deploy.registry import CHAMPION, Registry
    from semalign.deploy.scoring import RankerScorer
    from semalign.feature_repo.store import SemanticIdStore, open_store

    s = Settings(home=home)
    out.mkdir(parents=True, exist_ok=True)
    reg = Registry(s)
    mv = reg.version_by_alias(CHAMPION)
    folder = reg.download_ranker(mv, out / "champion")
    weights = load_file(str(folder / "ranker.safetensors"))
    save_file(weights, str(out / "weights.safetensors"))
    ds = load_dataset(data)
    items = ds.items["item_id"].astype(str).tolist()
    version = mv.tags["codebook_version"]
    sids = SemanticIdStore(s).semantic_ids(items, version=version, with_embedding=True)
    sids = sids.assign(embedding=[np.asarray(e, np.float32).tobytes().hex() for e in sids["embedding"]])
    sids.to_parquet(out / "sids.parquet", index=False)
    rng = np.random.default_rng(0)  # fixed requests: the same users and candidates on both sides
    users = ds.interactions["user_id"].astype(str).drop_duplicates().sort_values().head(N_USERS).tolist()
    rows = [(u, str(i)) for u in users for i in rng.choice(sorted(items), N_CANDIDATES, replace=False)]
    scorer = RankerScorer(folder, s)
    scores = scorer.score([u for u, _ in rows], [i for _, i in rows])
    # content the store lacks, encoded on the fly as serving does (nothing written)
    new = pd.DataFrame({"item_id": [f"new-{k}" for k in range(len(NEW_ITEMS))], "text": NEW_ITEMS})
    codes, emb, _ = open_store(s).encode(new, version=version)
    np.savez(out / "scores.npz", users=np.array([u for u, _ in rows]), items=np.array([i for _, i in rows]),
             scores=scores, new_codes=np.asarray(codes), new_embeddings=np.asarray(emb, np.float32))
    meta = {"home": str(home), "champion": str(mv.version), "codebook_version": version,
            "input_key": mv.tags.get("input_key"), "parameters": len(weights),
            "weights_sum": float(sum(float(t.double().sum()) for t in weights.values())),
            "torch": torch.__version__}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def compare(a: Path, b: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "weights.safetensors")), load_file(str(b / "weights.safetensors"))
    weights_equal = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = pd.read_parquet(a / "sids.parquet"), pd.read_parquet(b / "sids.parquet")
    sids_equal = sa.equals(sb)
    za, zb = np.load(a / "scores.npz"), np.load(b / "scores.npz")
    scores_equal = all(np.array_equal(za[k], zb[k]) for k in za.files) and za.files == zb.files
    ma, mb = json.loads((a / "meta.json").read_text()), json.loads((b / "meta.json").read_text())
    res = {"champion_weights_torch_equal": bool(weights_equal), "parameters": len(wa),
           "sids_table_identical": bool(sids_equal), "sid_rows": len(sa),
           "scores_identical": bool(scores_equal), "scored_requests": int(len(za["scores"])),
           "new_items_encoded": int(len(za["new_codes"])),
           "codebook_version": [ma["codebook_version"], mb["codebook_version"]],
           "ranker_input_key": [ma["input_key"], mb["input_key"]],
           "max_abs_score_diff": float(np.abs(za["scores"] - zb["scores"]).max())}
    res["identical"] = weights_equal and sids_equal and scores_equal
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("--home", type=Path, required=True)
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("compare")
    d.add_argument("a", type=Path)
    d.add_argument("b", type=Path)
    args = p.parse_args()
    if args.cmd == "capture":
        print(json.dumps(capture(args.home, args.data, args.out), indent=2))
        return 0
    res = compare(args.a, args.b)
    print(json.dumps(res, indent=2))
    return 0 if res["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
