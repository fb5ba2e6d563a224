"""evaluate.py's work: the data, the variant grid, one module per task, the reports."""
