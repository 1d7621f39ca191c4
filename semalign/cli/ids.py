"""Semantic IDs in the feature store: `semalign ids publish`, `semalign ids get`, `semalign items add`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from semalign.cli.common import DataOpt, HomeOpt, JsonOpt, emit, load_settings, print_summary
from semalign.errors import DataValidationError, InvalidInputError, NotFoundError


def ids_publish(home: Optional[Path] = HomeOpt, data: Optional[Path] = DataOpt, as_json: bool = JsonOpt,
                version: Optional[str] = typer.Option(None, "--version", help="Codebook version (default: the latest built)."),
                current: bool = typer.Option(True, help="Make it the version unpinned readers get.")):
    """Publish a built codebook version's SIDs, aligned vectors and (with --data, or SEMALIGN_DATA) the items'
    text-tower vectors, which the default ranker reads, to the feature store (offline + online)."""
    from semalign.flows.semantic_ids import publish_version

    s = load_settings(home, data, write=True)
    emit({"publish": publish_version(s, version, s.data, make_current=current)}, as_json, print_summary)


def ids_get(items: list[str] = typer.Argument(..., help="Item ids."), home: Optional[Path] = HomeOpt,
            as_json: bool = JsonOpt,
            version: Optional[str] = typer.Option(None, "--version", help="Pinned codebook version (default: current)."),
            embedding: bool = typer.Option(False, help="Also return the aligned vector.")):
    """Read items' semantic IDs from the online store."""
    # the online store's rows read directly (sqlite or Redis, in Feast's layout): the same answer as Feast's
    # get_online_features without importing Feast and the training stack it pulls in
    from semalign.feature_repo.direct import semantic_id_records

    s = load_settings(home, None)
    emit({"items": semantic_id_records(s, items, version=version, with_embedding=embedding)}, as_json, _print_sids)


def ids_items(sid: str = typer.Argument(..., help="A SID prefix: '12', '12-5', ... or a full SID with its dedup level."),
              home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
              version: Optional[str] = typer.Option(None, "--version", help="Codebook version (default: current)."),
              limit: int = typer.Option(1000, min=1, help="At most this many items.")):
    """Reverse lookup: the items whose semantic ID starts with SID (published and onboarded ones)."""
    from semalign.feature_repo.store import SemanticIdStore

    s = load_settings(home, None)
    df = SemanticIdStore(s).items_by_sid(sid, version=version, limit=limit)
    emit({"sid": sid, "codebook_version": df["codebook_version"].iloc[0] if len(df) else version,
          "count": len(df), "items": df.to_dict("records")}, as_json, _print_items)


def ids_similar(item: str = typer.Argument(..., help="An item the version holds, or a new item's id with --text."),
                home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
                text: Optional[str] = typer.Option(None, "--text", help="A brand-new item's text: encoded on the fly "
                                                   "with the version's encoder (nothing is written)."),
                image: Optional[Path] = typer.Option(None, "--image", help="With --text: the new item's image."),
                version: Optional[str] = typer.Option(None, "--version", help="Codebook version (default: current)."),
                k: int = typer.Option(10, "--k", min=1, max=1000, help="How many neighbours.")):
    """Items similar to ITEM: nearest by cosine of the behavior-aligned vector its SID was assigned from, among
    every item the version holds (exact search over the online store's vectors), with their SIDs."""
    import numpy as np
    import pandas as pd

    s = load_settings(home, None)
    if text is not None:
        from semalign.feature_repo.store import open_store

        store = open_store(s)
        row = {"item_id": item, "text": text}
        if image is not None:
            if not image.is_file():
                raise NotFoundError(f"--image {image}: no such file")
            row["image_path"] = str(image.resolve())
        codes, emb, _ = store.encode(pd.DataFrame([row]), version=version)
        sid = "-".join(map(str, codes[0].tolist()))
        source = "encoded"
    else:
        from semalign.feature_repo.store import SemanticIdStore

        if image is not None:
            raise InvalidInputError("--image needs --text (a new item's content)")
        store = SemanticIdStore(s)
        got = store.semantic_ids([item], version=version, with_embedding=True)
        emb = np.stack(got["embedding"].to_numpy())
        sid = "-".join(str(int(got[c].iloc[0])) for c in got.columns if c.startswith("sid_"))
        source = "store"
    index = store.vector_index(version)
    found = store.similar(index, emb, k=k, exclude=[item])[0]
    from semalign.models.sids import first_level_chance

    emit({"item_id": item, "codebook_version": index["version"], "query": source,
          "sid": sid, "searched_items": len(index["item_ids"]),
          "shares_first_level": round(float(found["shares_first_level"].mean()), 4) if len(found) else None,
          "first_level_chance": round(first_level_chance(index["codes"]), 4),
          "neighbours": [{**r, "score": round(float(r["score"]), 5), "shares_first_level": bool(r["shares_first_level"])}
                         for r in found.to_dict("records")]}, as_json, _print_similar)


