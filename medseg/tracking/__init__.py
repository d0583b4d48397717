"""Run tracking: what a run shows while and after it trains.

The layer above ``medseg.precision``: ``loggers`` (W&B/CSV loggers, run identity), ``offline`` (the W&B file
reader), ``tables`` and ``display`` import nothing from medseg; ``layer_histograms`` (per-layer W&B histograms,
fed by ``PrecisionMonitor``), ``summary`` (end-of-run summary and charts), ``images`` (validation slices) and
``sweep`` (job results, the sweep table) sit on top. The W&B dashboards: ``dashboard`` (the workspace's sections
and panels), ``sweep_report`` (a report per sweep), ``views`` (their spec files, printing and saving),
``workspace_callback`` (made at the end of training); ``artifacts`` (dataset and model lineage) and ``case_table``
(the per-case table). ``medseg.report`` reads finished runs through ``offline`` alone.
"""
