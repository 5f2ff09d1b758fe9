"""TensorParallelRunner: the model runner of a model split over several devices, in worker processes.

It stands where the ModelRunner stands in the engine (same `execute` and
`write_adapter`), and holds no device memory: it spawns one worker process per
device (engine/tp_worker.py, torch.multiprocessing "spawn") and drives them all.
The scheduler, the adapter pool and the step inputs stay single, in the engine
process: each step is built here on the CPU (StepInputBuilder) and sent to every
worker as a few KB of records; each adapter is cut here into every rank's part
(its host image, built on a shapes-only "meta" copy of that rank's model) and sent
through shared memory. Rank 0 samples; its ids come back through its pipe, one
answer per step, so async scheduling keeps working: `execute` returns at once and
the ids are read when the engine asks for them.

Supervision: every wait on the workers also watches their process sentinels and has
a timeout, so a worker that dies (or stops answering) raises WorkerFailedError
within moments, never a hang; the other workers are then killed (they may be stuck
in a collective with the dead one) and every later call raises the same error.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from multiprocessing.connection import wait
from typing import Optional

import torch
import torch.multiprocessing as mp

from multilora.config import EngineConfig
from multilora.engine.model_runner import resolve_dtype
from multilora.engine.scheduler import ScheduledBatch
from multilora.engine.sequence import Sequence
from multilora.engine.step_inputs import SampledTokens, StepInputBuilder
from multilora.engine.tp_worker import WorkerInfo, worker_main
from multilora.errors import WorkerFailedError
from multilora.model.loader import build_skeleton
from multilora.sampler import SampleRow
from multilora.tensor_parallel import TensorParallel

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 1800     # loading a 70B checkpoint and capturing CUDA graphs takes minutes
STEP_TIMEOUT_S = 300       # a step may compile Triton kernels for new shapes; a hung worker is caught after this
_STOP_TIMEOUT_S = 10


class TensorParallelRunner:
    def __init__(self, config: EngineConfig, hf_config, max_model_len: int):
        self.config, self.size = config, config.tensor_parallel_size
        self.device = torch.device("cpu")       # where this process's step inputs live
        self.failure: Optional[str] = None
        self._check_devices()
        # Built before any worker starts: a model that cannot be split fails here, with its reason.
        self.dtype = resolve_dtype(config, hf_config, torch.device(self._device_type()))   # the workers' too
        self._skeletons = self._rank_skeletons(hf_config)
        self._dir = tempfile.mkdtemp(prefix="multilora-tp-")
        self._processes, self._conns = self._spawn(max_model_len)
        self._finalizer = weakref.finalize(self, _stop_workers, self._processes, self._conns, self._dir)
        info: WorkerInfo = self._start_up()
        self.num_kv_blocks, self.on_gpu, self._graph_sizes = info.num_kv_blocks, info.on_gpu, info.graph_sizes
        self.inputs = StepInputBuilder(
            max_decode_rows=config.max_num_seqs, max_prefill_tokens=config.max_num_batched_tokens,
            max_seqs=config.max_num_seqs, max_blocks_per_seq=-(-max_model_len // config.block_size),
            block_size=config.block_size, scratch_block=self.num_kv_blocks, device=self.device, exports=True)
        self._sent = self._received = 0         # steps sent; answers read
        self._answers: dict[int, list[int]] = {}
        self._uploads: list[tuple[str, float]] = []     # rank 0's finished adapter writes, not yet taken

    # ---- start-up -------------------------------------------------------
    def _device_type(self) -> str:
        # Without touching CUDA here: this process holds no device memory.
        name = self.config.device
        return "cuda" if name.startswith("cuda") or (name == "auto" and torch.cuda.is_available()) else "cpu"

    def _check_devices(self) -> None:
        if self._device_type() != "cuda":
            return
        first = 0 if self.config.device in ("auto", "cuda") else torch.device(self.config.device).index
        if first + self.size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {self.size} from GPU {first} needs {first + self.size} GPUs; "
                             f"{torch.cuda.device_count()} are visible (CUDA_VISIBLE_DEVICES)")

    def _rank_skeletons(self, hf_config) -> list:
        """Each rank's model as shapes only, with its adapter-slot layout: what cuts adapters into parts."""
        skeletons = []
        for rank in range(self.size):
            model = build_skeleton(hf_config, self.dtype, torch.device("meta"), TensorParallel(rank, self.size))
            if self.config.enable_lora:
                model.enable_lora(self.config.max_loras, self.config.max_lora_rank)
            skeletons.append(model)
        return skeletons

    def _spawn(self, max_model_len: int):
        context = mp.get_context("spawn")
        processes, conns = [], []
        for rank in range(self.size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main, name=f"multilora-tp-{rank}", daemon=True,
                args=(rank, self.config, max_model_len, f"{self._dir}/store", theirs, torch.get_num_threads()))
            process.start()
            theirs.close()
            processes.append(process)
            conns.append(ours)
        return processes, conns

    def _start_up(self) -> WorkerInfo:
        try:
            infos = [self._receive(rank, "ready", START_TIMEOUT_S, "to start")[0] for rank in range(self.size)]
        except WorkerFailedError:
            raise RuntimeError(f"the tensor-parallel workers could not start: {self.failure}") from None
        logger.info("Tensor parallelism: %d workers (pids %s) ready, %d KV blocks each", self.size,
                    [p.pid for p in self._processes], infos[0].num_kv_blocks)
        return infos[0]

    # ---- the runner's interface (as ModelRunner's) ------------------------
    def write_adapter(self, adapter_slot: int, adapter) -> None:
        """Sends every rank its part of `adapter` for `adapter_slot`; the worker uploads it before its next step."""
        for conn, skeleton in zip(self._conns, self._skeletons):
            # The image is cached with the adapter: its memory is shared with the workers once.
            image = skeleton.adapter_slot_weights.host_image(adapter)
            self._send(conn, ("write", adapter_slot, image, adapter.name))

    def stage_adapter(self, adapter) -> None:
        """Cuts `adapter` into every rank's part now, on the calling thread (as ModelRunner.stage_adapter)."""
        if self.config.enable_lora:
            for skeleton in self._skeletons:
                skeleton.adapter_slot_weights.host_image(adapter)

    def finished_adapter_uploads(self) -> list[tuple[str, float]]:
        """(adapter name, seconds on rank 0's device) of each write rank 0 reported finished since the last call."""
        finished, self._uploads = self._uploads, []
        return finished

    def execute(self, batch: ScheduledBatch, adapter_slots: list[int], sample_rows: list[Optional[SampleRow]],
                sources: Optional[dict[Sequence, int]] = None) -> SampledTokens:
        """Builds the step and sends it to every worker; the ids are read from rank 0 when asked for."""
        num_decode = sum(1 for n in batch.num_new_tokens if n == 1)
        step = self.inputs.build(batch, adapter_slots, [row is not None for row in sample_rows],
                                 self._decode_size(num_decode), sources)
        records = self.inputs.export(step)
        rows = [sample_rows[i] for i in step.sample_order]
        for rank, conn in enumerate(self._conns):
            self._send(conn, ("step", records, adapter_slots, rows if rank == 0 else None))
        self._sent += 1
        return _WorkerTokens(step.sample_order, len(sample_rows), self, self._sent - 1)

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def check_health(self) -> None:
        """Raises WorkerFailedError if a worker has died (the engine asks between steps, and when idle)."""
        self._raise_if_failed()
        for rank, process in enumerate(self._processes):
            if not process.is_alive():
                self._fail(self._death_of(rank))

    def _death_of(self, rank: int) -> str:
        """Why worker `rank` ended: the error it sent last, else its exit code."""
        conn = self._conns[rank]
        try:
            while conn.poll():
                message = conn.recv()
                if message[0] == "error":
                    return message[1]
        except (EOFError, OSError):
            pass
        process = self._processes[rank]
        return f"worker {rank} (pid {process.pid}) exited with code {process.exitcode}"

    def shutdown(self) -> None:
        """Stops the workers (asks, then kills what is left); the runner can run nothing after."""
        self._finalizer()

    # ---- talking to the workers -------------------------------------------
    def _decode_size(self, num_decode: int) -> int:
        """The workers' decode batch: padded up to a captured CUDA-graph size when there is one."""
        sizes = self._graph_sizes or []
        return next((s for s in sizes if s >= num_decode), num_decode) if num_decode else 0

    def tokens_of(self, step: int) -> list[int]:
        """Step `step`'s sampled ids, from rank 0 (answers come in step order)."""
        while self._received <= step:
            ids, uploads = self._receive(0, "tokens", STEP_TIMEOUT_S, "to answer a step")
            self._answers[self._received] = ids
            self._uploads += uploads
            self._received += 1
        for old in [s for s in self._answers if s < step]:     # steps nobody asked about
            del self._answers[old]
        return self._answers.pop(step)

    def _send(self, conn, message) -> None:
        self._raise_if_failed()
        try:
            conn.send(message)
        except OSError as e:     # a worker gone: its sentinel says why
            self.check_health()
            self._fail(f"a worker stopped reading its messages ({e})")

    def _receive(self, rank: int, kind: str, timeout: float, doing: str):
        """The next message of `kind` from worker `rank`, without its kind; watches every worker meanwhile."""
        self._raise_if_failed()
        conn = self._conns[rank]
        while True:
            ready = wait([conn, *(p.sentinel for p in self._processes)], timeout)
            if not ready:
                self._fail(f"worker {rank} took more than {timeout:.0f} s {doing}")
            if conn in ready:
                try:
                    message = conn.recv()
                except EOFError:         # it died: check_health says how
                    self.check_health()
                    self._fail(self._death_of(rank))
                if message[0] == "error":
                    self._fail(message[1])
                if message[0] != kind:
                    self._fail(f"worker {rank} sent {message[0]!r} where {kind!r} was expected")
                return message[1:]
            self.check_health()         # a sentinel: a worker ended

    def _raise_if_failed(self) -> None:
        if self.failure is not None:
            raise WorkerFailedError(self._message())

    def _fail(self, reason: str):
        self.failure = reason
        logger.error("Tensor parallelism failed, killing every worker: %s", reason)
        if self._finalizer.detach() is not None:     # the others may wait in a collective with the dead one
            _stop_workers(self._processes, self._conns, self._dir, ask=False)
        raise WorkerFailedError(self._message())

    def _message(self) -> str:
        return ("a tensor-parallel worker of the model failed, so this server can run no more requests; "
                "retry on another instance (the server's log says what happened)")


class _WorkerTokens(SampledTokens):
    """A step's sampled ids still with rank 0's worker; `values()` reads them from its pipe."""

    def __init__(self, order: list[int], batch_size: int, runner: TensorParallelRunner, step: int):
        super().__init__(order, batch_size, torch.empty(0, dtype=torch.long), None)
        self._runner, self._step = runner, step
        self._values: Optional[list[int]] = None

    def values(self) -> list[int]:
        if self._values is None:
            self._values = self._runner.tokens_of(self._step)
        return self._values


def _stop_workers(processes, conns, directory: str, ask: bool = True) -> None:
    """Asks every worker to stop (unless not `ask`), waits a little, kills the rest; frees the pipes and
    the store."""
    if ask:
        for conn in conns:
            try:
                conn.send(("stop",))
            except OSError:
                pass
        for process in processes:
            process.join(_STOP_TIMEOUT_S / len(processes))
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    for conn in conns:
        conn.close()
    shutil.rmtree(directory, ignore_errors=True)
