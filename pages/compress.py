"""Compress page: configure a rank selector (LLRC when registered), run it as a job of the
shared queue (decomposition, then selection on a private copy), watch masks, losses, ratio and
ranks live; perplexity before and after at the end. A learned run that a restart or the
visitor's leaving interrupted is offered for resuming (``studio.runs``)."""
from pathlib import Path

import streamlit as st

from llrc_core import SELECTORS, analysis, get_selector
from llrc_core.evaluate import EVAL_SEQ_LEN, EVAL_WINDOWS
from llrc_core.pipeline import method_config
from llrc_core.polish import PolishConfig
from llrc_core.preflight import check_fits
from llrc_core.workflow import EVAL_BATCH_SIZE, compress
from llrc_core import figures as charts
from studio import common, forms, queued, runs, workspace

st.title("Compress")


def start_run(run: dict) -> None:
    """Check ``run`` (method, decomposition, options, plumbing, n_eval, label; a resumed
    one also its checkpoint) and submit it as one queued job. A learned run checkpoints
    into the workspace and is recorded in the session's folder."""
    loaded, w = common.current(), common.windows()
    method, decomp, options = run["method"], run["decomposition"], run["options"]
    cfg = method_config(method, decomp, **options)       # errors show here, in the script
    plumbing, on_end = dict(run["plumbing"]), None
    rounds = plumbing.pop("polish", 0)            # recorded as a number; the job gets its
    polish = PolishConfig(rounds=rounds) if rounds else None     # config and windows
    n_refit = plumbing.pop("refit_windows", 0)    # the same: a number, then its windows
    # Memory guard: a run whose plan does not fit this machine is refused, not started.
    check_fits(loaded.source, method, decomp, dtype=str(loaded.dtype).removeprefix("torch."),
               n_calib=int(w.shape[0]), seq_len=int(w.shape[1]),
               batch_size=getattr(cfg, "batch_size", 8), device=loaded.device.type,
               meta=loaded.model,     # shapes and counts of the model already loaded
               train_seq_len=getattr(cfg, "train_seq_len", 0),
               refit_batch_size=EVAL_BATCH_SIZE if run["plumbing"].get("refit") else None,
               refit_windows=n_refit, polish=polish)
    eval_ids = common.eval_ids(int(run["n_eval"]), EVAL_SEQ_LEN) if run["n_eval"] else None
    if polish:
        plumbing.update(polish=polish, polish_windows=common.polish_ids(polish))
    if n_refit:
        plumbing["refit_windows"] = common.refit_ids(n_refit)
    if get_selector(method).trains:   # a checkpoint per exact run: a restart resumes it
        calib = st.session_state["calib"]
        ckpt = runs.checkpoint_path(common.model_key(), calib["key"], decomp, method, options)
        if run.get("checkpoint", str(ckpt)) != str(ckpt):
            raise ValueError("this run's model or calibration no longer gives the same "
                             "windows: it cannot resume to the same plan; discard it")
        plumbing.update(checkpoint=str(ckpt), checkpoint_every=runs.CHECKPOINT_EVERY)
        if runs.checkpoint_step(ckpt):
            st.toast(f"Resuming this exact run from its checkpoint at step "
                     f"{runs.checkpoint_step(ckpt)}.")
        record = runs.record(common.session_dir(), {
            **{k: run[k] for k in ("method", "decomposition", "options", "n_eval", "label")},
            "plumbing": run["plumbing"], "model": list(common.model_key()), "calib": calib,
            "checkpoint": str(ckpt)})
        on_end = lambda job: runs.finish(record, job)   # noqa: E731
    make_dec, base = common.decomposition_job(decomp), loaded.model

    def work(emit, should_stop):
        emit({"type": "phase", "phase": "decompose"})
        dec = make_dec(emit, should_stop)            # shared; computed once, then reused
        return compress(base, dec, method, w, eval_ids=eval_ids, copy=True, emit=emit,
                        should_stop=should_stop, cache_dir=str(workspace.workspace() / "cache"),
                        **options, **plumbing)

    queued.start("compress_job", work, f"compress-{method}", on_end=on_end)
    st.session_state.update(compress_label=run["label"], compress_options=options,
                            compress_finalised=None)
    st.rerun()   # show the new run's live panel at the top


def resume(run: dict) -> None:
    """Reload the run's model and calibration when this session has others, and start it
    again: it resumes from its checkpoint to the plan an unbroken run gives."""
    calib = st.session_state.get("calib") or {}
    if common.model_key() != tuple(run["model"]) or calib.get("key") != run["calib"]["key"]:
        with st.spinner(f"Loading {run['model'][0]} ..."):
            common.load_into_session(*run["model"], calib=run["calib"])
    start_run(run)


