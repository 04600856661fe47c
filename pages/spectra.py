"""Spectra page: singular values per layer, cumulative energy, effective rank, heatmap, CSV."""
import pandas as pd
import streamlit as st

from llrc_core import analysis, spectra_rows
from llrc_core import figures as charts
from studio import common

st.title("Spectra")
st.caption("How much each layer's weight (in the chosen space) concentrates in few singular "
           "values: a steep spectrum compresses well.")

DECOMPS = {"svd": "SVD (weights)", "asvd": "ASVD (activation-scaled)",
           "whiten": "Whitening (SVD-LLM)", "whiten-eig": "Eigen-whitening (SVD-LLM V2)"}

with common.error_box():
    loaded = common.current()
    c1, c2, c3 = st.columns([1, 1, 1])
    method = c1.selectbox("Decomposition", list(DECOMPS), format_func=DECOMPS.get,
                          key="spectra_decomposition")
    energy = c2.slider("Energy level for 'rank needed'", 0.50, 0.999, 0.90, 0.005,
                       key="spectra_energy")
    log_y = c3.toggle("Log scale", value=True, key="spectra_log")
    dec = common.decomposed(method)      # at once when ready, else a queued job's panel

    rows = analysis.layer_rows(dec.targets, dec.spectra, energy)
    rank_col = f"rank_for_{energy:g}"
    kinds = list(dict.fromkeys(t.kind for t in dec.targets))
    pick_by = st.radio("Show", ["a module type", "chosen layers"], horizontal=True,
                       key="spectra_pick_by")
    if pick_by == "a module type":
        kind = st.selectbox("Module type", kinds, key="spectra_kind")
        names = [t.name for t in dec.targets if t.kind == kind]
    else:
        all_names = [t.name for t in dec.targets]
        names = st.multiselect("Layers", all_names, default=all_names[:3], key="spectra_layers",
                               format_func=charts.short)
    spec = {charts.short(n): dec.spectra[n].tolist() for n in names}
    cum = {charts.short(n): analysis.cumulative_energy(dec.spectra[n]).tolist() for n in names}
    left, right = st.columns(2)
    left.plotly_chart(charts.spectra(spec, log_y), key="fig_spectra")
    right.plotly_chart(charts.cumulative_energy(cum, energy), key="fig_energy")

    value = st.radio("Heatmap value", ["effective rank", f"rank for {energy:.1%} energy"],
                     horizontal=True, key="spectra_heat_value")
    col = "effective_rank" if value == "effective rank" else rank_col
    blocks, kinds_, z = analysis.block_grid(rows, col)
    left, right = st.columns(2)
    left.plotly_chart(charts.block_heatmap(blocks, kinds_, z, f"{value.capitalize()} by block "
                                           "and module type", "rank"), key="fig_heat")
    right.plotly_chart(charts.layer_bars([charts.short(r["layer"]) for r in rows],
                                         [r["effective_rank"] for r in rows],
                                         "Effective rank per layer",
                                         "effective rank exp(H(σ²)) (singular values)"),
                       key="fig_eff")

    table = pd.DataFrame(rows)
    st.dataframe(table, hide_index=True, width="stretch", height=260)
    d1, d2 = st.columns(2)
    d1.download_button("Download layer table (CSV)", table.to_csv(index=False),
                       f"layers_{method}.csv", "text/csv", key="dl_layers")
    # Deferred: the CSV (every singular value of every layer) is built only when clicked.
    d2.download_button("Download all singular values (CSV)",
                       lambda: pd.DataFrame(spectra_rows(dec)).to_csv(index=False),
                       f"spectra_{method}.csv", "text/csv", key="dl_spectra")
    st.page_link("pages/compress.py", label="Next: compress with LLRC", icon=":material/east:")
