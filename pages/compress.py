"""Compress page: configure a rank selector (LLRC when registered), run it on a worker thread,
watch masks, losses, ratio and ranks live; perplexity before and after at the end."""
import streamlit as st

from llrc_core import SELECTORS, analysis, get_selector
from llrc_core.jobs import start_job
from llrc_core.evaluate import EVAL_SEQ_LEN, EVAL_WINDOWS
from llrc_core.pipeline import method_config
from llrc_core.planner import check_fits
from llrc_core.workflow import compress
from llrc_core import figures as charts
from studio import common, forms, workspace

st.title("Compress")

def live_panel():
    with common.error_box():
        _live_panel()


def _live_panel():
    job = st.session_state.get("compress_job")
    if job is None:
        st.info("Set the options below and press **Start compression**.")
        return
    options = st.session_state["compress_options"]
    steps = job.events_since(0, "step")
    phase = job.latest("phase") or {"phase": "starting"}
    total = int(steps[-1].get("total_steps", 0)) if steps else 0
    done = job.latest("done")                 # a run resumed at its end trains no step
    done_steps = done["step"] if done else steps[-1]["step"] if steps else 0
    top = st.columns([4, 1])
    if job.status == "queued":
        top[0].info(common.waiting_text(job))
        if top[1].button("Stop", key="stop", type="secondary", disabled=job.stop_requested):
            job.stop()
    elif job.running:
        frac = min(1.0, done_steps / total) if total else 0.0
        top[0].progress(frac, text=f"{phase['phase']}: step {done_steps}"
                        + (f" of {total}" if total else "") + f" - {job.seconds:.0f} s")
        if top[1].button("Stop", key="stop", type="secondary", disabled=job.stop_requested):
            job.stop()
            st.toast("Stopping after the current step ...")
    elif job.status == "error":
        st.error(job.error)
    else:
        top[0].success(f"{job.status.capitalize()} after {job.seconds:.0f} s "
                       f"({done_steps} steps).")

    masks = job.latest("masks")
    if steps or masks:
        left, right = st.columns(2)
        if masks:
            names, z = analysis.mask_matrix(masks["probs"])
            left.plotly_chart(charts.mask_heatmap([charts.short(n) for n in names], z,
                                                  masks["step"]), key="fig_masks")
        right.plotly_chart(charts.loss_curves(steps), key="fig_loss")
        right.plotly_chart(charts.ratio_curve(steps, options["scope"], options["ratio"]),
                           key="fig_ratio")
    elif job.running and not get_selector(job.name.split("-", 1)[1]).trains:
        st.caption("This method has no training loop to watch; it reports when it is done.")

    result = job.result
    ranks = (result.plan.ranks() if result is not None
             else steps[-1].get("ranks") if steps else None)
    if ranks:
        st.plotly_chart(charts.layer_bars([charts.short(n) for n in ranks], list(ranks.values()),
                                          "Kept rank per layer", "kept rank (singular values)"),
                        key="fig_ranks")
    if result is not None:
        m = st.columns(4)
        m[0].metric("Ratio (target layers)", f"{result.plan.ratio('linear'):.4f}")
        m[1].metric("Ratio (whole model)", f"{result.plan.ratio('model'):.4f}")
        if result.ppl_before is not None:
            m[2].metric("Perplexity before", f"{result.ppl_before:.2f}")
            m[3].metric("Perplexity after", f"{result.ppl_after:.2f}",
                        f"{result.ppl_after - result.ppl_before:+.2f}", delta_color="inverse")
        if result.ppl_before is not None:
            r = result.report
            st.caption(f"Perplexity on the first {r['eval_windows']} windows of "
                       f"{r['eval_seq_len']} tokens of WikiText-2 test ({r['eval_tokens']} "
                       "tokens), before and after, same windows.")
        for w in result.warnings:
            st.warning(w["message"])
        st.page_link("pages/export.py", label="Next: export this model", icon=":material/east:")

    if not job.running and st.session_state.get("compress_finalised") is not job:
        st.session_state["compress_finalised"] = job
        common.results()             # registers the finished job's result
        st.rerun()   # the whole page once more, now without the timer


job = st.session_state.get("compress_job")
st.fragment(live_panel, run_every=1.0 if job is not None and job.running else None)()


with common.error_box():
    loaded = common.current()
    methods = sorted(SELECTORS, key=lambda m: (m != "llrc", m))
    job = st.session_state.get("compress_job")
    busy = job is not None and job.running
    if "llrc" not in SELECTORS:
        st.info("LLRC is not registered in this installation: the registered baselines run "
                "instead (no live training charts).")
    st.subheader("New run" if job is not None else "Configure a run")
    c1, c2 = st.columns(2)
    method = c1.selectbox("Method", methods, key="compress_method", disabled=busy)
    spec = get_selector(method)
    allowed = list(spec.allowed_decompositions)
    decomp = c2.selectbox("Decomposition", allowed, index=allowed.index(spec.preferred),
                          key=f"compress_decomp_{method}", disabled=busy,
                          help="each method starts on the decomposition its paper uses")
    with st.form("compress_form"):
        options, plumbing = forms.selector_options(spec, prefix=f"cfg_{method}")
        n_eval = st.number_input(f"Perplexity windows (WikiText-2 test, {EVAL_SEQ_LEN} tokens "
                                 "each; 0 skips)", 0, 256, EVAL_WINDOWS, key="n_eval")
        start = st.form_submit_button("Start compression", type="primary", disabled=busy)

    if start:
        cfg = method_config(method, decomp, **options)   # errors show here, in the script
        w = common.windows()
        # Memory guard: a run whose plan does not fit this machine is refused, not started.
        check_fits(loaded.source, method, decomp, dtype=str(loaded.dtype).removeprefix("torch."),
                   n_calib=int(w.shape[0]), seq_len=int(w.shape[1]),
                   batch_size=getattr(cfg, "batch_size", 8), device=loaded.device.type,
                   meta=loaded.model)     # shapes and counts of the model already loaded
        with st.status("Preparing the decomposition ...") as status:
            dec = common.decomposed(decomp)
            eval_ids = common.eval_ids(int(n_eval), EVAL_SEQ_LEN) if n_eval else None
            status.update(label="Decomposition ready", state="complete")
        base, windows = loaded.model, common.windows()
        if spec.trains:   # a checkpoint per exact run: a restart (or a rerun) resumes it
            plumbing["checkpoint"] = str(common.checkpoint_path(decomp, method, options))
            resumed = common.checkpoint_step(plumbing["checkpoint"])
            if resumed:
                st.toast(f"Resuming this exact run from its checkpoint at step {resumed}.")
        job = start_job(lambda emit, stop: compress(
            base, dec, method, windows, eval_ids=eval_ids, copy=True, emit=emit,
            should_stop=stop, cache_dir=str(workspace.workspace() / "cache"), **options,
            **plumbing),
            name=f"compress-{method}", queue=common.job_queue(), alive=common.owner_alive())
        label = (f"{method} {options.get('selection', '')} {options['ratio']:.2f} "
                 f"{options['scope']} ({decomp})")
        st.session_state.update(compress_job=job, compress_label=label,
                                compress_options=options, compress_finalised=None)
        st.rerun()   # show the new run's live panel at the top
