"""Compare page: any-k against top-k and LLRC against the registered baselines at chosen ratios,
through the same runner as ``llrc compare`` (``llrc_core.compare``): every cell is cached on disk,
so a grid run again (or grown by a method or a ratio) only computes what is new. Kept ranks per
layer (grouped bars, heatmap), perplexity against ratio, zero-shot accuracy, and the table."""
import copy
import dataclasses

import streamlit as st

from llrc_core import SELECTORS, compare, report
from llrc_core import figures as charts
from llrc_core.decompose import DECOMPOSITIONS
from llrc_core.evaluate import EVAL_SEQ_LEN, EVAL_WINDOWS
from llrc_core.polish import PolishConfig
from llrc_core.selectors import any_k_methods
from llrc_core.zeroshot import TASKS
from studio import common, queued

st.title("Compare")
st.caption("The grid runs on a private copy of the model; finished cells are cached on disk and "
           "reused when you run a grid again.")
DECOMPS = {"per method (its paper's)": "auto", **{d: d for d in DECOMPOSITIONS}}
ANY_K = set(any_k_methods())


def label(row) -> str:
    name = f"{row['method']} {row['selection']}" if row["method"] in ANY_K else row["method"]
    return name + report.vote_suffix(row)


def make_config(methods, ratios, both, scope, decomp, steps, seeds, n_eval, tasks, limit,
                refit=False, vote=False, spread=False, polish=0):
    """The ``CompareConfig`` of this session's model and calibration."""
    loaded, calib, windows = common.current(), st.session_state["calib"], common.windows()
    return compare.CompareConfig(
        model=loaded.source, methods=tuple(methods), ratios=tuple(sorted(ratios, reverse=True)),
        selections=("any-k", "top-k") if both else ("any-k",),
        decompositions=(DECOMPS[decomp],), scope=scope, calib=calib["key"],
        n_calib=int(windows.shape[0]), seq_len=int(windows.shape[1]),
        eval_text=str(common.WIKI_TEST), eval_seq_len=EVAL_SEQ_LEN, max_eval_windows=int(n_eval),
        eval_sample="spread" if spread else "first",
        tasks=tuple(tasks), task_limit=int(limit) if tasks else None,
        options={"*": {"steps": int(steps)}}, seeds=tuple(range(int(seeds))), refit=refit,
        vote=vote, polish=int(polish))


def start_grid(cfg: compare.CompareConfig):
    cells = compare.grid(cfg)
    skipped = [m for m in cfg.methods if not any(c["method"] == m for c in cells)]
    if skipped:
        st.warning(f"Skipped {', '.join(skipped)}: not available on the "
                   f"{cfg.decompositions[0]} decomposition (pick 'per method').")
    if not cells:
        raise ValueError("nothing to run: pick methods that work on this decomposition")
    loaded = common.current()
    windows, out = common.windows(), common.compare_dir(cfg)
    make_decs = {d: common.decomposition_job(d) for d in {c["decomposition"] for c in cells}}
    polish_ids = common.polish_ids(PolishConfig(rounds=cfg.polish)) if cfg.polish else None

    def work(emit, should_stop):
        emit({"type": "phase", "phase": "decompose"})
        decs = {d: make(emit, should_stop) for d, make in make_decs.items()}   # shared

        def make_session():   # cells compress in place: a private copy, never the shared one
            private = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
            return compare.Session(cfg, common.log.info, loaded=private, windows=windows,
                                   decs=decs, polish_windows=polish_ids)

        rows = compare.run_cells(cfg, out, common.log.info, make_session=make_session,
                                 emit=emit, should_stop=should_stop)
        report.write_results(report.tidy(rows), rows, out)
        return rows

    queued.start("compare_job", work, "compare")
    st.session_state.update(compare_done=None, compare_out=str(out))


with common.error_box():
    common.current()
    job = st.session_state.get("compare_job")
    busy = job is not None and job.running
    with st.form("compare_form"):
        c1, c2, c3 = st.columns([2, 1, 1])
        default = [m for m in ("llrc", "uniform", "drank") if m in SELECTORS]
        methods = c1.multiselect("Methods", sorted(SELECTORS), default=default,
                                 key="cmp_methods")
        ratios = c1.multiselect("Target ratios", [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], default=[0.8],
                                key="cmp_ratios")
        both = c1.checkbox("Learned any-k methods: run any-k and top-k", True, key="cmp_both")
        scope = c2.radio("Ratio scope", ["linear", "model"], horizontal=True, key="cmp_scope")
        decomp = c2.selectbox("Decomposition", list(DECOMPS), key="cmp_decomp")
        steps = c2.number_input("Training steps (learned methods)", 1, 5000, 100,
                                key="cmp_steps")
        seeds = c2.number_input("Seeds (learned methods)", 1, 5, 1, key="cmp_seeds",
                                help="each learned cell runs once per seed (0, 1, ...); charts "
                                     "and the summary show the mean and the spread")
        vote = c2.checkbox("Vote of the seeds", key="cmp_vote",
                           help="with 2+ seeds, each learned cell also scores the plan its "
                                "seeds agree on: the singular values most of them keep, on the "
                                "same budget (no new training). Measured: below its seeds' mean "
                                "in 3 of 3 any-k triples on the demo model, by under 2 sd; "
                                "worse for top-k on MiniLM (bench/README.md)")
        n_eval = c3.number_input(f"Perplexity windows ({EVAL_SEQ_LEN} tokens)", 1, 256,
                                 EVAL_WINDOWS, key="cmp_eval")
        spread = c3.checkbox("Spread them over the test set", key="cmp_spread",
                             help="evenly spaced windows over the whole text instead of its "
                                  "first ones (one article): measured, the first 16 favoured "
                                  "LLRC over SVD-LLM; spread ones are a truer sample")
        tasks = c3.multiselect("Zero-shot tasks (lm-eval, local files)", list(TASKS),
                               key="cmp_tasks")
        limit = c3.number_input("Questions per task", 1, 10000, 50, key="cmp_limit",
                                help="the first N questions of each task (quick runs)")
        refit = c3.checkbox("Refit output factors", key="cmp_refit",
                            help="each plan's output factors solved again on the compressed "
                                 "model's inputs before it is evaluated (a grid already run "
                                 "is evaluated again, not selected again)")
        polish = c3.number_input("Polish rounds (0: off)", 0, 50, 0, key="cmp_polish",
                                 help="each selected plan is polished: chunks of singular "
                                      "values move between layers while the calibration "
                                      "text's loss drops (next-token loss; an encoder's: the "
                                      "distance to the original's pooled output); a new "
                                      "selection, same size; llrc_core/polish.py")
        run = st.form_submit_button("Run comparison", type="primary", disabled=busy)

    if run:
        if not methods or not ratios:
            raise ValueError("pick at least one method and one ratio")
        start_grid(make_config(methods, ratios, both, scope, decomp, steps, seeds, n_eval,
                               tasks, limit, refit, vote, spread, polish))


