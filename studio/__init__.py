"""The Streamlit app's shared helpers (the pages in ``pages/`` stay thin): ``common`` (cached
model, session state, error box, paths), ``charts`` (plotly figures, no Streamlit) and
``forms`` (widgets for a selector's config)."""
