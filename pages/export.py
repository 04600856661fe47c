"""Export page: save a compressed model of this session to a folder and as a zip, with the
rank plan (JSON, CSV) and a model card; reload it and check the outputs match."""
import copy
import re
from pathlib import Path

import streamlit as st
import torch

from llrc_core import RankPlan, compress_
from llrc_core.export import export_info, export_model, load_compressed
from llrc_core.workflow import CompressionResult, max_logit_diff, zip_folder
from studio import common, workspace

st.title("Export")


def compressed_model(entry):
    """The compressed model of a result: kept from the Compress page, or rebuilt on a copy of
    the base model from a comparison's plan."""
    if isinstance(entry, CompressionResult):
        return entry.model, entry.plan, entry.report
    plan = RankPlan.from_dict(entry["plan"])
    model = copy.deepcopy(common.current().model)
    compress_(model, common.decomposed(entry["decomposition"]), plan)
    report = {k: v for k, v in entry.items() if k not in ("plan", "ranks")}
    return model, plan, report


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
        with st.status(f"Writing {folder} ...") as status:
            model, plan, report = compressed_model(results[choice])
            out = export_model(model, loaded.tokenizer, plan, target,
                               report={**report, "base_model": loaded.source}, force=force,
                               merged_dense=merged, dtype=loaded.source_dtype,
                               source=loaded.source_info())
            workspace.mark(out)
            st.session_state.update(export_dir=str(out), export_label=choice,
                                    export_check=None)
            status.update(label=f"Saved to {out}", state="complete")

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
            with st.spinner("Reloading ..."):
                model, _, _ = compressed_model(results[st.session_state["export_label"]])
                compute = next(model.parameters()).dtype
                reloaded, _, _ = load_compressed(out, dtype=compute)
                # the in-memory model with its weights rounded as the folder stores them
                stored = copy.deepcopy(model).to(getattr(torch, storage.get("dtype", "float32")))
                ids = common.windows()[:2, :64]
                st.session_state["export_check"] = (
                    max_logit_diff(stored.to(compute), reloaded, ids),
                    max_logit_diff(model, reloaded, ids))
        check = st.session_state.get("export_check")
        if check is not None:
            diff, rounding = check
            st.metric(f"max |logit difference| (reloaded vs in memory, weights in "
                      f"{storage.get('dtype')})", f"{diff:.2e}")
            if diff <= 1e-4:
                st.success("The reloaded model gives the same outputs.")
            else:
                st.warning("The reloaded model's outputs differ more than 1e-4.")
            if storage.get("dtype") != storage.get("compute_dtype"):
                st.caption(f"Stored in {storage.get('dtype')} (computed in "
                           f"{storage.get('compute_dtype')}): the rounding moves the logits by "
                           f"up to {rounding:.2e}.")
        with st.expander("Model card (README.md)"):
            card = Path(out) / "README.md"
            st.markdown(card.read_text() if card.exists() else "(no model card)")
