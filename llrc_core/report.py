"""The outputs of a comparison grid (``compare.py``): its rows gathered into a tidy table
(``results.csv`` / ``results.json``) and two plotly HTML figures, ``ppl_vs_ratio.html`` and
``ranks_heatmap.html``, built with ``figures.py`` like the app's Compare page. Causal LMs are
plotted by perplexity (log axis), an encoder (MiniLM) by embedding fidelity."""
from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_json, atomic_write

COLUMNS = ["method", "decomposition", "selection", "scope", "target_ratio", "seed", "vote",
           "achieved_ratio_linear", "achieved_ratio_model", "ppl", "fidelity", "seconds",
           "decompose_seconds", "eval_seconds", "refit", "refit_seconds", "refit_windows",
           "polish_moves", "polish_seconds", "dense_layers", "ranks", "error", "eval_seq_len",
           "eval_windows", "eval_sample"]


def tidy(rows: list[dict]):
    import pandas as pd
    df = pd.DataFrame(rows)
    extra = sorted(c for c in df.columns if c.startswith("acc_"))
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = None
    # rows cached before ``eval_sample`` existed were evaluated on the text's first windows
    df.loc[df["eval_windows"].notna() & df["eval_sample"].isna(), "eval_sample"] = "first"
    return df[COLUMNS[:10] + extra + COLUMNS[10:]]


# a cell, seed aside (a vote of seeds is a cell of its own)
CELL = ["method", "decomposition", "selection", "scope", "target_ratio", "vote"]


def summary(df):
    """One row per cell over its seeds: ``seeds`` (how many finished) and the mean and sample
    sd (ddof 1; empty with one seed) of every metric present (``ppl_mean``, ``ppl_sd``, ...).
    Failed cells are left out."""
    import pandas as pd
    ok = df[df["error"].isna()].copy()
    names = ["ppl", "fidelity", *sorted(c for c in df.columns if c.startswith("acc_")),
             "achieved_ratio_linear", "achieved_ratio_model", "seconds"]
    metrics = [c for c in names if c in ok.columns and ok[c].notna().any()]
    for c in metrics:
        ok[c] = pd.to_numeric(ok[c])
    groups = ok.groupby(CELL, sort=False, dropna=False)[metrics]
    out = groups.mean().add_suffix("_mean").join(groups.std(ddof=1).add_suffix("_sd"))
    out.insert(0, "seeds", groups.size())
    return out.reset_index()


def beats(summary_df, a: str, b: str, ratio: float, metric: str = "ppl") -> bool | None:
    """Whether label ``a`` has a better ``metric`` than ``b`` at ``ratio`` by more than 2 sd
    (the larger of the two sds; lower is better for perplexity, higher for the rest); None
    when either row is missing or has fewer than 2 seeds, so no claim can be made."""
    rows = {label(r): r for _, r in summary_df.iterrows() if r["target_ratio"] == ratio}
    if a not in rows or b not in rows or min(rows[a]["seeds"], rows[b]["seeds"]) < 2:
        return None
    ra, rb = rows[a], rows[b]
    gap = (rb[f"{metric}_mean"] - ra[f"{metric}_mean"]) * (1 if metric == "ppl" else -1)
    return bool(gap > 2 * max(ra[f"{metric}_sd"], rb[f"{metric}_sd"]))


def write_results(df, rows: list[dict], out: Path) -> None:
    out = Path(out)
    csv_df = df.copy()
    csv_df["ranks"] = [json.dumps(r) if isinstance(r, dict) else "" for r in csv_df["ranks"]]
    atomic_write(out / "results.csv", lambda tmp: csv_df.to_csv(tmp, index=False))
    atomic_json(out / "results.json", [{k: v for k, v in r.items()
                                        if k not in ("fingerprint", "select_fingerprint", "plan")}
                                       for r in rows])
    atomic_write(out / "summary.csv", lambda tmp: summary(df).to_csv(tmp, index=False))
    write_figures(df, rows, out)


def label(r) -> str:
    """``llrc any-k (asvd)``: a cell's method, selection (when not top-k) and decomposition;
    ``llrc any-k vote 0,1,2 (whiten)`` for the vote of those seeds' plans."""
    sel = "" if r["selection"] in ("top-k", "-") else f" {r['selection']}"
    return f"{r['method']}{sel}{vote_suffix(r)} ({r['decomposition']})"


def vote_suffix(r) -> str:
    """`` vote 0,1,2`` for a vote row (``compare.voted``), else empty."""
    v = r.get("vote")
    return f" vote {v}" if isinstance(v, str) and v else ""


def build_figures(df, rows: list[dict]):
    """The metric against the target ratio (a line per method, mean over seeds with +-1 sd
    error bars, the dense model dotted) and the kept ranks (a methods x layers heatmap per
    ratio; a learned method's lowest seed), with ``figures.py``."""
    from . import figures
    metric = "ppl" if df["ppl"].notna().any() else "fidelity"
    ok = summary(df[df[metric].notna()])
    ok = ok[ok["method"] != "dense"]
    pts = [{"label": label(r), "ratio": float(r["target_ratio"]),
            metric: float(r[f"{metric}_mean"]), "sd": float(r[f"{metric}_sd"])}
           for _, r in ok.iterrows()]
    dense = df[df["method"] == "dense"][metric].dropna()
    scope = df["scope"].dropna().iloc[0] if df["scope"].notna().any() else "linear"
    fig = figures.ppl_vs_ratio(sorted(pts, key=lambda p: p["label"]), scope,
                               float(dense.iloc[0]) if len(dense) else None, metric=metric)

    good = [r for r in rows if not r.get("error") and isinstance(r.get("ranks"), dict)]
    by_ratio: dict = {}
    for r in sorted(good, key=lambda r: (-r["target_ratio"], r.get("seed") or 0)):
        by_ratio.setdefault(r["target_ratio"], {}).setdefault(
            label(r), {figures.short(k): v for k, v in r["ranks"].items()})
    return fig, figures.rank_heatmaps(by_ratio)


def write_figures(df, rows: list[dict], out: Path) -> None:
    fig, heat = build_figures(df, rows)
    fig.write_html(Path(out) / "ppl_vs_ratio.html", include_plotlyjs=True)
    heat.write_html(Path(out) / "ranks_heatmap.html", include_plotlyjs=True)
