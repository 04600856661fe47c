"""Compare page: any-k against top-k and LLRC against the registered baselines at chosen ratios.
Kept ranks per layer (grouped bars, heatmap), perplexity against ratio, and the table. Results
are cached per session and reused; only methods registered in this installation are shown."""
import pandas as pd
import streamlit as st

from llrc_core import SELECTORS, get_selector
from llrc_core.jobs import start_job
from llrc_core.workflow import grid_key, run_grid
from pages import charts, common, forms

st.title("Compare")
st.caption("Every cell compresses its own copy of the model; finished cells are cached and "
           "reused when you run a grid again.")
DECOMPS = ["per method (its paper's)", "asvd", "whiten", "svd"]


def label(row: dict) -> str:
    return f"{row['method']} {row['selection']}" if row["method"] in ANY_K else row["method"]


ANY_K = {m for m in SELECTORS if "any-k" in forms.selections(get_selector(m)[0])}

with common.error_box():
    loaded = common.current()
    job = st.session_state.get("compare_job")
    busy = job is not None and job.running
    with st.form("compare_form"):
        c1, c2 = st.columns([2, 1])
        default = [m for m in ("llrc", "uniform", "drank") if m in SELECTORS]
        methods = c1.multiselect("Methods", sorted(SELECTORS), default=default,
                                 key="cmp_methods")
        ratios = c1.multiselect("Target ratios", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], default=[0.8],
                                key="cmp_ratios")
        both = c1.checkbox("Learned any-k methods: run any-k and top-k", True, key="cmp_both")
        scope = c2.radio("Ratio scope", ["linear", "model"], horizontal=True, key="cmp_scope")
        decomp = c2.selectbox("Decomposition", DECOMPS, key="cmp_decomp")
        steps = c2.number_input("Training steps (learned methods)", 1, 5000, 100,
                                key="cmp_steps")
        n_eval = c2.number_input("Perplexity windows (128 tokens)", 1, 256, 4, key="cmp_eval")
        run = st.form_submit_button("Run comparison", type="primary", disabled=busy)

    if run:
        if not methods or not ratios:
            raise ValueError("pick at least one method and one ratio")
        cells = []
        for method in methods:
            cfg_cls, fn = get_selector(method)
            cfg_fields = forms.field_names(cfg_cls)
            dec = (decomp if not decomp.startswith("per method")
                   else getattr(fn, "preferred_decomposition", "asvd"))
            allowed = getattr(fn, "decompositions", None)
            if allowed and dec not in allowed:
                raise ValueError(f"{method} works only on {allowed}; pick 'per method' or one "
                                 "of those decompositions")
            opts = {"steps": int(steps)} if "steps" in cfg_fields else {}
            sels = (["any-k", "top-k"] if both else ["any-k"]) if method in ANY_K else ["top-k"]
            for sel in sels:
                for ratio in sorted(ratios, reverse=True):
                    key = grid_key(common.model_key(), st.session_state["calib"]["key"], dec,
                                   method, sel, ratio, scope, int(n_eval), opts)
                    cells.append(dict(key=key, decomposition=dec, method=method, selection=sel,
                                      ratio=ratio, scope=scope, options=opts))
        with st.status("Preparing decompositions ...") as status:
            decs = {d: common.decomposed(d) for d in {c["decomposition"] for c in cells}}
            eval_ids = common.eval_ids(int(n_eval), 128)
            status.update(label="Decompositions ready", state="complete")
        cache = st.session_state.setdefault("compare_cache", {})
        base, windows = loaded.model, common.windows()
        job = start_job(lambda emit, stop: run_grid(base, decs, windows, eval_ids, cells, cache,
                                                    emit=emit, should_stop=stop),
                        name="compare")
        st.session_state.update(compare_job=job, compare_done=None)


def grid_panel():
    with common.error_box():
        job = st.session_state.get("compare_job")
        if job is None:
            st.info("Pick methods and ratios, then press **Run comparison**.")
            return
        grid = job.latest("grid") or {"done": 0, "total": 1}
        if job.running:
            c = st.columns([4, 1])
            c[0].progress(grid["done"] / max(grid["total"], 1),
                          text=f"cell {grid['done'] + 1} of {grid['total']}: "
                          f"{grid.get('cell', '').split('|')[3:6]} - {job.seconds:.0f} s")
            if c[1].button("Stop", key="cmp_stop", disabled=job.stop_requested):
                job.stop()
        for e in job.events_since(0, "cell_error"):
            st.error(f"{e['cell'].split('|')[3]}: {e['error']}")
        if job.status == "error":
            st.error(job.error)
        if not job.running and st.session_state.get("compare_done") is not job:
            st.session_state["compare_done"] = job
            st.session_state["compare_rows"] = job.result or []
            st.rerun()


job = st.session_state.get("compare_job")
st.fragment(grid_panel, run_every=1.0 if job is not None and job.running else None)()

rows = st.session_state.get("compare_rows") or []
if rows:
    with common.error_box():
        for r in rows:
            common.results()[f"{label(r)} {r['target_ratio']:.2f} {r['scope']} "
                             f"({r['decomposition']})"] = r
        ratio = st.selectbox("Ratio for the rank charts", sorted({r["target_ratio"] for r in rows},
                                                                 reverse=True), key="cmp_show")
        at = {label(r): {charts.short(k): v for k, v in r["ranks"].items()}
              for r in rows if r["target_ratio"] == ratio}
        st.plotly_chart(charts.grouped_ranks(at), key="fig_cmp_bars")
        st.plotly_chart(charts.rank_heatmap(at), key="fig_cmp_heat")
        if all(r["ppl"] is not None for r in rows):
            pts = [{"label": label(r), "ratio": r["target_ratio"], "ppl": r["ppl"]} for r in rows]
            st.plotly_chart(charts.ppl_vs_ratio(pts, rows[0]["scope"]), key="fig_cmp_ppl")
        table = pd.DataFrame([{k: v for k, v in r.items() if k not in ("ranks", "plan")}
                              for r in rows])
        st.dataframe(table, hide_index=True, width="stretch")
        st.download_button("Download table (CSV)", table.to_csv(index=False), "compare.csv",
                           "text/csv", key="dl_compare")
        st.page_link("pages/export.py", label="Next: export one of these plans",
                     icon=":material/east:")
