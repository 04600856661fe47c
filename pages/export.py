"""Export page: save a compressed model of this session to a folder and as a zip, with the
rank plan (JSON, CSV) and a model card; reload it and check the outputs match. Writing and
checking are jobs of the shared queue (``studio.queued``); an export is written atomically
(a killed one leaves no partial folder)."""
import copy
import re
from pathlib import Path

import streamlit as st
import torch

from llrc_core import RankPlan, compress_
from llrc_core.export import export_info, export_model, load_compressed
from llrc_core.workflow import CompressionResult, max_logit_diff, zip_folder
from studio import common, queued, workspace

st.title("Export")


def model_builder(entry):
    """A job-side function giving the compressed model of a result, its plan and report: kept
    from the Compress page, or rebuilt on a copy of the base model from a comparison's plan."""
    if isinstance(entry, CompressionResult):
        return lambda emit, should_stop: (entry.model, entry.plan, entry.report)
    base, make_dec = common.current().model, common.decomposition_job(entry["decomposition"])

    def build(emit, should_stop):
        plan, model = RankPlan.from_dict(entry["plan"]), copy.deepcopy(base)
        compress_(model, make_dec(emit, should_stop), plan)
        return model, plan, {k: v for k, v in entry.items() if k not in ("plan", "ranks")}
    return build


def save_job(entry, target: Path, force: bool, merged: bool):
    """The job writing ``entry`` into ``target`` (atomically), then marking it the studio's."""
    loaded, build = common.current(), model_builder(entry)

    def work(emit, should_stop):
        model, plan, report = build(emit, should_stop)
        out = export_model(model, loaded.tokenizer, plan, target,
                           report={**report, "base_model": loaded.source}, force=force,
                           merged_dense=merged, dtype=loaded.source_dtype,
                           source=loaded.source_info())
        workspace.mark(out)
        return str(out)
    return work


def check_job(entry, out: str, storage: dict):
    """The job reloading ``out`` and measuring its logits (an encoder's last hidden states)
    against the model in memory."""
    build, ids = model_builder(entry), common.windows()[:2, :64]

    def work(emit, should_stop):
        model, _, _ = build(emit, should_stop)
        compute = next(model.parameters()).dtype
        reloaded, _, _ = load_compressed(out, dtype=compute)
        # the in-memory model with its weights rounded as the folder stores them
        stored = copy.deepcopy(model).to(getattr(torch, storage.get("dtype", "float32")))
        return (max_logit_diff(stored.to(compute), reloaded, ids),
                max_logit_diff(model, reloaded, ids))
    return work


with common.error_box():
    loaded = common.current()
    results = common.results()
    if not results:
        st.info("Nothing to export yet: compress the model first.")
        st.page_link("pages/compress.py", label="Go to Compress", icon=":material/east:")
        st.stop()
    labels = list(results)[::-1]
    last = st.session_state.get("compress_label")
    choice = st.selectbox("Compressed model", labels,
                          index=labels.index(last) if last in labels else 0, key="export_choice")
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{Path(loaded.source).name}-{choice}").strip("-")
    with st.form("export_form"):
        folder = st.text_input("Folder name (in your workspace)", slug, key="export_folder",
                               help="letters, digits, '.', '_' and '-'; the folder is created in "
                                    "this session's workspace folder")
        c1, c2 = st.columns(2)
        force = c1.checkbox("Replace the folder if it is not empty", key="export_force")
        merged = c2.checkbox("Merged dense (plain architecture, no memory saved)",
                             key="export_merged")
        save = st.form_submit_button("Save to folder", type="primary")

    if save:
        target = workspace.export_folder(common.session_id(), folder)
        workspace.check_replace(target, force)     # only folders this studio wrote
        workspace.sweep_partial(target.parent)     # what an export killed mid-way left
        queued.start("export_job", save_job(results[choice], target, force, merged), "export",
                     inputs=choice)
    saved = queued.watch("export_job", "Writing the export folder")
    if saved is not None and saved.status == "done" and \
            st.session_state.get("export_seen") is not saved:
        st.session_state.update(export_seen=saved, export_dir=saved.result,
                                export_label=st.session_state["export_job:inputs"])
        st.session_state.pop("check_job", None)    # a check of the folder it replaced

    out = st.session_state.get("export_dir")
    if out and Path(out).is_dir():
        files = sorted(p for p in Path(out).iterdir() if p.is_file())
        st.success(f"`{out}`: {len(files)} files, "
                   f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB "
                   f"({st.session_state['export_label']})")
        storage = export_info(out).get("storage")
        if storage:
            src = storage["source"]
            st.caption(f"Weights: {storage['weights_bytes'] / 1e6:.1f} MB in {storage['dtype']} "
                       f"(computed in {storage['compute_dtype']}); source: "
                       f"{src['weights_bytes'] / 1e6:.1f} MB in {src['dtype']}.")
        st.dataframe([{"file": p.name, "size (kB)": round(p.stat().st_size / 1e3, 1)}
                      for p in files], hide_index=True)
        d = st.columns(3)
        # Deferred: the zip (tens of MB) is built only when the button is clicked.
        d[0].download_button("Download folder (zip)", lambda: zip_folder(out),
                             f"{Path(out).name}.zip",
                             "application/zip", key="dl_zip", type="primary")
        d[1].download_button("Rank plan (JSON)", (Path(out) / "rank_plan.json").read_text(),
                             "rank_plan.json", "application/json", key="dl_plan_json")
        d[2].download_button("Rank plan (CSV)", (Path(out) / "rank_plan.csv").read_text(),
                             "rank_plan.csv", "text/csv", key="dl_plan_csv")
        storage = storage or {}
        if st.button("Reload and check outputs", key="reload_check"):
            queued.start("check_job", check_job(results[st.session_state["export_label"]], out,
                                                storage), "export-check", inputs=out)
        check = queued.watch("check_job", "Reloading and comparing the outputs")
        if check is not None and check.status == "done" and \
                st.session_state.get("check_job:inputs") == out:
            diff, rounding = check.result
            what = "logits" if loaded.causal else "last hidden states"   # an encoder's
            st.metric(f"max |difference of the {what}| (reloaded vs in memory, weights in "
                      f"{storage.get('dtype')})", f"{diff:.2e}")
            if diff <= 1e-4:
                st.success("The reloaded model gives the same outputs.")
            else:
                st.warning("The reloaded model's outputs differ more than 1e-4.")
            if storage.get("dtype") != storage.get("compute_dtype"):
                st.caption(f"Stored in {storage.get('dtype')} (computed in "
                           f"{storage.get('compute_dtype')}): the rounding moves the {what} by "
                           f"up to {rounding:.2e}.")
        with st.expander("Model card (README.md)"):
            card = Path(out) / "README.md"
            st.markdown(card.read_text() if card.exists() else "(no model card)")
