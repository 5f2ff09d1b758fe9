"""ModelRunner: the one owner of the device: model weights, KV cache, adapter slot weights.

Each step the StepInputBuilder writes the scheduled batch into persistent buffers
(token ids, positions, block tables, the token-to-adapter-slot mapping); the
runner runs the decode rows (through a CUDA graph when it can) and the prefill
chunks as two forwards, and samples one token for every sequence whose prompt
is fully computed. Under tensor parallelism one ModelRunner runs in each worker
process (engine/tp_worker.py) on its part of the model (`tp`); rank 0 samples and
broadcasts the ids, so every rank feeds them to the next step.
"""

import logging
from typing import Optional

import torch

from multilora.config import EngineConfig
from multilora.engine.cuda_graph import DecodeGraphs
from multilora.engine.pinned_memory import register_pinned_pages
from multilora.engine.scheduler import ScheduledBatch
from multilora.engine.sequence import Sequence
from multilora.engine.step_inputs import SampledTokens, StepInputBuilder, StepInputs
from multilora.lora.mapping import LoRAVariant, lora_step
from multilora.model.attention import AttentionMetadata
from multilora.model.loader import build_model
from multilora.sampler import Sampler, SampleRow
from multilora.sampling_params import SamplingParams
from multilora.tensor_parallel import SINGLE, TensorParallel
from multilora_kernels.lora import LoRAMeta, build_lora_meta

logger = logging.getLogger(__name__)

_ACTIVATION_RESERVE_BYTES = 2 << 30    # headroom on the GPU for activations and logits


