"""The plotly figure builders shared by the app pages and the ``llrc compare`` HTML report."""
import pytest

from llrc_core import figures
from llrc_core.report import build_figures, tidy, write_figures

ROWS = [{"label": "a", "ratio": 0.8, "ppl": 30.0}, {"label": "a", "ratio": 0.6, "ppl": 50.0},
        {"label": "b", "ratio": 0.6, "ppl": 40.0}, {"label": "b", "ratio": 0.8, "ppl": 25.0}]


def test_ppl_vs_ratio_dense_line_and_log_axis():
    fig = figures.ppl_vs_ratio(ROWS, "linear", dense=20.0)
    assert len(fig.data) == 3
    dense, a, b = fig.data
    assert dense.name == "dense" and list(dense.x) == [0.6, 1.0] and list(dense.y) == [20.0, 20.0]
    assert (a.name, list(a.x), list(a.y)) == ("a", [0.6, 0.8], [50.0, 30.0])
    assert (b.name, list(b.x), list(b.y)) == ("b", [0.6, 0.8], [40.0, 25.0])
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.title.text == "WikiText-2 test perplexity (log scale)"
    assert fig.layout.xaxis.title.text == "target parameter ratio (linear scope, fraction)"
    assert len(figures.ppl_vs_ratio(ROWS, "linear").data) == 2        # no dense value: no line


def test_ppl_vs_ratio_fidelity_is_linear():
    rows = [{"label": r["label"], "ratio": r["ratio"], "fidelity": 1 - r["ppl"] / 100}
            for r in ROWS]
    fig = figures.ppl_vs_ratio(rows, "model", dense=1.0, metric="fidelity")
    assert len(fig.data) == 3 and list(fig.data[0].y) == [1.0, 1.0]
    assert list(fig.data[1].y) == pytest.approx([0.5, 0.7])
    assert fig.layout.yaxis.type == "linear"
    assert "fidelity" in fig.layout.yaxis.title.text


def test_rank_heatmaps_are_methods_by_layers():
    ranks = {"a": {"0.q": 4, "0.k": 8, "1.q": 2}, "b": {"0.q": 6, "0.k": 1}}
    heat = figures.rank_heatmap(ranks).data[0]
    assert (len(heat.z), len(heat.z[0])) == (2, 3)
    assert list(heat.y) == ["a", "b"] and list(heat.x) == ["0.q", "0.k", "1.q"]
    assert [list(r) for r in heat.z] == [[4, 8, 2], [6, 1, None]]
    fig = figures.rank_heatmaps({0.8: ranks, 0.6: {"a": {"0.q": 3, "0.k": 5, "1.q": 1}}})
    assert len(fig.data) == 2 and fig.data[0].z == heat.z
    assert [list(r) for r in fig.data[1].z] == [[3, 5, 1]]
    assert [a.text for a in fig.layout.annotations] == ["target ratio 0.8", "target ratio 0.6"]
    assert fig.data[0].coloraxis == fig.data[1].coloraxis == "coloraxis"


def test_report_figures_match_the_rows(tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.1.self_attn.q_proj": 6}
    rows = [{"method": "dense", "decomposition": "-", "selection": "-", "target_ratio": 1.0,
             "scope": "linear", "ppl": 10.0}]
    rows += [{"method": m, "decomposition": "asvd", "selection": s, "target_ratio": t,
              "scope": "linear", "ppl": p, "ranks": {k: v + i for k, v in ranks.items()}}
             for i, (m, s, t, p) in enumerate([("llrc", "any-k", 0.8, 12.0),
                                               ("llrc", "any-k", 0.6, 15.0),
                                               ("uniform", "top-k", 0.8, 13.0),
                                               ("uniform", "top-k", 0.6, 18.0)])]
    rows.append({"method": "broken", "decomposition": "asvd", "selection": "top-k",
                 "target_ratio": 0.8, "scope": "linear", "error": "RuntimeError: x"})
    df = tidy(rows)
    assert len(df) == 6 and list(df.columns[:3]) == ["method", "decomposition", "selection"]
    fig, heat = build_figures(df, rows)
    lines = {t.name: (list(t.x), list(t.y)) for t in fig.data}
    assert lines == {"dense": ([0.6, 1.0], [10.0, 10.0]),
                     "llrc any-k (asvd)": ([0.6, 0.8], [15.0, 12.0]),
                     "uniform (asvd)": ([0.6, 0.8], [18.0, 13.0])}
    assert fig.layout.yaxis.type == "log"
    assert [a.text for a in heat.layout.annotations] == ["target ratio 0.8", "target ratio 0.6"]
    at_08 = heat.data[0]
    assert list(at_08.y) == ["llrc any-k (asvd)", "uniform (asvd)"]
    assert list(at_08.x) == ["0.self_attn.q_proj", "1.self_attn.q_proj"]
    assert [list(r) for r in at_08.z] == [[4, 6], [6, 8]]

    # An encoder: fidelity, on a linear axis.
    enc = [{k: v for k, v in r.items() if k != "ppl"}
           | ({"fidelity": 1 - r["ppl"] / 100} if "ppl" in r else {}) for r in rows]
    fig, _ = build_figures(tidy(enc), enc)
    assert fig.layout.yaxis.type == "linear" and list(fig.data[0].y) == [0.9, 0.9]

    write_figures(df, rows, tmp_path)
    for name in ("ppl_vs_ratio.html", "ranks_heatmap.html"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_loss_curves_show_every_methods_own_terms():
    ars = [{"step": i, "loss": 1.0 / i, "loss_task": 0.5 / i, "loss_reg": 0.1, "loss_align": 0.0,
            "lambda": 16.0, "ranks": {}} for i in (1, 2, 3)]
    fig = figures.loss_curves(ars)
    assert [t.name for t in fig.data] == ["loss", "loss_task", "loss_reg", "loss_align"]
    assert list(fig.data[1].y) == [0.5, 0.25, 0.5 / 3]
    llrc = [{**e, "loss_compression": 0.2, "loss_distill": 0.3, "loss_tv": 0.1, "alpha": 0.5}
            for e in [{"step": 1, "loss": 0.6}]]
    names = [t.name for t in figures.loss_curves(llrc).data]
    assert names == ["loss", "loss_compression", "loss_distill", "loss_tv", "alpha(t)"]
