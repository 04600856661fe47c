"""Playground page: one prompt, the dense model and up to three compressed ones (this session's
results or its export folders) generate side by side with the same sampling settings and seed;
per model the text as it comes, tokens per second, the perplexity on the prompt and the
next-token probabilities of the first steps."""
import copy
from pathlib import Path

import streamlit as st

from llrc_core import RankPlan, compress_
from llrc_core import figures as charts
from llrc_core.export import export_kind, load_compressed
from llrc_core.generate import SamplingConfig, generate_each
from llrc_core.workflow import CompressionResult
from studio import common, queued, workspace

st.title("Playground")
st.caption("One prompt, the same sampling settings and seed for every model: what compression "
           "does to the text and to the speed. The models generate one after another, in the "
           "studio's job queue, so no other studio job runs while each is timed.")

DENSE = "Dense (the loaded model)"
DEFAULT_PROMPT = "The history of the city"


def session_exports() -> dict[str, Path]:
    """This session's export folders that the studio wrote, by label."""
    root = common.session_dir() / "exports"
    found = {}
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith("."):
            continue
        folder = workspace.export_folder(common.session_id(), path.name)  # inside the session
        if (folder.resolve().is_relative_to(root.resolve()) and workspace.marker(folder).exists()
                and export_kind(folder)):
            found[f"export: {path.name}"] = folder
    return found


def builder(label: str, results: dict, exports: dict[str, Path]):
    """A job-side function giving the model and tokenizer of ``label``: a model already in
    memory, a comparison's plan applied to a copy of the base model, or an export folder
    loaded (both kept for this session until the entry or the folder changes)."""
    loaded = common.current()
    cache = st.session_state.setdefault("play_built", {})
    if label == DENSE:
        return lambda emit, should_stop: (loaded.model, loaded.tokenizer)
    if label in exports:
        folder = exports[label]
        key = (str(folder), (folder / "config.json").stat().st_mtime_ns)

        def load_export(emit, should_stop):
            if cache.get(label, (None,))[0] != key:
                model, tok, _ = load_compressed(folder, device=str(loaded.device),
                                                dtype=loaded.dtype)
                cache[label] = (key, (model, tok or loaded.tokenizer))
            return cache[label][1]
        return load_export
    entry = results[label]
    if isinstance(entry, CompressionResult):
        return lambda emit, should_stop: (entry.model, loaded.tokenizer)
    make_dec = common.decomposition_job(entry["decomposition"])

    def rebuild(emit, should_stop):      # a Compare plan: applied to a copy of the base model
        if cache.get(label, (None,))[0] is not entry:
            model = copy.deepcopy(loaded.model)
            compress_(model, make_dec(emit, should_stop), RankPlan.from_dict(entry["plan"]))
            cache[label] = (entry, (model, loaded.tokenizer))
        return cache[label][1]
    return rebuild


def run_models(builders: dict, prompt: str, cfg: SamplingConfig):
    """The job: build every model, then generate with each in turn."""
    def work(emit, should_stop):
        models = {}
        for label, build in builders.items():
            emit({"type": "phase", "phase": f"Loading {label}"})
            models[label] = build(emit, should_stop)
        return generate_each(models, prompt, cfg, emit, should_stop)
    return work


def model_column(col, i: int, label: str, job, starts: dict, ends: dict):
    """One model's column: its size, its text (growing while it generates), then its speed
    and perplexity next to the dense model's and its next-token probabilities."""
    col.markdown(f"**{label}**")
    if label not in starts:
        col.caption("waiting ..." if job.running else "not run")
        return
    params, dense_params = starts[label]["params"], starts[DENSE]["params"]
    col.caption(f"{params / 1e6:.2f} M parameters"
                + (f" ({params / dense_params:.0%} of dense)" if label != DENSE else ""))
    done, dense = ends.get(label), ends.get(DENSE)
    col.code(done["text"] if done else "".join(e["text"] for e in job.events_since(0, "text")
                                               if e["label"] == label) or " ",
             language=None, wrap_lines=True)
    if done is None:
        return
    compared = dense is not None and label != DENSE
    speed, ppl = done["tokens_per_s"], done["prompt_ppl"]
    ppl_delta = ppl - dense["prompt_ppl"] if compared and ppl and dense["prompt_ppl"] else None
    m = col.columns(2)
    vs = "against the dense model's, in this run"
    m[0].metric("tokens/s", f"{speed:.1f}",
                f"{speed / dense['tokens_per_s'] - 1:+.0%}" if compared else None,
                help=f"generated tokens per second of the whole call; the change is {vs}")
    m[1].metric("prompt perplexity", "n/a" if ppl is None else f"{ppl:.2f}",
                None if ppl_delta is None else f"{ppl_delta:+.2f}",
                delta_color="off" if ppl_delta == 0 else "inverse",
                help=f"perplexity of this model on the prompt's tokens; the change is {vs}")
    decode = done["decode_tokens_per_s"]
    col.caption(f"{done['new_tokens']} tokens in {done['seconds']:.2f} s; first token after "
                f"{done['first_token_s'] * 1e3:.0f} ms"
                + (f", then {decode:.1f} tokens/s" if decode else "")
                + (" - same text as dense" if compared and done["text"] == dense["text"] else "")
                + (" - stopped" if done["stopped"] else ""))
    if done["steps"]:
        col.plotly_chart(charts.next_token_probs(done["steps"]), key=f"fig_play_{i}")


