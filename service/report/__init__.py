"""The run report: one self-contained HTML page per job (report.py, from the report.html template)."""
