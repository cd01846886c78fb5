"""The backbone and head caches, reporting how long each miss waited for its load.

Only the caches' public API is used: an entry absent before `get` was loaded (or waited for
another caller's load) during it, and that `get` is what a request waited for. The caches
themselves stay free of timing; these are what the composition root builds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from service.backbones.cache import BackboneCache, LoadedBackbone
from service.heads import HeadCache, LoadedHead

LoadObserver = Callable[[float], None]  # seconds one miss waited


class LoadTimedBackboneCache(BackboneCache):
    def __init__(self, *args: Any, on_load: LoadObserver, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_load = on_load

    def get(self, name: str) -> LoadedBackbone:
        if name in self.resident_bytes():
            return super().get(name)
        started = time.perf_counter()
        loaded = super().get(name)
        self._on_load(time.perf_counter() - started)
        return loaded


class LoadTimedHeadCache(HeadCache):
    def __init__(self, *args: Any, on_load: LoadObserver, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_load = on_load

    def get(self, head_id: str) -> LoadedHead:
        if self.peek(head_id) is not None:
            return super().get(head_id)
        started = time.perf_counter()
        loaded = super().get(head_id)
        self._on_load(time.perf_counter() - started)
        return loaded
