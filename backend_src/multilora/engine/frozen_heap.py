"""The start-up heap kept out of Python's cyclic garbage collector while an engine serves.

A full collection walks every tracked object with the GIL held, so every thread (the engine thread
launching steps too) waits for it. After start-up, torch, transformers, the model's modules and
compiled kernels are a few hundred thousand objects: on the H200 host a full collection over them
stalled a CUDA-graph thread for ~0.25 s (bench/RESULTS.md, issue 8), some forty decode steps. Python
runs one whenever the long-lived objects have grown by a quarter, which a server running for hours
does. Those objects live as long as the engine, so once it has started they are frozen (`gc.freeze`):
later collections walk only what came after. Shutdown unfreezes them, so an engine dropped in a
process that goes on (tests, notebooks) is still collected.
"""

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_start_up_heap() -> None:
    """Collects once, then moves every object alive now out of later collections' walk."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("%d start-up objects kept out of garbage collection (%.0f ms)", gc.get_freeze_count(),
                1e3 * (time.perf_counter() - start))


def unfreeze_heap() -> None:
    """Gives the frozen objects back to the collector (an engine's shutdown)."""
    gc.unfreeze()
