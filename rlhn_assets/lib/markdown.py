"""Small markdown helpers for Dagster metadata and reports."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _cell(v: Any, max_chars: int) -> str:
    if isinstance(v, float):
        s = f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    else:
        s = str(v)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= max_chars else s[: max_chars - 1] + "…"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], max_chars: int = 80) -> str:
    if not rows:
        return "_(none)_"
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(v, max_chars) for v in r) + " |" for r in rows]
    return "\n".join(out)