def _print_similar(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("item_id", "cosine", "semantic id", title=(
        f"{len(res['neighbours'])} items nearest {res['item_id']} (SID {res['sid']}, {res['query']}) among "
        f"{res['searched_items']} of {res['codebook_version']}; share its first level: {res['shares_first_level']} "
        f"(chance {res['first_level_chance']})"))
    for r in res["neighbours"]:
        t.add_row(r["item_id"], f"{r['score']:.4f}", r["sid"] + (" *" if r["shares_first_level"] else ""))
    Console().print(t)


def _print_items(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("item_id", "semantic id", "source", title=f"{res['count']} item(s) under SID {res['sid']}")
    for r in res["items"]:
        t.add_row(r["item_id"], r["sid"], r["source"])
    Console().print(t)


def ids_diff(old: str = typer.Argument(..., help="The older codebook version."),
             new: str = typer.Argument(..., help="The newer codebook version."),
             home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
             out: Optional[Path] = typer.Option(None, "--out", help="Write the translation table (item_id, old_sid, "
                                                "new_sid) to this .csv or .parquet file.")):
    """SID translation between two published codebook versions: churn per level, and the table old SID -> new
    SID for every item both hold (also written at every publish as diff-<parent>.* in the codebook folder)."""
    from semalign.feature_repo.store import SemanticIdStore

    if out is not None and out.suffix.lower() not in (".csv", ".parquet"):
        raise InvalidInputError(f"--out {out}: expected a .csv or .parquet file")
    s = load_settings(home, None)
    summary, table = SemanticIdStore(s).diff(old, new)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix.lower() == ".csv":
            table.to_csv(out, index=False)
        else:
            table.to_parquet(out, index=False)
        summary["table"] = str(out)
    res = dict(summary, moved=table[table["old_sid"] != table["new_sid"]].head(20).to_dict("records"))
    emit(res, as_json, lambda r: print_summary({"diff": {k: v for k, v in r.items() if k != "moved"}}))


def ids_bundle(out: Path = typer.Option(..., "--out", help="Folder to write the bundle to (replaced if it exists)."),
               home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
               version: Optional[str] = typer.Option(None, "--version", help="Codebook version (default: current).")):
    """Export the SID tokenizer bundle of a codebook version: encoder (torch.export), codebook and item -> SID
    table in one folder that a Python with only torch and numpy loads (sid_tokenizer.py inside it)."""
    from semalign.flows.sid_bundle import export_sid_bundle

    s = load_settings(home, None)
    emit(export_sid_bundle(s, version, out), as_json, lambda r: print_summary({"bundle": r}))


def _print_sids(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table("item_id", "codebook_version", "semantic id")
    for r in res["items"]:
        codes = [str(v) for k, v in r.items() if k.startswith("sid_")]
        t.add_row(r["item_id"], r["codebook_version"], "-".join(codes))
    Console().print(t)


def items_add(file: Path = typer.Argument(..., help="csv, parquet or jsonl with item_id, text[, image_path]."),
              home: Optional[Path] = HomeOpt, as_json: bool = JsonOpt,
              version: Optional[str] = typer.Option(None, "--version", help="Pinned codebook version (default: current).")):
    """Onboard new items: content -> encoder -> SID with the pinned codebook -> online + offline store."""
    import time

    from semalign.feature_repo.store import open_store

    s = load_settings(home, None, write=True)
    items = read_items(file)
    t0 = time.perf_counter()
    out = open_store(s).onboard(items, version=version)
    res = {"items": out.to_dict("records"), "onboarded": int(out["onboarded"].sum()),
           "already_present": int((~out["onboarded"]).sum()), "wall_s": round(time.perf_counter() - t0, 3)}
    emit(res, as_json, lambda r: print_summary({"onboarding": {k: v for k, v in r.items() if k != "items"}}))


def read_items(file: Path):
    """New items from a csv, parquet or jsonl file with item_id, text[, image_path] (paths relative to the file)."""
    import pandas as pd

    if not file.exists():
        raise NotFoundError(f"{file}: no such file")
    suffix = file.suffix.lower()
    if suffix == ".csv":  # as the data contract reads tables: "NA" or "null" is an id, an empty field is missing
        items = pd.read_csv(file, dtype=str, keep_default_na=False, na_values=[""])
    elif suffix == ".parquet":
        items = pd.read_parquet(file)
    elif suffix in (".jsonl", ".json"):
        items = pd.read_json(file, lines=suffix == ".jsonl", dtype={"item_id": str})
    else:
        raise DataValidationError(file, None, None, f"a .csv, .parquet or .jsonl file, got '{suffix}'")
    missing = [c for c in ("item_id", "text") if c not in items.columns]
    if missing:
        raise DataValidationError(file, None, missing[0], f"columns item_id, text[, image_path]; missing {missing}")
    if "image_path" in items:  # relative to the file, and inside its folder (no symlink escapes)
        from semalign.data import image_inside

        root = file.parent.resolve()
        paths = []
        for row, p in enumerate(items["image_path"], 1):
            path = image_inside(root, p) if isinstance(p, str) and p.strip() else None
            if isinstance(p, str) and p.strip() and path is None:
                raise DataValidationError(file, row, "image_path", f"a path inside {root}; got '{p}'")
            paths.append(path)
        items["image_path"] = paths
    return items
