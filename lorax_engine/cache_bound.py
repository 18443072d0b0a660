"""The disk cache's size bound (``$LORAX_DISK_CACHE_GB``, analysis/disk_budget.py) kept while a transfer runs.

A cold SD1.5 -> SDXL transfer writes about 4.5 GB of bases: trimming only after a successful run lets the cache
overshoot its bound by that much meanwhile, and forever when the run fails or is cancelled. :class:`DiskBound`
wraps the transfer's ``should_stop`` hook (which the engine calls after every basis): whenever new bases were
written it trims at most once per :data:`TRIM_INTERVAL` seconds, least recently used first (the run's own new entries go
last), and once more when the run ends, however it ends (use it as a context manager).
"""
from __future__ import annotations

import time
from collections.abc import Callable

TRIM_INTERVAL = 1.0     # seconds between trims while bases are written (one trim scans the cache folder: ~ms)


class DiskBound:
    """A ``should_stop`` hook for the engine that keeps ``cache``'s disk use within its bound during the run,
    then calls ``should_stop`` (if any) and returns what it returns."""

    def __init__(self, cache, should_stop: Callable[[], bool] | None = None):
        self.cache = cache
        self.should_stop = should_stop
        self._computed = cache.stats.computed
        self._last = time.monotonic()

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.cache.stats.computed != self._computed and now - self._last >= TRIM_INTERVAL:
            self.trim()
        return bool(self.should_stop()) if self.should_stop is not None else False

    def trim(self):
        self._computed, self._last = self.cache.stats.computed, time.monotonic()
        self.cache.trim_disk()

    def __enter__(self) -> DiskBound:
        return self

    def __exit__(self, *exc):
        self.trim()
