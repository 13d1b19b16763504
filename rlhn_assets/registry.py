"""The one registry of source datasets (`data/datasets.yaml`).

Each entry is one partition of every per-dataset asset. Adding a dataset = drop its file(s) in
`data/raw/<name>/` and add one entry to the YAML file. Paths are relative to the data directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rlhn_assets import settings

Format = Literal["auto", "tevatron", "bge"]
FORMATS = ("auto", "tevatron", "bge")
# Multi-partition keys may not contain these (Dagster restriction); keep names simple.
_FORBIDDEN = set("|,[]/ ")


class RegistryError(ValueError):
    """The registry file is malformed; the message names the file and the entry."""


@dataclass(frozen=True)
class SourceFile:
    path: str  # relative to the data directory
    format: Format = "auto"


@dataclass(frozen=True)
class MiningSpec:
    """Mine hard negatives for a dataset that has queries + positives + a corpus, but no negatives.

    The corpus/queries/qrels are in BEIR layout; the output is a Tevatron JSONL.gz that `raw_bge`
    then ingests like any other file."""

    corpus: str
    queries: str
    qrels: str
    output: str
    method: Literal["dense", "bm25"] = "dense"
    range_min: int = 0  # first rank (0-based, after removing positives) a negative may come from
    range_max: int = 30  # exclusive end of the rank window
    num_negatives: int = 15
    sampling: Literal["top", "random"] = "top"
    relative_margin: float | None = None  # drop candidates scoring >= (1 - m) * positive score
    seed: int = 13
    batch_size: int = 64


@dataclass(frozen=True)
class SourceDataset:
    name: str
    files: tuple[SourceFile, ...]
    # Manual pruning decision: True keep, False prune, None follow the leave-one-out recommendation.
    keep: bool | None = None
    judge: bool = True  # False: never judged / relabeled (ArguAna in the paper)
    prompt: str = "default"  # judge prompt family: "default" or "scidocsrr"
    max_quarantine_rate: float = 0.05
    mine: MiningSpec | None = None
    description: str = ""
    licence: str = ""
    # Eval sets (folders under data/eval/) this dataset is the in-domain training set for; the leave-one-out
    # pruning rule never prunes a dataset whose removal hurts them. Absent: the eval set of the same name.
    in_domain_eval: tuple[str, ...] = ()


@dataclass(frozen=True)
class Registry:
    path: Path
    data_dir: Path
    datasets: tuple[SourceDataset, ...] = field(default_factory=tuple)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.datasets]

    def get(self, name: str) -> SourceDataset:
        for d in self.datasets:
            if d.name == name:
                return d
        raise RegistryError(f"{self.path}: no dataset named {name!r} (known: {', '.join(self.names)})")

    def resolve(self, relative: str) -> Path:
        return (self.data_dir / relative).resolve()


def _parse_entry(path: Path, name: str, raw: dict) -> SourceDataset:
    where = f"{path}: dataset {name!r}"
    if not name or _FORBIDDEN & set(name):
        raise RegistryError(f"{where}: the name may not be empty or contain any of {sorted(_FORBIDDEN)}")
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = set(raw) - {
        "files",
        "keep",
        "judge",
        "prompt",
        "max_quarantine_rate",
        "mine",
        "description",
        "licence",
        "in_domain_eval",
    }
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)}")
    files = []
    for i, f in enumerate(raw.get("files") or []):
        if isinstance(f, str):
            f = {"path": f}
        if not isinstance(f, dict) or "path" not in f:
            raise RegistryError(f"{where}: files[{i}] needs a 'path'")
        fmt = f.get("format", "auto")
        if fmt not in FORMATS:
            raise RegistryError(f"{where}: files[{i}] format {fmt!r} is not one of {FORMATS}")
        files.append(SourceFile(path=str(f["path"]), format=fmt))
    if not files:
        raise RegistryError(f"{where}: lists no files")
    keep = raw.get("keep")
    if keep not in (None, True, False):
        raise RegistryError(f"{where}: keep must be true, false or absent (follow the recommendation)")
    mine = None
    if raw.get("mine") is not None:
        try:
            mine = MiningSpec(**raw["mine"])
        except TypeError as e:
            raise RegistryError(f"{where}: bad 'mine' section: {e}") from e
        if not 0 <= mine.range_min < mine.range_max:
            raise RegistryError(f"{where}: mine.range_min must be >= 0 and < range_max")
        if mine.method not in ("dense", "bm25") or mine.sampling not in ("top", "random"):
            raise RegistryError(f"{where}: mine.method must be dense|bm25 and sampling top|random")
    in_domain = raw.get("in_domain_eval") or []
    if isinstance(in_domain, str):
        in_domain = [in_domain]
    if not isinstance(in_domain, list) or not all(isinstance(x, str) and x for x in in_domain):
        raise RegistryError(f"{where}: in_domain_eval must be an eval set name or a list of them")
    prompt = raw.get("prompt", "default")
    if prompt not in ("default", "scidocsrr"):
        raise RegistryError(f"{where}: prompt must be 'default' or 'scidocsrr'")
    return SourceDataset(
        name=name,
        files=tuple(files),
        keep=keep,
        judge=bool(raw.get("judge", True)),
        prompt=prompt,
        max_quarantine_rate=float(raw.get("max_quarantine_rate", 0.05)),
        mine=mine,
        description=str(raw.get("description", "")),
        licence=str(raw.get("licence", "")),
        in_domain_eval=tuple(in_domain),
    )


def load_registry(path: Path | None = None, data_dir: Path | None = None) -> Registry:
    path = Path(path or settings.registry_path())
    data_dir = Path(data_dir or path.parent)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RegistryError(f"{path}: registry file not found") from e
    except yaml.YAMLError as e:
        raise RegistryError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), dict):
        raise RegistryError(f"{path}: expected a top-level 'datasets:' mapping")
    datasets = tuple(_parse_entry(path, str(k), v) for k, v in doc["datasets"].items())
    return Registry(path=path, data_dir=data_dir, datasets=datasets)
