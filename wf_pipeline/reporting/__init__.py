"""Reporting: the run report (HTML + Markdown, charts), the validation files (JSON, JUnit XML, Markdown)
and the typed run metrics (metrics.json).

Reporting reads what the stages produce; no stage imports it except to hand over results. The package
itself imports nothing, so `wf_pipeline.reporting.metrics` stays light (no matplotlib).
"""
