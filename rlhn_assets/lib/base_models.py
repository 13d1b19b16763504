"""The base models the pipeline fine-tunes and evaluates: which folder, which prompts, and their identity.

A base is named by a local folder or a hub id (``intfloat/e5-base-v2``); empty means the packaged all-MiniLM-L6-v2
(``embeddings.base_model_path()``), the offline default. A hub id is resolved to its snapshot folder in the local
Hugging Face cache (downloaded first when the hub may be used, i.e. ``HF_HUB_OFFLINE`` is not set), so every stage
loads the same files by path and the identity hashes exactly those files.

Prompts (sentence-transformers ``prompts``): the query prompt is prepended to queries, the passage prompt to
passages, at training, mining and evaluation alike. ``None`` keeps the model's own
(``config_sentence_transformers.json``: ``prompts["query"]``; the first non-empty of ``prompts["document"]``,
``"passage"``, ``"corpus"``, the order of ``SentenceTransformer.encode_document``, which would take an empty
``"document"`` that sentence-transformers 6 adds on saving); a string overrides it (``""`` = no prompt).

Identity: the content hash of the folder (``embeddings.dir_hash``: file names + bytes), and for a bi-encoder the
prompts on top of it. Without prompts the identity is the plain content hash, so everything keyed by it before
prompts existed (model store input keys, embedding caches, the mining fingerprint) stays valid for the packaged
model. The folder's name is recorded beside it, not hashed: two folders with the same bytes are the same model.

No torch import here: resolving a base reads JSON files and hashes bytes."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from rlhn_assets.lib.embeddings import base_model_path, dir_hash

PACKAGED_NAME = "all-MiniLM-L6-v2 (packaged)"
# SentenceTransformer.encode_document's order of prompt names for passages
PASSAGE_PROMPT_NAMES = ("document", "passage", "corpus")


@dataclass(frozen=True)
class EncoderBase:
    """One resolved base model."""

    name: str  # what the setting said ("" -> PACKAGED_NAME)
    path: Path  # the local folder every stage loads
    content_hash: str  # dir_hash(path)
    query_prompt: str = ""
    passage_prompt: str = ""
    max_seq_length: int | None = None  # the model's own (sentence_bert_config.json), None if it states none

    @property
    def prompts(self) -> dict[str, str]:
        return {"query": self.query_prompt, "passage": self.passage_prompt}

    @property
    def has_prompts(self) -> bool:
        return bool(self.query_prompt or self.passage_prompt)

    @property
    def identity(self) -> str:
        """What a model trained or encoded from this base depends on: the weights' hash, and the prompts if any."""
        if not self.has_prompts:
            return self.content_hash
        blob = json.dumps({"weights": self.content_hash, "prompts": self.prompts}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def version(self) -> str:
        """The short identity (16 hex digits) used as a data version and in cache keys."""
        return self.identity[:16]

    def without_prompts(self) -> EncoderBase:
        """The same weights as a cross-encoder base: bi-encoder prompts do not apply to (query, passage) pairs."""
        return EncoderBase(self.name, self.path, self.content_hash, "", "", self.max_seq_length)

    def describe(self) -> dict:
        """The record kept with every model trained from this base and with every evaluation of it."""
        return {
            "name": self.name,
            "path": str(self.path),
            "content_hash": self.content_hash,
            "query_prompt": self.query_prompt,
            "passage_prompt": self.passage_prompt,
            "identity": self.identity,
        }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def own_prompts(folder: str | Path) -> tuple[str, str]:
    """(query prompt, passage prompt) that the model folder's config_sentence_transformers.json declares."""
    prompts = _read_json(Path(folder) / "config_sentence_transformers.json").get("prompts") or {}
    query = prompts.get("query") or ""
    passage = next((prompts[n] for n in PASSAGE_PROMPT_NAMES if prompts.get(n)), "")
    return str(query), str(passage)


def own_max_seq_length(folder: str | Path) -> int | None:
    """The model's own token limit: sentence_bert_config.json's ``max_seq_length`` (sentence-transformers < 6), else
    the tokenizer's ``model_max_length`` (where sentence-transformers 6 saves it); None if neither states one."""
    for file, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length")):
        value = _read_json(Path(folder) / file).get(key)
        if isinstance(value, int) and 0 < value < 1_000_000:  # transformers writes a huge int for "no limit"
            return value
    return None


def resolve_folder(name: str) -> Path:
    """The local folder of base ``name``: the packaged model for "", an existing folder as is, else a hub id's
    snapshot in the local Hugging Face cache (fetched first unless HF_HUB_OFFLINE is set)."""
    name = (name or "").strip()
    if not name:
        return base_model_path()
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"base model {name!r}: no such folder")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - not in the cache (any flavour of "not found")
        if offline:
            raise FileNotFoundError(
                f"base model {name!r} is neither a folder nor in the local Hugging Face cache, and HF_HUB_OFFLINE is "
                f"set: run once online (or `huggingface-cli download {name}`), or give a local folder"
            ) from cached_error
    # Online: let sentence-transformers fetch what it needs (not every file of the repository), then use the snapshot.
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(name)  # loaded once for the download, then dropped
    return Path(snapshot_download(name, local_files_only=True))


@functools.lru_cache(maxsize=16)
def _hash(folder: str, _stamp: tuple) -> str:
    return dir_hash(folder)


def content_hash(folder: str | Path) -> str:
    """dir_hash of ``folder``, computed once per process while no file's size or mtime changed."""
    root = Path(folder)
    stamp = tuple(
        (str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in sorted(root.rglob("*"))
        if f.is_file()
    )
    return _hash(str(root), stamp)


def resolve_base(name: str = "", query_prompt: str | None = None, passage_prompt: str | None = None) -> EncoderBase:
    """Resolve a base setting (see the module docstring) to its folder, prompts and identity."""
    folder = resolve_folder(name)
    own_q, own_p = own_prompts(folder)
    return EncoderBase(
        name=(name or "").strip() or PACKAGED_NAME,
        path=folder,
        content_hash=content_hash(folder),
        query_prompt=own_q if query_prompt is None else query_prompt,
        passage_prompt=own_p if passage_prompt is None else passage_prompt,
        max_seq_length=own_max_seq_length(folder),
    )


# The environment variables behind the `base_models` resource's defaults (defs/resources.py) and train_cli's.
ENV = {
    "retriever": "RLHN_RETRIEVER_BASE",  # folder or hub id; unset/empty = the packaged MiniLM
    "reranker": "RLHN_RERANKER_BASE",  # unset/empty = the retriever's base
    "query_prompt": "RLHN_QUERY_PROMPT",  # unset = the model's own; set (even to "") = that prompt
    "passage_prompt": "RLHN_PASSAGE_PROMPT",
    "device": "RLHN_DEVICE",  # auto | cpu | cuda[:N] | mps | xpu
}


def settings_from_env(environ=None) -> dict:
    """The base-model settings the environment asks for (see ENV)."""
    env = os.environ if environ is None else environ
    return {
        "retriever": env.get(ENV["retriever"], "").strip(),
        "reranker": env.get(ENV["reranker"], "").strip(),
        "query_prompt": env.get(ENV["query_prompt"]),
        "passage_prompt": env.get(ENV["passage_prompt"]),
        "device": env.get(ENV["device"], "auto").strip() or "auto",
    }
