"""LLRC Studio: ``streamlit run app.py``. The entry file only routes; pages live in pages/."""
import streamlit as st

from studio.common import session_id

st.set_page_config(page_title="LLRC Studio", page_icon=":material/compress:", layout="wide")

PAGES = [
    st.Page("pages/model.py", title="Model", icon=":material/memory:", default=True),
    st.Page("pages/spectra.py", title="Spectra", icon=":material/show_chart:"),
    st.Page("pages/compress.py", title="Compress", icon=":material/compress:"),
    st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
    st.Page("pages/export.py", title="Export", icon=":material/download:"),
    st.Page("pages/playground.py", title="Playground", icon=":material/chat:"),
]

st.sidebar.markdown("**LLRC Studio**  \nlow-rank compression with learned rank selection")
session_id()        # kept in the URL: a reload, or a restarted server, finds this session's folder
st.navigation(PAGES).run()