def results_panel():
    with common.error_box():
        job = st.session_state.get("play_job")
        if job is None:
            st.info("Type a prompt, pick the compressed models and press **Generate**.")
            return
        labels, prompt = st.session_state["play_labels"], st.session_state["play_prompt_run"]
        current, phase = job.latest("start"), job.latest("phase")
        queued.header(job, "play_stop", f"Generating with {current['label']}" if current
                      else (phase or {}).get("phase", "Starting"))
        if not job.running and job.status != "error":
            st.success(f"Run {st.session_state['play_runs']}: {job.status} after "
                       f"{job.seconds:.1f} s.")
        st.code(prompt, language=None, wrap_lines=True)
        starts = {e["label"]: e for e in job.events_since(0, "start")}
        ends = {e["label"]: e for e in job.events_since(0, "generation")}
        for i, (col, label) in enumerate(zip(st.columns(len(labels)), labels)):
            model_column(col, i, label, job, starts, ends)
        if len(ends) > 1:
            st.caption("Speeds are one run each on this machine as loaded now (the first "
                       "token includes the prompt's prefill): run again to see their spread.")
        if not job.running and st.session_state.get("play_shown") is not job:
            st.session_state["play_shown"] = job
            st.rerun()          # the whole page once more, now without the timer


with common.error_box():
    loaded = common.current()
    if not loaded.causal:
        st.info(f"{loaded.source} is an encoder: it does not generate text. Load a causal "
                "language model on the Model page to use the Playground.")
        st.stop()
    results, exports = common.results(), session_exports()
    options = list(results)[::-1] + list(exports)
    if not options:
        st.info("No compressed model in this session yet: the dense model generates alone. "
                "Compress one (or export it) to compare.")
        st.page_link("pages/compress.py", label="Go to Compress", icon=":material/east:")
    job = st.session_state.get("play_job")
    busy = job is not None and job.running
    gpu = loaded.device.type == "cuda"
    with st.form("play_form"):
        prompt = st.text_area("Prompt", DEFAULT_PROMPT, max_chars=2000, key="play_prompt")
        picked = st.multiselect("Compressed models (up to three)", options, max_selections=3,
                                default=[o for o in options[:1] if o in results],
                                key="play_models")
        c = st.columns(6)
        sample = c[0].radio("Decoding", ["Greedy", "Sample"], index=1, key="play_decoding",
                            help="greedy: always the most likely token; sample: draw with "
                                 "the settings on the right and the seed") == "Sample"
        temperature = c[1].number_input("Temperature", 0.05, 5.0, 0.8, 0.05, key="play_temp")
        top_p = c[2].number_input("Top-p", 0.05, 1.0, 0.95, 0.05, key="play_top_p")
        top_k = c[3].number_input("Top-k (0: off)", 0, 1000, 50, key="play_top_k")
        max_new = c[4].number_input("Max new tokens", 1, 512, 64 if gpu else 24,
                                    key="play_max_new", help="short on CPU: every model "
                                    "generates in turn")
        seed = c[5].number_input("Seed", 0, 2 ** 31 - 1, 0, key="play_seed")
        go = st.form_submit_button("Generate", type="primary", disabled=busy)

    if go:
        cfg = SamplingConfig(max_new_tokens=int(max_new), do_sample=sample,
                             temperature=float(temperature), top_p=float(top_p),
                             top_k=int(top_k), seed=int(seed))
        if not prompt.strip():
            raise ValueError("the prompt is empty: type a few words")
        labels = [DENSE, *picked]
        built = st.session_state.setdefault("play_built", {})
        for label in set(built) - set(labels):          # free the models no longer shown
            del built[label]
        builders = {label: builder(label, results, exports) for label in labels}
        queued.start("play_job", run_models(builders, prompt, cfg), "playground")
        st.session_state.update(play_labels=labels, play_prompt_run=prompt, play_shown=None,
                                play_runs=st.session_state.get("play_runs", 0) + 1)
        st.rerun()

job = st.session_state.get("play_job")
st.fragment(results_panel, run_every=0.5 if job is not None and job.running else None)()
