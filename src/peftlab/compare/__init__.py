"""Comparisons: sweep files expanded into equal-budget runs (sweep.py), run one process per point
with skip and resume (executors.py), and reports built only from run folders (report.py, with its
plots in plots.py and Markdown in summary.py)."""
