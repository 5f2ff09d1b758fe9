"""How this process page-locks host memory on a GPU: pages registered from several threads
(malloc + cudaHostRegister), not allocated by the driver (cudaHostAlloc), unless the operator chose.

Adapter host images (lora/adapter_slot_weights.py) are pinned while adapters load beside the running
batch, so how a block is pinned is what a cold adapter costs that batch. Measured on the H200 host
(bench/RESULTS.md, issue 8): a fresh 84 MiB block took ~85 ms through cudaHostAlloc, and a CUDA-graph
step on another thread stalled up to ~74 ms beside it (434 ms beside a fresh rank-64 image); registered
from 8 threads it took 16-27 ms, and the step stalled at most 12-22 ms (44 ms beside the rank-64 image).
torch's pinned cache reuses freed blocks either way.
"""

import logging
import os

import torch

logger = logging.getLogger(__name__)

REGISTERED_PINNING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"
_ENV = "PYTORCH_CUDA_ALLOC_CONF"


def register_pinned_pages() -> None:
    """Makes torch pin host blocks by registering their pages (once per process, before the first
    pinned allocation); a `pinned_*` setting in PYTORCH_CUDA_ALLOC_CONF is the operator's and stays."""
    if "pinned_" in os.environ.get(_ENV, ""):
        logger.info("host memory pinned as %s asks (%s)", _ENV, os.environ[_ENV])
        return
    torch.cuda.memory._set_allocator_settings(REGISTERED_PINNING)
