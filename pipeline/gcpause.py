"""Python's cyclic garbage collector paused over one batch of a step.

A batch of a step allocates tens of thousands of small objects (samples and their fields)
that all stay alive until the batch is handed on. With the collector running, every
young-generation collection walks them again and the growing live set keeps setting off
full collections: about 40% of the machinery's time over 10^5 rows with a trivial stage
(bench/bench_scale.py). Samples hold no reference cycles the batch needs collected, so the
collector runs once the batch is out instead of all through it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    if not gc.isenabled():  # an outer step has paused it already
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
