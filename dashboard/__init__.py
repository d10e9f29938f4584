"""The influence-lens dashboard (Streamlit): a thin shell over ``engine``; run ``influence-lens dashboard``."""
