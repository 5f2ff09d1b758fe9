"""One tensor-parallel worker process: a ModelRunner on its part of the model, driven by the engine.

Spawned and supervised by engine/tp_runner.py, one per device. It joins the
process group (gloo on CPUs, NCCL on GPUs, NVLink multicast off), builds its
ModelRunner (whose CUDA graphs capture the collectives), reports ("ready",
WorkerInfo), then follows the engine's messages in order:

    ("write", adapter_slot, host image, name)   this rank's part of an adapter, into its slot
    ("step", StepRecords, adapter_slots, rows)  one step; rows: the SampleRows (rank 0 only, else None)
    ("stop",)

Rank 0 answers every step with ("tokens", ids, uploads): uploads are the (adapter name,
seconds) of its adapter writes finished since (AdapterSlotWeights.take_finished_uploads). It launches a step as soon as
it arrives and answers the one before as soon as its ids are on the host, so
the GPU is never idle waiting for the pipe. Any failure is sent as
("error", text) and ends the process; so does the end of the engine process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from multilora.config import EngineConfig
from multilora.engine.model_runner import ModelRunner, resolve_device
from multilora.engine.step_inputs import SampledTokens
from multilora.model.loader import load_hf_config
from multilora.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)

# A collective left waiting this long raises (gloo) or aborts the process (NCCL's watchdog). The
# engine kills its workers long before, as soon as one dies; this only bounds a worker left alone.
COLLECTIVE_TIMEOUT_S = 600
_POLL_S = 0.0002          # rank 0, with a step in flight: how often it looks for the next message
_PARENT_CHECK_S = 1.0


@dataclass(frozen=True)
class WorkerInfo:
    """What the engine learns from its workers at start-up (rank 0's; every rank agrees)."""

    num_kv_blocks: int
    graph_sizes: Optional[list[int]]
    on_gpu: bool


def worker_main(rank: int, config: EngineConfig, max_model_len: int, store_path: str, conn,
                num_threads: int) -> None:
    """The worker's entry point (spawned): runs until ("stop",), a failure, or the engine's end."""
    _exit_with_parent(os.getppid())
    try:
        torch.set_num_threads(num_threads)
        runner = _start(rank, config, max_model_len, store_path)
        conn.send(("ready", WorkerInfo(runner.num_kv_blocks, runner.graph_sizes, runner.on_gpu)))
        _serve(runner, conn)
    except EOFError:        # the engine is gone
        os._exit(1)
    except BaseException:
        try:
            conn.send(("error", f"tensor-parallel rank {rank}: {traceback.format_exc()}"))
        except OSError:
            pass
        os._exit(1)         # a clean exit could wait on collectives with a dead peer
    dist.destroy_process_group()
    logging.shutdown()
    os._exit(0)             # the memory goes with the process; tearing down torch's interpreter takes seconds


def _start(rank: int, config: EngineConfig, max_model_len: int, store_path: str) -> ModelRunner:
    tp = TensorParallel(rank, config.tensor_parallel_size)
    device = resolve_device(config, rank)
    if device.type == "cuda":
        os.environ["NCCL_NVLS_ENABLE"] = "0"      # NVLink multicast (NVLS) off, as issue 10 requires
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store_path}",
                            rank=rank, world_size=tp.size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            device_id=device if device.type == "cuda" else None)
    return ModelRunner(config, load_hf_config(config.model), max_model_len, tp)


def _serve(runner: ModelRunner, conn) -> None:
    pending: Optional[SampledTokens] = None      # rank 0: a launched step whose ids are not sent yet
    while True:
        if pending is not None and (pending.ready is None or pending.ready.query()):
            _answer(runner, conn, pending)
            pending = None
        if pending is not None and not conn.poll(_POLL_S):
            continue
        message = conn.recv()
        if message[0] == "stop":
            return
        if message[0] == "write":
            runner.model.adapter_slot_weights.upload_image(*message[1:])
            continue
        _, records, adapter_slots, rows = message
        if runner.lora_layers:
            runner.model.adapter_slot_weights.wait_for_uploads(adapter_slots)   # as ModelRunner.execute does
        tokens = runner.run(runner.inputs.load(records), rows, len(records.step.sample_order))
        if runner.tp.is_first:
            if pending is not None:     # answers go in step order
                _answer(runner, conn, pending)
            pending = tokens


def _answer(runner: ModelRunner, conn, tokens: SampledTokens) -> None:
    conn.send(("tokens", tokens.values(), runner.finished_adapter_uploads()))


def _exit_with_parent(parent: int) -> None:
    """Ends this process soon after the engine's (a SIGKILLed engine leaves no worker behind)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(_PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="multilora-tp-parent-watch", daemon=True).start()