def resolve_device(config: EngineConfig, rank: int = 0) -> torch.device:
    """The device of tensor-parallel rank `rank`, with an index for CUDA (torch.cuda.set_device needs one):
    ranks take consecutive GPUs from the configured one (cuda = the current one, cuda:N = N)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        first = torch.cuda.current_device() if device.index is None else device.index
        device = torch.device("cuda", first + rank)
    return device


def resolve_dtype(config: EngineConfig, hf_config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cpu":
        return torch.float32                       # half precision is slow and inexact on CPUs
    checkpoint = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint, str):
        checkpoint = getattr(torch, checkpoint, None)
    return checkpoint if checkpoint in (torch.float16, torch.bfloat16) else torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, max_model_len: int, tp: TensorParallel = SINGLE):
        self.config, self.tp = config, tp
        self.device = resolve_device(config, tp.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)    # weights, KV cache and CUDA graphs all on this GPU
            register_pinned_pages()               # before the first pinned buffer: see pinned_memory.py
        self.dtype = resolve_dtype(config, hf_config, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(hf_config, config.model, self.dtype, self.device, config.load_format, tp)
        self.lora_layers = self.model.lora_layers() if config.enable_lora else {}
        for layer in self.lora_layers.values():
            layer.enable_lora(config.max_loras, config.max_lora_rank)
        self.num_kv_blocks = tp.min(self._measure_kv_blocks(hf_config, max_model_len), self.device)
        self.kv_caches = self._allocate_kv_caches(hf_config)
        self.sampler = Sampler()
        if self.on_gpu and self.tp.is_first:
            self._warm_up_sampler(hf_config.vocab_size)
        self.inputs = StepInputBuilder(
            max_decode_rows=config.max_num_seqs, max_prefill_tokens=config.max_num_batched_tokens,
            max_seqs=config.max_num_seqs, max_blocks_per_seq=-(-max_model_len // config.block_size),
            block_size=config.block_size, scratch_block=self.num_kv_blocks, device=self.device)
        self.decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.decode_graphs = DecodeGraphs(self.decode_forward, max_batch=min(config.max_num_seqs, 256),
                                              with_lora=bool(self.lora_layers))

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def graph_sizes(self) -> Optional[list[int]]:
        """The decode batch sizes captured as CUDA graphs (None: eager)."""
        return self.decode_graphs.sizes if self.decode_graphs is not None else None

    def check_health(self) -> None:
        """Raises if the runner can run no more steps: never, on one device (see TensorParallelRunner)."""

    def shutdown(self) -> None:
        """Nothing to stop on one device: the memory goes with the runner."""

    # ---- start-up -------------------------------------------------------
    def _warm_up_sampler(self, vocab_size: int) -> None:
        """Compiles the sampler's Triton kernels now rather than in the first sampled step. One seeded
        row: torch's default generator, which unseeded rows draw from, is left as it was."""
        logits = torch.zeros(1, vocab_size, dtype=self.dtype, device=self.device)
        self.sampler(logits, [SampleRow(SamplingParams(temperature=1.0, top_k=50, top_p=0.9), step_seed=0)])

    def _kv_shape(self, hf_config, num_blocks: int) -> tuple[int, ...]:
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        kv_heads = self.tp.kv_heads(hf_config.num_key_value_heads).size     # this rank's
        return (2, num_blocks, self.config.block_size, kv_heads, head_dim)

    def _measure_kv_blocks(self, hf_config, max_model_len: int) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        block_bytes = hf_config.num_hidden_layers * torch.Size(self._kv_shape(hf_config, 1)).numel() * self.dtype.itemsize
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.gpu_memory_utilization) * total - _ACTIVATION_RESERVE_BYTES
        else:
            budget = self.config.cpu_kv_cache_gib * (1 << 30)
        # Never more than every sequence at full length needs.
        most = self.config.max_num_seqs * -(-max_model_len // self.config.block_size)
        blocks = min(int(budget // block_bytes), most)
        if blocks < 1:
            raise ValueError("no memory left for the KV cache; raise gpu_memory_utilization, set num_kv_blocks, "
                             "or use a smaller model")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, self.config.block_size,
                    blocks * block_bytes / (1 << 30))
        return blocks

    def _allocate_kv_caches(self, hf_config) -> list[torch.Tensor]:
        # One block more than the block manager hands out: the scratch block that padded
        # rows of a CUDA-graph batch write into.
        shape = self._kv_shape(hf_config, self.num_kv_blocks + 1)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(hf_config.num_hidden_layers)]

    # ---- adapters -------------------------------------------------------
    def write_adapter(self, adapter_slot: int, adapter) -> None:
        """Makes GPU adapter slot `adapter_slot` hold `adapter` in every LoRA layer (modules it does not
        target: zero): one copy of its pinned host image, queued on a side stream (see AdapterSlotWeights)."""
        self.model.adapter_slot_weights.upload(adapter_slot, adapter)

    def stage_adapter(self, adapter) -> None:
        """Builds `adapter`'s pinned host image now, on the calling thread (the engine loads adapters off
        its own thread), so its first write costs the engine thread only the copy's launch."""
        if self.lora_layers:
            self.model.adapter_slot_weights.host_image(adapter)

    def adopt_image(self, adapter, image) -> None:
        """Takes `adapter`'s host image as a load worker built it (AdapterLoadWorkers), on the calling thread."""
        self.model.adapter_slot_weights.adopt_image(adapter, image)

    @property
    def adapter_slot_layout(self) -> tuple[int, int]:
        """(header bytes, bytes per rank row) of an adapter slot: what a load worker's images must match."""
        slots = self.model.adapter_slot_weights
        return slots.header_bytes, slots.row_bytes

    def finished_adapter_uploads(self) -> list[tuple[str, float]]:
        """(adapter name, seconds on the device) of each write completed since the last call; never waits."""
        return self.model.adapter_slot_weights.take_finished_uploads() if self.lora_layers else []

    # ---- one step -------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, adapter_slots: list[int], sample_rows: list[Optional[SampleRow]],
                sources: Optional[dict[Sequence, int]] = None) -> SampledTokens:
        """Launches the batch; returns its sampled ids on their way to the host (-1 where sampling failed).

        `sources`: see StepInputBuilder.build (sequences whose last token the previous step sampled).
        """
        if self.lora_layers:
            self.model.adapter_slot_weights.wait_for_uploads(adapter_slots)   # prefetched copies: only now
        num_decode = sum(1 for n in batch.num_new_tokens if n == 1)
        graphs = self.decode_graphs
        use_graph = graphs is not None and 0 < num_decode <= graphs.max_batch
        step = self.inputs.build(batch, adapter_slots, [row is not None for row in sample_rows],
                                 graphs.size_for(num_decode) if use_graph else num_decode, sources)
        return self.run(step, [sample_rows[i] for i in step.sample_order], len(sample_rows))

    @torch.inference_mode()
    def run(self, step: StepInputs, rows: list[SampleRow], batch_size: int) -> SampledTokens:
        """Runs a step whose inputs are in the builder's buffers; `rows`: the sampled rows' SampleRows in
        sample order (only rank 0 samples: other ranks may pass None)."""
        graphs = self.decode_graphs
        use_graph = graphs is not None and 0 < step.num_decode <= graphs.max_batch
        # Decode rows and prefill chunks run as two forwards, so a prefill chunk never pushes
        # the decode rows off their CUDA graph.
        hidden = []
        if step.num_decode:
            if use_graph:
                decoded = graphs.run(step.decode_size, step.decode_lora)
            else:
                decoded = self.decode_forward(step.decode_size, step.decode_lora)
            hidden.append(decoded.index_select(0, self.inputs.decode_sample_index(step)))
        if step.num_prefill_tokens:
            prefilled = self._prefill_forward(step)
            hidden.append(prefilled.index_select(0, self.inputs.prefill_sample_index(step)))
        if not step.sample_order:
            return SampledTokens([], batch_size, torch.empty(0, dtype=torch.long), None)
        logits = self.model.compute_logits(torch.cat(hidden) if len(hidden) > 1 else hidden[0])
        if self.tp.is_first:
            tokens = self.sampler(logits, rows)
            if not isinstance(tokens, torch.Tensor):     # a stand-in sampler (tests) that returns a list
                tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
        else:
            tokens = torch.empty(len(step.sample_order), dtype=torch.long, device=self.device)
        tokens = self.tp.broadcast(tokens)      # every rank feeds rank 0's ids to the next step
        return self.inputs.record_sampled(tokens, step.sample_order, batch_size)

    def decode_forward(self, n: int, lora: Optional[LoRAVariant]) -> torch.Tensor:
        """The model over the first n decode rows of the step inputs; what the CUDA graphs capture."""
        t = self.inputs.decode_tensors(n)
        meta = AttentionMetadata(t.slot_mapping, [], [], [], num_prefill_tokens=0,
                                 decode_block_tables=t.block_tables, decode_context_lens=t.context_lens)
        with lora_step(self._lora_meta(t.adapter_slots, lora)):
            return self.model(t.input_ids, t.positions, self.kv_caches, meta)

    def _prefill_forward(self, step: StepInputs) -> torch.Tensor:
        t = self.inputs.prefill_tensors(step)
        meta = AttentionMetadata(t.slot_mapping, step.query_lens, step.context_lens, t.block_tables,
                                 num_prefill_tokens=step.num_prefill_tokens)
        with lora_step(self._lora_meta(t.adapter_slots, step.prefill_lora)):
            return self.model(t.input_ids, t.positions, self.kv_caches, meta)

    def _lora_meta(self, adapter_slots: torch.Tensor, lora: Optional[LoRAVariant]) -> Optional[LoRAMeta]:
        if lora is None or not self.lora_layers:
            return None
        return build_lora_meta(adapter_slots, self.config.max_loras, per_token_expand=lora is LoRAVariant.PER_TOKEN)
