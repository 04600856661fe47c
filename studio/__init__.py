"""The Streamlit app's shared helpers (the pages in ``pages/`` stay thin): ``common`` (cached
model, session state, error box, paths) and ``forms`` (widgets for a selector's config). The
plotly figures are ``llrc_core.figures`` (shared with the HTML report of ``llrc compare``)."""
