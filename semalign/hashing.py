"""The one content-hash helper: stage keys, version names and publish fingerprints are prefixes of a SHA-256 over
their parts. (`models/` keeps its own: it imports only torch, numpy and transformers.)"""
from __future__ import annotations

import hashlib
import json

import numpy as np


def digest(*parts, length: int = 12) -> str:
    """Hex prefix of SHA-256 over `parts`: bytes as they are, arrays as their contiguous bytes, anything else as
    canonical JSON (sorted keys; unknown types by str)."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, (bytes, bytearray, memoryview)):
            h.update(p)
        elif isinstance(p, np.ndarray):
            h.update(np.ascontiguousarray(p).tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:length]
