"""Content fingerprints of a dataset's inputs: the data version of its partition."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from rlhn_assets.registry import Registry

# (path, size, mtime_ns) -> sha256: re-hash a file only when it changed on disk (observations run often).
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _FILE_HASHES[key] = h.hexdigest()
    return _FILE_HASHES[key]


def dataset_fingerprint(registry: Registry, name: str) -> str:
    """sha256 over the registry entry, the bytes of every input file (source files, mining inputs) and, when
    no manual ``keep:`` is set, this dataset's entry in the leave-one-out recommendation (so a changed
    recommendation re-runs only the datasets whose decision changed). A missing file contributes a marker,
    so it shows as a change rather than an error."""
    from rlhn_assets.lib.pruning import RECOMMENDATION_FILE, load_recommendation

    ds = registry.get(name)
    h = hashlib.sha256(json.dumps(asdict(ds), sort_keys=True, default=str).encode())
    if ds.keep is None:
        try:
            rec = load_recommendation(registry.data_dir / RECOMMENDATION_FILE).get("datasets", {}).get(name)
        except ValueError:
            rec = "<unreadable>"  # the pruned stage reports the error itself
        if rec is not None:
            keep = rec.get("keep") if isinstance(rec, dict) else rec
            h.update(f"recommendation:{keep}".encode())
    paths = [f.path for f in ds.files]
    if ds.mine:
        paths += [ds.mine.corpus, ds.mine.queries, ds.mine.qrels]
    for rel in paths:
        p = registry.resolve(rel)
        h.update(rel.encode())
        h.update(file_sha256(p).encode() if p.exists() else b"<missing>")
    return h.hexdigest()[:16]
