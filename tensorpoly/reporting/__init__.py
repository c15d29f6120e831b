"""Results files -> the paper's tables (Markdown + LaTeX) and plots. Entry point: scripts/make_tables.py."""
