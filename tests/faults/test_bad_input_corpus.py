"""The bad-input corpus: malformed datasets, images and model/codebook files, each with the error a user gets.
Every dataset case must name the file, the row (1-based data row) and the column; every file case must refuse
to load (naming the file) and never unpickle anything. Store and API inputs have their own tables in
test_feature_store.py and test_serve.py."""
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from semalign.data import MAX_TEXT_CHARS, DataValidationError, load_dataset

ITEMS = "item_id,text\na,first item\nb,second item\n"
EVENTS = "user_id,item_id,timestamp,label\nu1,a,1000,1\nu1,b,2000,0\n"
FUTURE = int(pd.Timestamp.now(tz="UTC").timestamp()) + 10 * 86400

# (case, items.csv, interactions.csv, file, row, column, words in the message)
DATASET_CASES = [
    ("label of the wrong type", ITEMS, "user_id,item_id,timestamp,label\nu1,a,1000,yes\n",
     "interactions.csv", 1, "label", "0 or 1"),
    ("label out of range", ITEMS, "user_id,item_id,timestamp,label\nu1,a,1000,1\nu1,b,2000,2\n",
     "interactions.csv", 2, "label", "0 or 1"),
    ("NaN timestamp", ITEMS, "user_id,item_id,timestamp,label\nu1,a,1000,1\nu1,b,NaN,0\n",
     "interactions.csv", 2, "timestamp", "UTC timestamp"),
    ("negative timestamp", ITEMS, "user_id,item_id,timestamp,label\nu1,a,-5,1\nu1,b,2000,0\n",
     "interactions.csv", 1, "timestamp", "1970-01-01"),
    ("future timestamp", ITEMS, f"user_id,item_id,timestamp,label\nu1,a,1000,1\nu1,b,{FUTURE},0\n",
     "interactions.csv", 2, "timestamp", "not in the future"),
    ("unparseable timestamp", ITEMS, "user_id,item_id,timestamp,label\nu1,a,last tuesday,1\n",
     "interactions.csv", 1, "timestamp", "UTC timestamp"),
    ("unknown item id", ITEMS, "user_id,item_id,timestamp,label\nu1,a,1000,1\nu1,zz,2000,0\n",
     "interactions.csv", 2, "item_id", "present in the items file"),
    ("missing user id", ITEMS, "user_id,item_id,timestamp,label\nu1,a,1000,1\n,b,2000,0\n",
     "interactions.csv", 2, "user_id", "non-empty id"),
    ("duplicate event rows", ITEMS, "user_id,item_id,timestamp,label\nu1,a,1000,1\nu1,b,2000,0\nu1,b,2000,0\n",
     "interactions.csv", 3, "timestamp", "one event per"),
    ("duplicate item rows", "item_id,text\na,one\nb,two\na,again\n", EVENTS, "items.csv", 3, "item_id", "unique ids"),
    ("empty text", "item_id,text\na,one\nb,   \n", EVENTS, "items.csv", 2, "text", "non-empty item text"),
    ("huge text", "item_id,text\na,one\nb," + "x" * (MAX_TEXT_CHARS + 1) + "\n", EVENTS,
     "items.csv", 2, "text", "at most"),
    ("missing column", "item_id,title\na,one\n", EVENTS, "items.csv", None, "text", "a column 'text'"),
    # without label or rating every row is a positive (negatives are sampled), validated the same way
    ("implicit log, bad timestamp", ITEMS, "user_id,item_id,timestamp\nu1,a,1000\nu1,b,soon\n", "interactions.csv", 2,
     "timestamp", "a UTC timestamp"),
    ("item id with a NUL", "item_id,text\na,one\nb\x00c,two\n", EVENTS, "items.csv", 2, "item_id",
     "without NUL bytes"),
    ("item id over 256 characters", "item_id,text\na,one\n" + "b" * 257 + ",two\n", EVENTS, "items.csv", 2,
     "item_id", "at most 256 characters"),
    ("user id with a control character", ITEMS, "user_id,item_id,timestamp,label\nu1,a,1000,1\nu\x1b2,b,2000,0\n",
     "interactions.csv", 2, "user_id", "without control characters"),
    ("duplicated header", "item_id,text,text\na,one,x\n", EVENTS, "items.csv", 1, "text", "unique column names"),
    ("infinite rating", ITEMS, "user_id,item_id,timestamp,rating\nu1,a,1000,4\nu1,b,2000,inf\n",
     "interactions.csv", 2, "rating", "a finite number"),
    ("unparseable available_at", "item_id,text,available_at\na,one,2020-01-01\nb,two,someday\n", EVENTS,
     "items.csv", 2, "available_at", "a date"),
]