def resume_offer() -> None:
    """An interrupted learned run of this session (a restart, or the visitor left): Resume
    or Discard. Shown only while no run of this session is going."""
    job = st.session_state.get("compress_job")
    if job is not None and job.running:
        return
    run = runs.interrupted(common.session_dir())
    if run is None:
        return
    box = st.container(border=True)
    box.warning(f"An interrupted run ({run['label']}) stopped at step {run['step']} of "
                f"{run['options'].get('steps', '?')}: resume it to the same plan, or discard "
                "it.", icon=":material/history:")
    c = box.columns([1, 1, 4])
    if c[0].button("Resume", key="resume_run", type="primary"):
        resume(run)
    if c[1].button("Discard", key="discard_run"):
        runs.update(Path(run["path"]), status="discarded")
        st.rerun()


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
    queued.header(job, "stop", phase["phase"] + (f": step {done_steps} of {total}" if total
                                                 else ""), done_steps / total if total else 0.0)
    if not job.running and job.status != "error":
        st.success(f"{job.status.capitalize()} after {job.seconds:.0f} s ({done_steps} steps).")

    polished = job.events_since(0, "polish")
    if polished:
        e = polished[-1]
        st.caption(f"Polish round {e['round'] + 1}: {sum(p['moves'] for p in polished)} "
                   f"moves kept so far, calibration loss {e['loss']:.4f}.")
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
        r = result.report
        if result.ppl_before is not None:
            m[2].metric("Perplexity before", f"{result.ppl_before:.2f}")
            m[3].metric("Perplexity after", f"{result.ppl_after:.2f}",
                        f"{result.ppl_after - result.ppl_before:+.2f}", delta_color="inverse")
            st.caption(f"Perplexity on the first {r['eval_windows']} windows of "
                       f"{r['eval_seq_len']} tokens of WikiText-2 test ({r['eval_tokens']} "
                       "tokens), before and after, same windows.")
        elif "fidelity_after" in r:           # an encoder: no next-token loss
            m[2].metric("Embedding fidelity", f"{r['fidelity_after']:.4f}",
                        f"{r['fidelity_after'] - 1:+.4f}")
            st.caption(f"Embedding fidelity: mean cosine between the dense and the compressed "
                       f"model's mean-pooled last states of the first {r['eval_windows']} "
                       f"windows of {r['eval_seq_len']} tokens of WikiText-2 test (1 = "
                       "unchanged).")
        if r.get("polish"):
            st.caption(f"Polished: {r['polish_moves']} moves in {r['polish_seconds']:.0f} s, "
                       f"calibration loss {r['polish_loss_before']:.4f} → "
                       f"{r['polish_loss_after']:.4f}.")
        for w in result.warnings:
            st.warning(w["message"])
        st.page_link("pages/export.py", label="Next: export this model", icon=":material/east:")

    if not job.running and st.session_state.get("compress_finalised") is not job:
        st.session_state["compress_finalised"] = job
        common.results()             # registers the finished job's result
        st.rerun()   # the whole page once more, now without the timer


with common.error_box():
    resume_offer()
job = st.session_state.get("compress_job")
st.fragment(live_panel, run_every=1.0 if job is not None and job.running else None)()


with common.error_box():
    common.current()                 # the demo model, when none is loaded yet
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
        if st.checkbox("Refit the output factors to the compressed model's inputs",
                       key="compress_refit", help="after selection, each low-rank layer's "
                       "output factor is solved again in closed form on the calibration "
                       "windows (same ranks and size; measured gains in bench/README.md)"):
            plumbing["refit"] = True
        refit_n = st.number_input(
            "Refit windows (with refit; 0: the calibration windows)", 0, 4096, 0,
            key="compress_refit_windows", help="fit the refit on this many fresh windows of "
            "the calibration text instead (other than the ones the selection saw; on the demo "
            "model 512 beat the 128 it selects on, bench/README.md)")
        polish = st.number_input(
            "Polish rounds (0: off)", 0, 50, 0, key="compress_polish",
            help="after selection, equal-cost chunks of singular values move between layers "
                 "while the calibration text's loss drops (next-token loss; an encoder's: "
                 "the distance of its pooled output to the original's); same size; "
                 "llrc_core/polish.py. About as slow as LLRC's own selection per few rounds; "
                 "measured gains in bench/README.md")
        if polish:
            plumbing["polish"] = int(polish)
        start = st.form_submit_button("Start compression", type="primary", disabled=busy)
    if start and refit_n:
        if not plumbing.get("refit"):
            st.error("Refit windows are set but the refit is off: tick the refit, or set the "
                     "refit windows to 0.")
            start = False
        else:
            plumbing["refit_windows"] = int(refit_n)

    if start:
        label = (f"{method} {options.get('selection', '')} {options['ratio']:.2f} "
                 f"{options['scope']} ({decomp})")
        start_run({"method": method, "decomposition": decomp, "options": options,
                   "plumbing": plumbing, "n_eval": int(n_eval), "label": label})
