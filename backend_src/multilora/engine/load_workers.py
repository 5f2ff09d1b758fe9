"""AdapterLoadWorkers: adapter loads in worker processes, so their Python never takes the engine's GIL.

A load (read the safetensors file, check names, shapes and numbers, lay the weights
out like a GPU slot) is CPU work with a lot of Python in it. On a preparing thread of
the engine's process it holds the GIL for part of its time, which slows every step
it overlaps (bench/RESULTS.md, issue 8: the time per token of running requests while
adapters load was 1.7-2.6x the warm one) and lets only one load run at a time. Here
each load runs in a worker process (torch.multiprocessing "spawn", like the
tensor-parallel workers) with its own interpreter: it returns the adapter's host
image, laid out like the slot by a shapes-only ("meta") copy of the model, through
shared memory (built there: no copy), and an adapter record without weights. The engine's
process then only copies the image into pinned memory (one copy, without the GIL):
`ModelRunner.adopt_image`. Opt-in (`adapter_load_workers`, default 0): on the H200 host, part C
of issue 8 ran at 1.55x the warm time per token while adapters loaded with 2 workers against
1.73x on the preparing threads, but each load took ~2x as long, and part B's throughput fell
(bench/RESULTS.md, 2026-12-02); that run's workers still copied each image into shared memory.

A worker's errors cross back as they are raised (the typed `multilora.errors`, whose
messages never show paths). A worker that dies (killed, out of memory) breaks the
pool, and with it every load in flight: the workers are started afresh and each of
those loads is tried once more; a load whose workers die twice fails its requests
alone with AdapterLoadFailedError (not remembered: the next request tries again).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
import torch.multiprocessing as mp

from multilora.errors import AdapterLoadFailedError
from multilora.lora.adapter import LoRAAdapter, LoRAModelSpec, load_adapter
from multilora.lora.request import LoRARequest

logger = logging.getLogger(__name__)

_ATTEMPTS = 2     # a load whose worker died is tried once more, in fresh workers

_worker = None      # in a worker process: (model spec, max rank, dtype, the slot layout)


class AdapterLoadWorkers:
    def __init__(self, hf_config, dtype: torch.dtype, max_lora_rank: int, num_workers: int,
                 layout: tuple[int, int]):
        """`layout`: (header_bytes, row_bytes) of the engine's slots, which the workers' images must match."""
        assert num_workers >= 1, num_workers
        self.num_workers = num_workers
        self._args = (hf_config, dtype, max_lora_rank, layout)
        self._lock = threading.Lock()
        self._pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        pool = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker, initargs=self._args)
        for _ in range(self.num_workers):
            pool.submit(_ready)         # start the workers now: a first load would wait for their imports
        return pool

    def load(self, lora_request: LoRARequest) -> tuple[LoRAAdapter, torch.Tensor]:
        """(the adapter without its weights, its host image in shared memory); raises what the load raised."""
        for attempt in range(_ATTEMPTS):
            with self._lock:
                pool = self._pool
            try:
                return pool.submit(_load, lora_request).result()
            except BrokenProcessPool:
                # One dead worker breaks the whole pool and every load in it: start a fresh one, and try once
                # more, since the death may have been another load's.
                logger.error("An adapter load worker died while adapter '%s' was being read; starting the load "
                             "workers again", lora_request.lora_name)
                with self._lock:
                    if self._pool is pool:
                        self._pool = self._start()
        raise AdapterLoadFailedError(
            f"adapter '{lora_request.lora_name}' could not be loaded (its loading process died twice); retry, or ask "
            "the operator to check the server log")

    def shutdown(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(hf_config, dtype: torch.dtype, max_lora_rank: int, layout: tuple[int, int]) -> None:
    global _worker
    from multilora.model.loader import build_skeleton

    torch.set_num_threads(1)        # one core per load: the engine's threads keep theirs
    slots = build_skeleton(hf_config, dtype, torch.device("meta")).enable_lora(1, max_lora_rank)
    if (slots.header_bytes, slots.row_bytes) != tuple(layout):
        raise RuntimeError(f"the load workers' slot layout {(slots.header_bytes, slots.row_bytes)} differs from "
                           f"the engine's {tuple(layout)}")
    _worker = (LoRAModelSpec.from_hf_config(hf_config), max_lora_rank, dtype, slots)


def _ready() -> None:
    """Nothing: submitted once per worker at start, so each imports and builds its layout before a load."""


def _load(lora_request: LoRARequest) -> tuple[LoRAAdapter, torch.Tensor]:
    spec, max_lora_rank, dtype, slots = _worker
    adapter = load_adapter(lora_request, spec, max_lora_rank, dtype=dtype)
    image = slots.shared_image(adapter)        # sent as a handle to its shared memory, not as bytes
    return LoRAAdapter(adapter.name, adapter.adapter_id, adapter.rank, {}), image
