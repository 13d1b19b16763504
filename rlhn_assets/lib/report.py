"""The comparison report, shaped like the paper's Table 3: rows = eval sets and their average, columns =
base and every variant (stage 1 / stage 2), for the retriever and the reranker, with deltas against default."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

MODEL_ORDER = ("base", "default", "s1_remove", "s1_hn_remove", "s1_rlhn", "s2_remove", "s2_hn_remove", "s2_rlhn")


def build_table(rows: list[tuple[str, str, str, float]]) -> dict:
    """rows = (eval_set, model, stage, ndcg@10) -> {stage: {eval_set|'Avg': {model: value}}}."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for eval_set, model, stage, v in rows:
        table.setdefault(stage, {}).setdefault(eval_set, {})[model] = v
    for stage, by_set in table.items():
        models = {m for d in by_set.values() for m in d}
        sets = sorted(by_set)
        by_set["Avg"] = {m: sum(by_set[s][m] for s in sets) / len(sets) for m in models
                         if all(m in by_set[s] for s in sets)}
    return table


def _fmt(v: float | None, ref: float | None) -> str:
    if v is None:
        return "–"
    s = f"{v:.3f}"
    if ref is not None and v is not ref:
        d = (v - ref) * 100
        s += f" ({d:+.1f})"
    return s


def to_markdown(table: dict, runs: dict[str, dict]) -> str:
    out = []
    for stage in ("retriever", "reranker"):
        if stage not in table:
            continue
        by_set = table[stage]
        models = [m for m in MODEL_ORDER if any(m in by_set[s] for s in by_set)]
        out.append(f"### {stage.capitalize()} nDCG@10 (deltas vs default in points)\n")
        out.append("| eval set | " + " | ".join(models) + " |")
        out.append("|---|" + "|".join("---:" for _ in models) + "|")
        for s in sorted(k for k in by_set if k != "Avg") + ["Avg"]:
            ref = by_set[s].get("default")
            cells = [_fmt(by_set[s].get(m), None if m == "default" else ref) for m in models]
            name = f"**{s}**" if s == "Avg" else s
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    if runs:
        out.append("### Training runs\n")
        out.append("| variant | seed | queries | per dataset | steps | final loss |")
        out.append("|---|---:|---:|---|---:|---:|")
        for v in MODEL_ORDER:
            if v in runs:
                r = runs[v]
                sizes = ", ".join(f"{k} {n}" for k, n in sorted((r.get("training_set_sizes") or {}).items()))
                loss = r.get("final_loss")
                out.append(f"| {v} | {r.get('seed')} | {r.get('queries')} | {sizes} | {r.get('steps')} | "
                           f"{loss:.4f} |" if loss is not None else f"| {v} | {r.get('seed')} | {r.get('queries')} | "
                           f"{sizes} | {r.get('steps')} | – |")
    return "\n".join(out)


def write_csv(table: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "eval_set", "model", "ndcg_at_10", "delta_vs_default"])
        for stage, by_set in table.items():
            for s, d in by_set.items():
                for m in MODEL_ORDER:
                    if m in d:
                        ref = d.get("default")
                        w.writerow([stage, s, m, f"{d[m]:.4f}", "" if ref is None else f"{(d[m] - ref) * 100:.2f}"])


def grouped_bar_png(panels: list[tuple[str, list[str], dict[str, list[float]]]], *, ylabel: str = "",
                    hlines: tuple[tuple[float, str], ...] = (), panel_width: float = 7.0) -> bytes:
    """Grouped bars, one panel per (title, group labels, {series label: one value per group})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 4), squeeze=False)
    for ax, (title, groups, series) in zip(axes[0], panels):
        width = 0.8 / max(len(series), 1)
        for i, (label, values) in enumerate(series.items()):
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=label)
        for y, style in hlines:
            ax.axhline(y, ls=style, c="gray")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(groups))], groups)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7, ncol=2)
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (tight layout, 100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def chart_png(table: dict) -> bytes:
    panels = []
    for stage in (s for s in ("retriever", "reranker") if s in table):
        by_set = table[stage]
        sets = sorted(k for k in by_set if k != "Avg") + ["Avg"]
        models = [m for m in MODEL_ORDER if any(m in by_set[s] for s in sets)]
        panels.append((stage, sets, {m: [by_set[s].get(m, 0) for s in sets] for m in models}))
    return grouped_bar_png(panels, ylabel="nDCG@10")


def png_markdown(png: bytes, alt: str = "nDCG@10 by eval set and model") -> str:
    """A PNG inlined as a data URI: Dagster renders it in markdown metadata."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
