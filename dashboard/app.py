"""Entry of the dashboard: ``influence-lens dashboard [--data PATH]`` runs ``streamlit run`` on this file.

Seeds the session and hands over to the page chosen in the navigation. Each page draws the status
bar itself (AppTest drops elements drawn outside the page on reruns, streamlit/streamlit#9446).
Pages live in ``views/``: a folder named ``pages/`` would also be served by Streamlit on its own,
bypassing this script after a server restart. Charts are in ``charts.py``, maths in ``engine``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` from a checkout without an install
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import state  # noqa: E402

PAGES = [
    st.Page("views/setup.py", title="Set up a run", icon=":material/tune:", default=True),
    st.Page("views/review.py", title="Review the suspects", icon=":material/grid_view:"),
    st.Page("views/detail.py", title="Sample detail", icon=":material/zoom_in:"),
    st.Page("views/recovery.py", title="Retrain and recovery", icon=":material/trending_up:"),
    st.Page("views/compare.py", title="Compare methods", icon=":material/leaderboard:"),
    st.Page("views/loop.py", title="Close the loop", icon=":material/sync:"),
    st.Page("views/export.py", title="Export", icon=":material/download:"),
    st.Page("views/why.py", title="Why it works", icon=":material/lightbulb:"),
]


st.set_page_config(page_title="influence-lens", page_icon=":material/search:", layout="wide")
# Tiny images are upscaled with nearest-neighbour; this keeps the browser from blurring them again.
st.html("<style>img { image-rendering: pixelated; }</style>")
state.warm_up()
state.init()
state.keep_run_in_url()
page = st.navigation(PAGES, position="top")  # the full width goes to the gallery
page.run()
