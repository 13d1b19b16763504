"""A local model store, one folder per trained model:

    <root>/<kind>/<variant>/seed-<seed>/<data_version[:16]>/        the saved model (data version = content hash)
    <root>/<kind>/<variant>/seed-<seed>/inputs/<input_key[:24]>.json  what produced it (input key -> that folder)

The seed is part of a model's identity (two seeds of one variant are two models). The **input key** is a hash of
everything training consumes — the training instances' texts in order, the training settings (seed included), the
base model's content hash and the training code version — so a run that asks for a model already trained from the
same inputs reuses it instead of training again: an interrupted experiment resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

# Bump when the training recipe changes in a way the settings do not show (loss wiring, row building): it is part
# of every input key, so models trained by older code are not reused.
TRAINING_CODE_VERSION = "1"


def input_key(kind: str, settings: dict, base_model_version: str, instances: Iterable) -> str:
    """sha256 over the training inputs of one model (``instances``: TrainingInstance-like, with ``query``,
    ``positives``, ``negatives``)."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"kind": kind, "settings": settings, "base_model": base_model_version, "code": TRAINING_CODE_VERSION},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for inst in instances:
        h.update(b"\x00Q" + inst.query.encode("utf-8", errors="replace"))
        for p in inst.positives:
            h.update(b"\x00P" + p.encode("utf-8", errors="replace"))
        for n in inst.negatives:
            h.update(b"\x00N" + n.encode("utf-8", errors="replace"))
    return h.hexdigest()


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _seed_dir(self, kind: str, variant: str, seed: int) -> Path:
        return self.root / kind / variant / f"seed-{int(seed)}"

    def staging_dir(self, kind: str, variant: str, seed: int) -> Path:
        d = self._seed_dir(kind, variant, seed) / "_staging"
        if d.exists():
            shutil.rmtree(d)
        return d

    def publish(
        self, kind: str, variant: str, seed: int, staged: Path, data_version: str, key: str, summary: dict
    ) -> Path:
        """Move ``staged`` to its content-addressed folder and record ``key`` -> it; returns the folder."""
        seed_dir = self._seed_dir(kind, variant, seed)
        final = seed_dir / data_version[:16]
        if final.exists():
            shutil.rmtree(staged)
        else:
            staged.rename(final)
        record = {"data_version": data_version, "path": str(final), "input_key": key, **summary}
        inputs = seed_dir / "inputs"
        inputs.mkdir(parents=True, exist_ok=True)
        tmp = inputs / f".{key[:24]}.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        tmp.replace(inputs / f"{key[:24]}.json")  # atomic: a killed run never leaves half a record
        return final

    def find(self, kind: str, variant: str, seed: int, key: str) -> dict | None:
        """The record of the model trained from ``key``'s inputs, if it and its folder still exist."""
        p = self._seed_dir(kind, variant, seed) / "inputs" / f"{key[:24]}.json"
        if not p.exists():
            return None
        record = json.loads(p.read_text())
        if record.get("input_key") != key or not Path(record["path"]).is_dir():
            return None
        return record
