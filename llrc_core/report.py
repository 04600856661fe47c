"""The outputs of a comparison grid (``compare.py``): its rows gathered into a tidy table
(``results.csv`` / ``results.json``) and two plotly HTML figures, ``ppl_vs_ratio.html`` and
``ranks_heatmap.html``, built with ``figures.py`` like the app's Compare page. Causal LMs are
plotted by perplexity (log axis), an encoder (MiniLM) by embedding fidelity."""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_json, atomic_write

COLUMNS = ["method", "decomposition", "selection", "scope", "target_ratio",
           "achieved_ratio_linear", "achieved_ratio_model", "ppl", "fidelity", "seconds",
           "decompose_seconds", "eval_seconds", "dense_layers", "ranks", "error",
           "eval_seq_len", "eval_windows"]


def tidy(rows: list[dict]):
    import pandas as pd
    df = pd.DataFrame(rows)
    extra = sorted(c for c in df.columns if c.startswith("acc_"))
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    return df[COLUMNS[:8] + extra + COLUMNS[8:]]


def write_results(df, rows: list[dict], out: Path) -> None:
    out = Path(out)
    csv_df = df.copy()
    csv_df["ranks"] = [json.dumps(r) if isinstance(r, dict) else "" for r in csv_df["ranks"]]
    atomic_write(out / "results.csv", lambda tmp: csv_df.to_csv(tmp, index=False))
    atomic_json(out / "results.json", [{k: v for k, v in r.items()
                                        if k not in ("fingerprint", "select_fingerprint", "plan")}
                                       for r in rows])
    write_figures(df, rows, out)


def _label(r) -> str:
    sel = "" if r["selection"] in ("top-k", "-") else f" {r['selection']}"
    return f"{r['method']}{sel} ({r['decomposition']})"


def build_figures(df, rows: list[dict]):
    """The metric against the target ratio (a line per method, the dense model dotted) and the
    kept ranks (a methods x layers heatmap per ratio), with ``figures.py``."""
    from . import figures
    metric = "ppl" if df["ppl"].notna().any() else "fidelity"
    ok = df[df["error"].isna() & (df["method"] != "dense") & df[metric].notna()]
    pts = [{"label": _label(r), "ratio": float(r["target_ratio"]), metric: float(r[metric])}
           for _, r in ok.iterrows()]
    dense = df[df["method"] == "dense"][metric].dropna()
    scope = df["scope"].dropna().iloc[0] if df["scope"].notna().any() else "linear"
    fig = figures.ppl_vs_ratio(sorted(pts, key=lambda p: p["label"]), scope,
                               float(dense.iloc[0]) if len(dense) else None, metric=metric)

    good = [r for r in rows if not r.get("error") and isinstance(r.get("ranks"), dict)]
    by_ratio = {ratio: {_label(r): {figures.short(k): v for k, v in r["ranks"].items()}
                        for r in good if r["target_ratio"] == ratio}
                for ratio in sorted({r["target_ratio"] for r in good}, reverse=True)}
    return fig, figures.rank_heatmaps(by_ratio)


def write_figures(df, rows: list[dict], out: Path) -> None:
    fig, heat = build_figures(df, rows)
    fig.write_html(Path(out) / "ppl_vs_ratio.html", include_plotlyjs=True)
    heat.write_html(Path(out) / "ranks_heatmap.html", include_plotlyjs=True)
