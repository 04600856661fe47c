"""Model page: choose and load a model, choose calibration data; see parameters and targets."""
import pandas as pd
import streamlit as st

from llrc_core.counting import break_even
from studio import common, workspace

st.title("Model")
st.caption("Load a model and its calibration text. Every other page works on this model; "
           "compressions always run on a private copy.")

SOURCES = {"Demo model (MiniLM-L6 decoder, WikiText-2)": "demo",
           "MiniLM encoder (all-MiniLM-L6-v2, installed package)": "minilm",
           "Local folder": "local", "Hub id": "hub"}
CALIB = {"Local text file": "file", "Upload a file": "upload", "Hub dataset": "hub",
         "Self-generated text": "selfgen"}

with st.form("load"):
    c1, c2 = st.columns([2, 1])
    kind = c1.radio("Model source", list(SOURCES), key="model_source")
    where = c1.text_input("Folder or Hub id (for a local folder or a Hub id)", key="model_path",
                          placeholder="/path/to/model or gpt2")
    device = c2.selectbox("Device", common.device_options(), key="device")
    dtype = c2.selectbox("Dtype", ["auto", "float32", "bfloat16", "float16"], key="dtype")
    st.markdown("**Calibration data**")
    c3, c4 = st.columns([2, 1])
    default_calib = 0 if common.WIKI_VALID.exists() else 3
    ckind = c3.radio("Calibration source", list(CALIB), index=default_calib, key="calib_kind",
                     horizontal=True)
    cpath = c3.text_input("Local text file (.txt, .jsonl, .json or a folder)",
                          value=str(common.WIKI_VALID), key="calib_path")
    upload = c3.file_uploader("Upload (.txt, .jsonl, .json)", type=["txt", "jsonl", "json"],
                              key="calib_upload")
    dataset = c3.selectbox("Hub dataset (needs network access)", ["wikitext2", "c4"],
                           key="calib_dataset")
    n_samples = c4.number_input("Windows", 1, 1024, common.DEFAULT_CALIB["n_samples"],
                                key="n_samples")
    seq_len = c4.number_input("Tokens per window", 8, 4096, common.DEFAULT_CALIB["seq_len"],
                              key="seq_len")
    submitted = st.form_submit_button("Load model", type="primary")
st.caption("Local folders and files are read only from: "
           + ", ".join(f"`{r}`" for r in workspace.allowed_roots()) + ".")

with common.error_box():
    if submitted:
        source = {"demo": str(common.DEMO), "minilm": "minilm", "local": where.strip(),
                  "hub": where.strip()}[SOURCES[kind]]
        if not source:
            raise ValueError("enter a folder or a Hub id in the text box, or pick the demo model")
        calib = {"kind": CALIB[ckind], "path": cpath, "dataset": dataset,
                 "n_samples": n_samples, "seq_len": seq_len}
        if calib["kind"] == "upload":
            if upload is None:
                raise ValueError("choose a file to upload, or pick another calibration source")
            calib["path"] = common.upload_path(upload)
        with st.status(f"Loading {source} ...", expanded=False) as status:
            common.load_into_session(source, device, dtype, calib)
            status.update(label="Model loaded", state="complete")

    loaded = common.current()
    summary = common.param_summary()
    calib = st.session_state["calib"]
    st.subheader(f"{loaded.source}")
    m = st.columns(5)
    m[0].metric("Parameters", f"{summary['total'] / 1e6:.2f} M")
    m[1].metric("In target layers", f"{summary['linear'] / 1e6:.2f} M",
                f"{summary['linear'] / summary['total']:.0%} of the model", delta_color="off")
    m[2].metric("Target layers", summary["layers"])
    m[3].metric("Load time", f"{loaded.seconds:.1f} s")
    m[4].metric("Device / dtype", f"{loaded.device.type} / {str(loaded.dtype)[6:]}")
    w = common.windows()
    st.caption(f"Calibration: {calib['kind']} `{calib['source']}` -> {w.shape[0]} windows x "
               f"{w.shape[1]} tokens.")
    rows = [{"layer": t.name, "block": t.block, "module type": t.kind, "out (m)": t.m,
             "in (n)": t.n, "parameters": t.m * t.n, "break-even rank": break_even(t.m, t.n)}
            for t in common.targets()]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", height=300)
    st.page_link("pages/spectra.py", label="Next: look at the spectra", icon=":material/east:")
