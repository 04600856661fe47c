"""Plotly figures: data in, ``go.Figure`` out. The one figure-building code path for the
Streamlit pages and the HTML report of ``llrc compare`` (``report.py``); no Streamlit here, so
tests can build and inspect them directly. Every axis has a title with its unit."""
from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=kw.pop("height", 380),
                      margin=dict(l=60, r=20, t=50, b=50), legend_title_text=kw.pop("legend", ""),
                      **kw)
    return fig


def spectra(lines: dict[str, list[float]], log: bool = True) -> go.Figure:
    fig = go.Figure([go.Scatter(y=s, mode="lines", name=n) for n, s in lines.items()])
    fig.update_yaxes(type="log" if log else "linear")
    return _layout(fig, "Singular value spectra", "singular index i (count)",
                   "singular value σ_i (weight units, log scale)" if log else
                   "singular value σ_i (weight units)", legend="layer")


def cumulative_energy(lines: dict[str, list[float]], energy: float | None = None) -> go.Figure:
    fig = go.Figure([go.Scatter(y=c, mode="lines", name=n) for n, c in lines.items()])
    if energy is not None:
        fig.add_hline(y=energy, line_dash="dot", annotation_text=f"{energy:.0%} energy")
    return _layout(fig, "Cumulative energy", "kept rank k (singular values)",
                   "energy kept Σσ²_{<k} / Σσ² (fraction)", legend="layer")


def layer_bars(names: list[str], values: list[float], title: str, y: str) -> go.Figure:
    fig = go.Figure([go.Bar(x=names, y=values,
                            hovertemplate="%{x}<br>%{y:.1f}<extra></extra>")])
    return _layout(fig, title, "target layer (block.module)", y)


