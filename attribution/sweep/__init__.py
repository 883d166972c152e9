"""Nightly sweeps: score the corpus shards not yet swept against standing queries, keep a merged top-k.

One module per job: ``settings`` (the sweep group of the config), ``lock`` (one sweep per
output directory), ``shards`` (discovery, content fingerprints, what tonight must score),
``identity`` (model / factor / query / settings fingerprints that define a table),
``state`` (the JSON state file beside the output), ``merge`` (top-k of kept + new rows) and
``workflow`` (the night).
"""

from attribution.sweep.lock import SweepLock, SweepLocked
from attribution.sweep.settings import SweepSettings
from attribution.sweep.workflow import SweepError, SweepSummary, run_sweep

__all__ = ["SweepError", "SweepLock", "SweepLocked", "SweepSettings", "SweepSummary", "run_sweep"]