@pytest.mark.parametrize("case,items,events,file,row,column,words", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_dataset_corpus(tmp_path, case, items, events, file, row, column, words):
    (tmp_path / "items.csv").write_text(items)
    (tmp_path / "interactions.csv").write_text(events)
    with pytest.raises(DataValidationError) as e:
        load_dataset(tmp_path)
    err = e.value
    assert err.file.endswith(file) and err.row == row and err.column == column, str(err)
    assert words in str(err) and file in str(err)


def test_non_utf8_and_binary_tables(tmp_path):
    (tmp_path / "items.csv").write_bytes(b"item_id,text\na,caf\xe9 \xff\xfe\n")
    (tmp_path / "interactions.csv").write_text(EVENTS.replace(",b,", ",a,"))
    with pytest.raises(DataValidationError, match=r"items\.csv.*UTF-8"):
        load_dataset(tmp_path)
    (tmp_path / "items.csv").write_text(ITEMS)
    (tmp_path / "interactions.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "interactions.csv").unlink()
    with pytest.raises(DataValidationError, match=r"interactions\.parquet.*readable parquet"):
        load_dataset(tmp_path)


def test_parquet_with_wrong_column_types(tmp_path):
    pd.DataFrame({"item_id": [1, 2], "text": ["one", "two"]}).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame({"user_id": ["u1", "u1"], "item_id": [1, 2], "timestamp": [1000.0, 2000.0],
                  "label": [0.5, 1.0]}).to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(DataValidationError) as e:
        load_dataset(tmp_path)
    assert e.value.row == 1 and e.value.column == "label"   # integer ids and float seconds are fine, 0.5 is not


def _png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a tiny (truncated) image body."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_corrupt_and_giant_images_are_skipped_and_counted(tmp_path, movielens):
    """Images are optional content: an unreadable one costs the item its image, is counted in the dataset
    report, and never fails the batch or gets decoded when it claims billions of pixels."""
    from semalign.models.towers import ImageTower

    good = next(p for p in movielens.items["image_path"] if p)
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "giant.png").write_bytes(_png(60_000, 60_000))
    (tmp_path / "empty.jpg").write_bytes(b"")
    tower = ImageTower()
    feats, ok = tower.encode([good, str(tmp_path / "corrupt.jpg"), str(tmp_path / "giant.png"),
                              str(tmp_path / "empty.jpg")])
    assert ok.tolist() == [True, False, False, False]
    assert np.abs(feats[0]).sum() > 0 and not feats[1:].any()


def _tiny_codebook(folder: Path):
    from semalign.models.codebook import build_codebook

    x = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    cb = build_codebook(x, levels=2, codes=4, iters=3, data_hash="corpus")
    cb.save(folder)
    return cb


class _Payload:
    """Unpickling this creates a marker file: proof that a loader executed code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bomb(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps(_Payload(marker)))


def test_tampered_codebook_files_are_refused(tmp_path):
    from semalign.models.codebook import Codebook

    folder = tmp_path / "cb"
    _tiny_codebook(folder)
    w = folder / "codebook.safetensors"
    original = w.read_bytes()
    w.write_bytes(original[:-4] + bytes(b ^ 0xFF for b in original[-4:]))        # one flipped word
    with pytest.raises(ValueError, match="checksum mismatch"):
        Codebook.load(folder)
    w.write_bytes(original)
    meta = json.loads((folder / "codebook.json").read_text())
    (folder / "codebook.json").write_text(json.dumps({**meta, "levels": 1}))     # metadata edited by hand
    with pytest.raises(ValueError, match="refusing to load"):
        Codebook.load(folder)
    (folder / "codebook.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Codebook.load(folder)
    (folder / "codebook.json").write_text(json.dumps(meta))
    marker = tmp_path / "executed"
    _pickle_bomb(w, marker)                                                     # weights swapped for a pickle
    with pytest.raises(ValueError, match="checksum mismatch"):
        Codebook.load(folder)
    assert not marker.exists()


def test_model_files_never_unpickle(tmp_path, movielens):
    """Encoder and ranker weights are safetensors: a pickle (or garbage) in their place is refused by name,
    and the code inside never runs."""
    from semalign.models.encoder import EncoderConfig, FusionEncoder, load_encoder, save_encoder

    marker = tmp_path / "executed"
    enc = tmp_path / "enc"
    save_encoder(FusionEncoder(EncoderConfig(text_dim=8, image_dim=0, out_dim=4, hidden=8)), enc, {"version": "e"})
    load_encoder(enc)
    _pickle_bomb(enc / "encoder.safetensors", marker)
    with pytest.raises(ValueError, match=r"enc: not a loadable encoder"):
        load_encoder(enc)
    (enc / "encoder.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a loadable encoder"):
        load_encoder(enc)
    assert not marker.exists()

    # a cached tower feature file holding pickled objects is not read
    from semalign.models.towers import FeatureCache

    def compute(missing):
        return np.ones((len(missing), 4), np.float32), np.ones(len(missing), bool)

    FeatureCache(tmp_path / "cache", "text-x").get_or_compute(["k1"], compute)
    vectors = tmp_path / "cache" / "text-x" / "vectors.npy"
    np.save(vectors, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="damaged feature cache"):
        FeatureCache(tmp_path / "cache", "text-x").get_or_compute(["k1"], compute)
    assert not marker.exists()


def test_ranker_weights_tampered(tmp_path, refreshed):
    import shutil

    from semalign.deploy.scoring import RankerScorer

    src = next((refreshed["home"] / "rankers").glob("rk-*"))
    folder = tmp_path / "rk"
    shutil.copytree(src, folder)
    marker = tmp_path / "executed"
    _pickle_bomb(folder / "ranker.safetensors", marker)
    with pytest.raises(ValueError, match=r"ranker\.safetensors: not a readable safetensors file"):
        RankerScorer(folder, store=object())
    assert not marker.exists()