def block_heatmap(blocks: list[int], kinds: list[str], z: list[list], title: str,
                  z_title: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, x=kinds, y=[f"block {b}" for b in blocks],
                               colorscale="Viridis", colorbar_title=z_title,
                               hovertemplate="%{y} %{x}: %{z:.1f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title, "module type", "transformer block (index)")


def mask_heatmap(names: list[str], z: list[list], step: int | None) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, y=names, zmin=0, zmax=1, colorscale="Blues",
                               colorbar_title="P(kept)",
                               hovertemplate="%{y}<br>index %{x}: %{z:.2f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showticklabels=len(names) <= 40, tickfont_size=8)
    title = "Mask: kept probability per singular value" + (f" (step {step})" if step else "")
    return _layout(fig, title, "singular index i (count)", "target layer", height=520)


def loss_curves(steps: list[dict]) -> go.Figure:
    """Each loss term against the step, and alpha(t) on a secondary axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    x = [e["step"] for e in steps]
    terms = [k for k in steps[0] if k == "loss" or k.startswith("loss_")] if steps else []
    for term in terms:                  # every method's own terms (LLRC, ARS, ARA)
        fig.add_trace(go.Scatter(x=x, y=[e[term] for e in steps], name=term, mode="lines"))
    if steps and "alpha" in steps[0]:
        fig.add_trace(go.Scatter(x=x, y=[e["alpha"] for e in steps], name="alpha(t)",
                                 mode="lines", line_dash="dot"), secondary_y=True)
    fig.update_yaxes(title_text="loss (nats / normalised MSE)", secondary_y=False)
    fig.update_yaxes(title_text="alpha(t) (weight, 0-1)", secondary_y=True, range=[0, 1.05])
    fig.update_layout(legend=dict(orientation="h", y=-0.3))   # clear of the right axis
    return _layout(fig, "Loss terms and distillation weight alpha(t)", "training step (count)",
                   "loss (nats / normalised MSE)")


def ratio_curve(steps: list[dict], scope: str, target: float) -> go.Figure:
    key = f"ratio_{scope}"
    fig = go.Figure([go.Scatter(x=[e["step"] for e in steps], y=[e.get(key) for e in steps],
                                mode="lines", name=f"ratio ({scope})")])
    fig.add_hline(y=target, line_dash="dash", line_color="red",
                  annotation_text=f"target {target:.2f}")
    return _layout(fig, "Parameter ratio against the target", "training step (count)",
                   f"kept / original parameters ({scope} scope, fraction)")


def grouped_ranks(ranks: dict[str, dict[str, int]]) -> go.Figure:
    """``ranks``: series label -> {layer: kept rank}; one bar group per layer."""
    fig = go.Figure([go.Bar(x=list(r), y=list(r.values()), name=label)
                     for label, r in ranks.items()])
    fig.update_layout(barmode="group")
    return _layout(fig, "Kept rank per layer", "target layer (block.module)",
                   "kept rank (singular values)", legend="method")


def rank_spread(ranks: dict[str, list[int]], label: str) -> go.Figure:
    """``ranks``: layer -> kept rank under each seed of one learned method; a bar per layer at
    the mean, the error bar from the lowest to the highest seed."""
    mean = [sum(v) / len(v) for v in ranks.values()]
    fig = go.Figure(go.Bar(
        x=list(ranks), y=mean, name=label,
        error_y={"type": "data", "symmetric": False,
                 "array": [max(v) - m for v, m in zip(ranks.values(), mean)],
                 "arrayminus": [m - min(v) for v, m in zip(ranks.values(), mean)]}))
    n = len(next(iter(ranks.values()))) if ranks else 0
    return _layout(fig, f"Kept rank per layer over {n} seeds: {label}",
                   "target layer (block.module)", "kept rank (mean; bar: min to max)")


def _rank_trace(ranks: dict[str, dict[str, int]], **kw) -> go.Heatmap:
    """Methods x layers (the first method's layers); a layer a method lacks is a gap."""
    labels = list(ranks)
    layers = list(next(iter(ranks.values()))) if ranks else []
    return go.Heatmap(z=[[ranks[lb].get(ly) for ly in layers] for lb in labels],
                      x=layers, y=labels, **kw)


def rank_heatmap(ranks: dict[str, dict[str, int]]) -> go.Figure:
    fig = go.Figure(_rank_trace(ranks, colorscale="Viridis", colorbar_title="kept rank"))
    return _layout(fig, "Kept rank per layer and method", "target layer (block.module)",
                   "method", height=120 + 40 * max(1, len(ranks)))


def rank_heatmaps(by_ratio: dict[float, dict[str, dict[str, int]]]) -> go.Figure:
    """``by_ratio``: target ratio -> ``rank_heatmap``'s ``ranks``; one heatmap per ratio,
    stacked, on one colour scale."""
    ratios = list(by_ratio)
    fig = make_subplots(rows=max(1, len(ratios)), cols=1,
                        subplot_titles=[f"target ratio {r:g}" for r in ratios],
                        row_heights=[max(1, len(by_ratio[r])) for r in ratios] or None,
                        vertical_spacing=0.3 / max(1, len(ratios)) if len(ratios) > 1 else 0.1)
    for i, ratio in enumerate(ratios, 1):
        fig.add_trace(_rank_trace(by_ratio[ratio], coloraxis="coloraxis"), row=i, col=1)
        fig.update_yaxes(title_text="method", row=i, col=1)
    fig.update_xaxes(title_text="target layer (block.module)", row=max(1, len(ratios)), col=1)
    n = sum(max(1, len(m)) for m in by_ratio.values())
    fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": "kept rank"}})
    return _layout(fig, "Kept rank per layer and method", None, None,
                   height=100 + 40 * n + 110 * max(1, len(ratios)))


METRICS = {   # metric -> (title, y axis title, log y)
    "ppl": ("Perplexity against parameter ratio", "WikiText-2 test perplexity (log scale)", True),
    "fidelity": ("Embedding fidelity against parameter ratio",
                 "embedding fidelity (mean cosine to the original, fraction)", False),
}


def ppl_vs_ratio(rows: list[dict], scope: str, dense: float | None = None,
                 metric: str = "ppl") -> go.Figure:
    """``rows``: label, ratio and ``metric`` (``ppl``, or ``fidelity`` for an encoder), and
    optionally ``sd`` (the spread over seeds, drawn as +-1 sd error bars); one line per label;
    ``dense``: the uncompressed model's value."""
    title, y_title, log = METRICS[metric]
    fig = go.Figure()
    if dense is not None and rows:
        # A trace, not add_hline: shapes on a log axis take log10 coordinates.
        xs = [min(r["ratio"] for r in rows), 1.0]          # the dense model is ratio 1
        fig.add_trace(go.Scatter(x=xs, y=[dense, dense], mode="lines", name="dense",
                                 line={"dash": "dot", "color": "gray"}))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["ratio"], r[metric], r.get("sd")) for r in rows if r["label"] == label)
        sds = [p[2] if p[2] is not None and math.isfinite(p[2]) else 0.0 for p in pts]
        fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts],
                                 mode="lines+markers", name=label,
                                 error_y={"type": "data", "array": sds, "visible": any(sds)}))
    fig.update_yaxes(type="log" if log else "linear")
    return _layout(fig, title, f"target parameter ratio ({scope} scope, fraction)", y_title,
                   legend="method")


