"""Run tracking: what a run shows while and after it trains.

The layer above ``medseg.precision``: ``loggers`` (W&B/CSV loggers, run identity), ``offline`` (the W&B file
reader), ``tables`` and ``display`` import nothing from medseg; ``layer_histograms`` (per-layer W&B histograms,
fed by ``PrecisionMonitor``), ``summary`` (end-of-run summary and charts), ``images`` (validation slices) and
``sweep`` (job results, the sweep table) sit on top. ``medseg.report`` reads finished runs through ``offline`` alone.
"""
