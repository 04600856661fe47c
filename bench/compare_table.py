"""Markdown tables from a ``llrc compare`` output folder (its cached cells), for the READMEs.

    python bench/compare_table.py OUT_DIR [--metric ppl|fidelity|acc]

One row per method (and selection), one column per target ratio: the metric (mean ± sample
sd over seeds where a cell ran with several), then the mean selection seconds. ``--metric
acc``: one column per zero-shot task (accuracy in %), their mean and the perplexity, one table
per ratio. Reads ``OUT_DIR/cells/*.json``, so it also works on a grid still running.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def cells(out: Path) -> pd.DataFrame:
    rows = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    df = pd.DataFrame(rows)
    df["label"] = df["method"] + df["selection"].map(lambda s: f" ({s})" if s in ("any-k", "top-k") else "")
    return df[~df.get("error", pd.Series(index=df.index, dtype=object)).notna()] \
        if "error" in df else df


def table(df: pd.DataFrame, metric: str) -> str:
    body = df[df["method"] != "dense"]
    ratios = sorted(body["target_ratio"].unique(), reverse=True)
    lines = ["| method | decomposition | " + " | ".join(f"{metric} @ {r}" for r in ratios)
             + " | " + " | ".join(f"s @ {r}" for r in ratios) + " | max abs(achieved - target) |",
             "|---|---|" + "---|" * (2 * len(ratios) + 1)]
    fmt = ".3f" if metric == "fidelity" else ".2f"
    for (label, dec), g in body.groupby(["label", "decomposition"], sort=False):
        by = g.groupby("target_ratio")          # several rows per ratio: one per seed
        mean, sd, secs_ = by[metric].mean(), by[metric].std(ddof=1), by["seconds"].mean()
        vals = [(f"{mean[r]:{fmt}}" + (f" ± {sd[r]:{fmt}}" if sd[r] == sd[r] else ""))
                if r in mean.index else "—" for r in ratios]        # sd NaN: one seed
        secs = [f"{secs_[r]:.0f}" if r in secs_.index else "—" for r in ratios]
        gap = (g["achieved_ratio_linear"] - g["target_ratio"]).abs().max()
        lines.append(f"| {label} | {dec} | " + " | ".join(vals) + " | " + " | ".join(secs)
                     + f" | {gap:.4f} |")
    dense = df[df["method"] == "dense"]
    if len(dense):
        lines.append(f"\nDense: {metric} {dense.iloc[0][metric]:.2f}.")
    return "\n".join(lines)


def acc_table(df: pd.DataFrame) -> str:
    tasks = [c for c in df.columns if c.startswith("acc_")]
    if not tasks:
        raise SystemExit("no acc_* columns: run compare with --tasks")
    out = []
    for ratio in sorted(df.loc[df["method"] != "dense", "target_ratio"].unique(), reverse=True):
        rows = pd.concat([df[df["method"] == "dense"], df[df["target_ratio"] == ratio]])
        out += [f"Target ratio {ratio}:", "",
                "| method | decomposition | " + " | ".join(t[4:] for t in tasks)
                + " | mean | ppl |", "|---|---|" + "---|" * (len(tasks) + 2)]
        for _, r in rows.iterrows():
            accs = [100 * r[t] for t in tasks]
            out.append(f"| {r['label']} | {r['decomposition']} | "
                       + " | ".join(f"{a:.1f}" for a in accs)
                       + f" | {sum(accs) / len(accs):.1f} | {r['ppl']:.2f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--metric", default="ppl")
    args = ap.parse_args()
    df = cells(args.out)
    print(acc_table(df) if args.metric == "acc" else table(df, args.metric))


if __name__ == "__main__":
    main()