def grid_panel():
    with common.error_box():
        job = st.session_state.get("compare_job")
        if job is None:
            st.info("Pick methods and ratios, then press **Run comparison**.")
            return
        grid = job.latest("grid") or {"done": 0, "total": 1}
        step = job.latest("step")                 # of this cell, not an earlier one
        fresh = step is not None and step["time"] >= grid.get("time", 0)
        where = f" - step {step['step']}" if fresh else ""
        what = (f"cell {grid['done'] + 1} of {grid['total']}: "
                f"{grid.get('cell', '').replace('__', ' ')}{where}" if job.latest("grid")
                else (job.latest("phase") or {"phase": "starting"})["phase"])
        queued.header(job, "cmp_stop", what, grid["done"] / max(grid["total"], 1))
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
            if r.get("error"):
                st.error(f"{label(r)} at {r['target_ratio']:g}: {r['error']}")
        dense = next((r for r in rows if r["method"] == "dense" and not r.get("error")), None)
        done = [r for r in rows if r["method"] != "dense" and not r.get("error")]
        for r in done:
            seed = f" seed {r['seed']}" if r.get("seed") is not None else ""
            common.results()[f"{label(r)} {r['target_ratio']:.2f} {r['scope']} "
                             f"({r['decomposition']}){seed}"] = {
                k: v for k, v in r.items() if k not in ("shapes", "fingerprint")}
        summary = report.summary(report.tidy(done)) if done else None
        if done:
            ratio = st.selectbox("Ratio for the rank and accuracy charts",
                                 sorted({r["target_ratio"] for r in done}, reverse=True),
                                 key="cmp_show")
            at = sorted((r for r in done if r["target_ratio"] == ratio),
                        key=lambda r: r.get("seed") or 0)
            ranks, spread = {}, {}       # the lowest seed's ranks; every seed's, per layer
            for r in at:
                short = {charts.short(k): v for k, v in r["ranks"].items()}
                ranks.setdefault(label(r), short)
                for layer, k in short.items():
                    spread.setdefault(label(r), {}).setdefault(layer, []).append(k)
            st.plotly_chart(charts.grouped_ranks(ranks), key="fig_cmp_bars")
            st.plotly_chart(charts.rank_heatmap(ranks), key="fig_cmp_heat")
            for i, (name, per_layer) in enumerate(spread.items()):
                if len(next(iter(per_layer.values()))) > 1:      # a learned method, seeds
                    st.plotly_chart(charts.rank_spread(per_layer, name), key=f"fig_spread_{i}")
            if all(r.get("ppl") is not None for r in done):
                pts = [{"label": label(r), "ratio": r["target_ratio"], "ppl": r["ppl_mean"],
                        "sd": r["ppl_sd"]} for _, r in summary.iterrows()]
                st.plotly_chart(charts.ppl_vs_ratio(pts, rows[0]["scope"],
                                                    dense["ppl"] if dense else None),
                                key="fig_cmp_ppl")
            acc = {label(r): {k[4:]: v for k, v in r.items() if k.startswith("acc_")}
                   for r in ([dense] if dense else []) + at}
            if any(acc.values()):
                st.plotly_chart(charts.task_accuracy(acc), key="fig_cmp_acc")
        table = report.tidy(rows).drop(columns=["ranks"])
        if summary is not None and (summary["seeds"] > 1).any():
            st.markdown("**Mean and sample sd over seeds** (a gap under 2 sd is noise)")
            st.dataframe(summary, hide_index=True, width="stretch")
        st.dataframe(table, hide_index=True, width="stretch")
        st.download_button("Download table (CSV)", table.to_csv(index=False), "compare.csv",
                           "text/csv", key="dl_compare")
        st.caption(f"Cells, results.csv and plotly HTML figures: "
                   f"`{st.session_state.get('compare_out')}`")
        st.page_link("pages/export.py", label="Next: export one of these plans",
                     icon=":material/east:")
