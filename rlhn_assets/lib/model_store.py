"""A local model store: ``<root>/<kind>/<variant>/<data_version>/`` plus ``latest.json`` per (kind, variant)
pointing at the current version with its training summary. The data version is the saved folder's content hash."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


class ModelStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def staging_dir(self, kind: str, variant: str) -> Path:
        d = self.root / kind / variant / "_staging"
        if d.exists():
            shutil.rmtree(d)
        return d

    def publish(self, kind: str, variant: str, staged: Path, data_version: str, summary: dict) -> Path:
        final = self.root / kind / variant / data_version[:16]
        if final.exists():
            shutil.rmtree(staged)
        else:
            staged.rename(final)
        (self.root / kind / variant / "latest.json").write_text(
            json.dumps({"data_version": data_version, "path": str(final), **summary}, indent=2, default=str) + "\n")
        return final

    def latest(self, kind: str, variant: str) -> dict | None:
        p = self.root / kind / variant / "latest.json"
        return json.loads(p.read_text()) if p.exists() else None