def task_accuracy(acc: dict[str, dict[str, float]]) -> go.Figure:
    """``acc``: series label -> {task: accuracy}; one bar group per task."""
    fig = go.Figure([go.Bar(x=list(a), y=list(a.values()), name=label)
                     for label, a in acc.items()])
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1])
    return _layout(fig, "Zero-shot accuracy", "task (lm-eval, 0-shot)", "accuracy (fraction)",
                   legend="method")


def short(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``3.attention.self.query``."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[i:])
    return name


def next_token_probs(steps: list[dict]) -> go.Figure:
    """The model's next-token probabilities at the first generation steps, one stacked bar per
    step: its most likely tokens (most likely first, labelled), the rest of the mass as
    "other"; the token it generated is outlined. ``steps``: ``StepProbs.to_dict()`` rows
    (step, tokens, probs, chosen, chosen_id, ids, chosen_prob)."""
    k = max((len(s["probs"]) for s in steps), default=0)
    shown = lambda t: repr(t).replace("<", "&lt;").replace(">", "&gt;")  # noqa: E731 - not tags
    rows = [f"{s['step']}: {shown(s['chosen'])}" for s in steps]  # step and the token chosen
    fig = go.Figure()
    for r in range(k):
        cells = [(s["tokens"][r], s["probs"][r], s["ids"][r] == s["chosen_id"])
                 if r < len(s["probs"]) else ("", 0.0, False) for s in steps]
        fig.add_trace(go.Bar(
            y=rows, x=[c[1] for c in cells], orientation="h", name=f"rank {r + 1}",
            text=[shown(c[0]) for c in cells], textposition="inside", insidetextanchor="middle",
            marker={"color": f"rgba(31, 119, 180, {1 - 0.7 * r / max(k, 1):.2f})",
                    "line": {"color": "crimson", "width": [3 if c[2] else 0 for c in cells]}},
            hovertemplate="%{text}: %{x:.3f}<extra>rank " + str(r + 1) + "</extra>"))
    fig.add_trace(go.Bar(y=rows, x=[max(0.0, 1 - sum(s["probs"])) for s in steps],
                         orientation="h", name="other", marker_color="lightgray",
                         hovertemplate="other tokens: %{x:.3f}<extra></extra>"))
    fig.update_layout(barmode="stack", showlegend=False, uniformtext_minsize=8,
                      uniformtext_mode="hide")
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Next-token probabilities",
                   "probability (fraction; top tokens stacked, chosen outlined)",
                   "step: token generated", height=110 + 45 * max(1, len(steps)))
