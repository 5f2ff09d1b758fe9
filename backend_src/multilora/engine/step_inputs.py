"""StepInputBuilder: the one builder of a step's model inputs, for the eager and the CUDA-graph paths.

Every per-step input lives in persistent host buffers (pinned on GPUs) mirrored
on the device, so a step costs a few numpy writes and two or three H2D copies,
never Python lists rebuilt into tensors:

- a decode record [max_decode_rows, 7] (token id, position, block-table row,
  adapter_slot, context length, sample index, source) per one-token row, padded
  up to the graph's batch size with harmless rows; `source` >= 0 says the token
  is the previous step's sampled id number `source`, still on the device (async
  scheduling), and the device takes it from there;
- a prefill record [max_prefill_tokens, 5] (token id, position, block-table row,
  adapter_slot, sample index) per token of the step's prefill chunks;
- a block table [max_seqs + 1, max_blocks] int32 with one row per running
  sequence, written only where a sequence gained blocks; the last row is the
  scratch row padding uses.

Records are row-major so a step's used prefix is contiguous (one copy each); the
device side transposes them into columns. The slot mapping (`block_table[row,
position // block_size] * block_size + position % block_size`) and the decode
rows' block tables are gathered on the device from the table, inside the graph
on the graph path. Sampled ids go to a device buffer (the next step's source)
and, through alternating pinned buffers, to the host without blocking.

Under tensor parallelism the engine process builds each step on the CPU and
`export`s it: the used prefixes of the records and the block-table writes since
the last step, a few KB; every worker `load`s it into its own buffers.
"""

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from multilora.engine.scheduler import ScheduledBatch
from multilora.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from multilora.lora.mapping import LoRAVariant, lora_variant

_DECODE_COLUMNS = 7      # token id, position, row, adapter_slot, context length, sample index, source
_PREFILL_COLUMNS = 5     # token id, position, row, adapter_slot, sample index


@dataclass
class StepInputs:
    """What the host knows about one step; the tensors themselves stay in the builder's buffers."""

    num_decode: int = 0                  # one-token rows, first in the sampled order
    decode_size: int = 0                 # num_decode padded up to the graph's batch size
    decode_lora: Optional[LoRAVariant] = None       # None: no decode row uses an adapter
    num_prefill_tokens: int = 0
    prefill_lora: Optional[LoRAVariant] = None
    query_lens: list[int] = field(default_factory=list)        # per prefill sequence
    context_lens: list[int] = field(default_factory=list)
    prefill_table_rows: list[tuple[int, int]] = field(default_factory=list)   # (row, blocks in use)
    num_decode_samples: int = 0
    num_prefill_samples: int = 0
    sample_order: list[int] = field(default_factory=list)      # batch index of each sampled row


@dataclass
class StepRecords:
    """A step as the engine process built it, for the workers (tensor parallelism): `export` -> `load`."""

    step: StepInputs
    decode: np.ndarray                   # [decode_size, 7] the decode records, padding included
    prefill: np.ndarray                  # [num_prefill_tokens, 5]
    table_writes: list[tuple[int, int, list[int]]]      # (row, first column, block ids) since the last step


@dataclass
class SampledTokens:
    """A step's sampled ids on their way to the host; -1 marks a row the sampler failed."""

    order: list[int]                     # batch index of each sampled row
    batch_size: int
    host: torch.Tensor                   # [len(order)] int64, valid once `ready` has happened
    ready: Optional[torch.cuda.Event]

    def values(self) -> list[int]:
        """The ids in sample order (waits for the copy)."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()

    def per_row(self) -> list[Optional[int]]:
        """The id per batch row, None where the row sampled nothing."""
        result: list[Optional[int]] = [None] * self.batch_size
        for i, token in zip(self.order, self.values()):
            result[i] = token
        return result


@dataclass
class DecodeTensors:
    input_ids: torch.Tensor      # [n] int64
    positions: torch.Tensor      # [n] int64
    slot_mapping: torch.Tensor   # [n] int64
    block_tables: torch.Tensor   # [n, max_blocks] int32
    context_lens: torch.Tensor   # [n] int64
    adapter_slots: torch.Tensor  # [n] int64, -1 = no adapter


@dataclass
class PrefillTensors:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    adapter_slots: torch.Tensor
    block_tables: list[torch.Tensor]    # per prefill sequence, int64 block ids covering its context


@dataclass
class _TableRow:
    row: int
    preemptions: int     # the sequence's num_preemptions when the row was written: a change means new blocks
    synced: int = 0      # block_table entries already written


class StepInputBuilder:
    def __init__(self, *, max_decode_rows: int, max_prefill_tokens: int, max_seqs: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device: torch.device, exports: bool = False):
        self.block_size, self.device = block_size, device
        self._table_writes: Optional[list] = [] if exports else None    # kept for `export` only
        self.scratch_row = max_seqs
        pin = device.type == "cuda"
        host = lambda *shape, dtype=torch.long: torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self._decode_host = host(max_decode_rows, _DECODE_COLUMNS)
        self._prefill_host = host(max_prefill_tokens, _PREFILL_COLUMNS)
        self._table_host = host(max_seqs + 1, max_blocks_per_seq, dtype=torch.int32)
        self._table_host[self.scratch_row] = scratch_block
        mirror = (lambda t: t.to(device)) if pin else (lambda t: t)   # on CPU the host buffers are the inputs
        self._decode_dev, self._prefill_dev = mirror(self._decode_host), mirror(self._prefill_host)
        self._table_dev = mirror(self._table_host)
        self._decode_np, self._prefill_np = self._decode_host.numpy(), self._prefill_host.numpy()
        self._table_np = self._table_host.numpy()
        # A padding row: token 0 at position 0 of the scratch row (its K/V lands in the scratch block),
        # context 1, no adapter.
        self._pad_row = np.array([0, 0, self.scratch_row, -1, 1, 0, -1], dtype=np.int64)
        self._sampled_dev = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self._sampled_host = [host(max_seqs), host(max_seqs)] if pin else []
        self._rows: dict[Sequence, _TableRow] = {}
        self._free_rows = list(range(max_seqs - 1, -1, -1))
        self._dirty = [self._table_np.shape[0], 0]      # block-table rows [lo, hi) changed since the last copy
        self._copied = torch.cuda.Event() if pin else None
        self.pad_decode(0, max_decode_rows)
        self._copy_to_device(max_decode_rows, 0)

    @property
    def max_decode_rows(self) -> int:
        return self._decode_np.shape[0]

    # ---- host side --------------------------------------------------------
    def build(self, batch: ScheduledBatch, adapter_slots: list[int], wants_sample: list[bool],
              decode_size: int, sources: Optional[dict[Sequence, int]] = None) -> StepInputs:
        """Writes the step into the host buffers and copies them to the device (asynchronously).

        `sources`: for sequences whose last token is a PLACEHOLDER, its index among the ids the
        previous step sampled (`record_sampled`).
        """
        if self._copied is not None:
            self._copied.synchronize()   # the previous step's copies have read the pinned buffers
        step = StepInputs(decode_size=decode_size)
        decode = [i for i, n in enumerate(batch.num_new_tokens) if n == 1]
        prefill = [i for i, n in enumerate(batch.num_new_tokens) if n != 1]
        self._write_decode(batch, adapter_slots, wants_sample, decode, step, sources)
        self._write_prefill(batch, adapter_slots, wants_sample, prefill, step)
        self._copy_to_device(decode_size, step.num_prefill_tokens)
        return step

    def _write_decode(self, batch, adapter_slots, wants_sample, decode: list[int], step: StepInputs,
                      sources: Optional[dict[Sequence, int]]) -> None:
        n = step.num_decode = len(decode)
        assert n <= step.decode_size <= self.max_decode_rows, (n, step.decode_size)
        if n:
            seqs = [batch.seqs[i] for i in decode]
            positions = [seq.num_computed_tokens for seq in seqs]
            row_adapter_slots = [adapter_slots[i] for i in decode]
            rec = self._decode_np
            ids = [seq.token_at(p) for seq, p in zip(seqs, positions)]
            rec[:n, 0] = ids
            rec[:n, 6] = [-1 if t != PLACEHOLDER else sources[seq] for t, seq in zip(ids, seqs)]
            rec[:n, 1] = positions
            rec[:n, 2] = [self._table_row(seq) for seq in seqs]
            rec[:n, 3] = row_adapter_slots
            rec[:n, 4] = rec[:n, 1] + 1
            sampled = [j for j, i in enumerate(decode) if wants_sample[i]]
            rec[:len(sampled), 5] = sampled
            step.num_decode_samples = len(sampled)
            step.sample_order.extend(decode[j] for j in sampled)
            step.decode_lora = lora_variant((s, 1) for s in row_adapter_slots)
        self.pad_decode(n, step.decode_size)

    def pad_decode(self, start: int, end: int) -> None:
        """Decode rows [start, end) become harmless padding."""
        self._decode_np[start:end] = self._pad_row

    def _write_prefill(self, batch, adapter_slots, wants_sample, prefill: list[int], step: StepInputs) -> None:
        rec, bs, t = self._prefill_np, self.block_size, 0
        for i in prefill:
            seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
            start = seq.num_computed_tokens
            end = start + num_new
            row = self._table_row(seq)
            rec[t:t + num_new, 0] = seq.token_slice(start, end)
            # A prefill chunk never ends in a token still on the device: a sequence is only
            # recomputed after it was preempted, which leaves it out of the step that preempted it.
            assert rec[t:t + num_new, 0].min() >= 0, "prefill chunk with a token still on the device"
            rec[t:t + num_new, 1] = np.arange(start, end)
            rec[t:t + num_new, 2] = row
            rec[t:t + num_new, 3] = adapter_slots[i]
            t += num_new
            if wants_sample[i]:
                rec[step.num_prefill_samples, 4] = t - 1
                step.num_prefill_samples += 1
                step.sample_order.append(i)
            step.query_lens.append(num_new)
            step.context_lens.append(end)
            step.prefill_table_rows.append((row, -(-end // bs)))
        step.num_prefill_tokens = t
        step.prefill_lora = lora_variant((adapter_slots[i], batch.num_new_tokens[i]) for i in prefill)

    def _table_row(self, seq: Sequence) -> int:
        """The sequence's block-table row, after writing the blocks it gained since the last step."""
        entry = self._rows.get(seq)
        if entry is None:
            entry = self._rows[seq] = _TableRow(self._take_row(), seq.num_preemptions)
        elif entry.preemptions != seq.num_preemptions:    # preempted and readmitted: all blocks are new
            entry.preemptions, entry.synced = seq.num_preemptions, 0
        num_blocks = len(seq.block_table)
        if num_blocks > entry.synced:
            self._table_np[entry.row, entry.synced:num_blocks] = seq.block_table[entry.synced:num_blocks]
            if self._table_writes is not None:
                self._table_writes.append((entry.row, entry.synced, seq.block_table[entry.synced:num_blocks]))
            entry.synced = num_blocks
            self._dirty = [min(self._dirty[0], entry.row), max(self._dirty[1], entry.row + 1)]
        return entry.row

    def _take_row(self) -> int:
        if not self._free_rows:
            # Rows are given back lazily: those of sequences no longer running (finished or preempted).
            for seq in [s for s in self._rows if s.status is not SequenceStatus.RUNNING]:
                self._free_rows.append(self._rows.pop(seq).row)
        assert self._free_rows, "more running sequences than block-table rows (max_num_seqs)"
        return self._free_rows.pop()

    def export(self, step: StepInputs) -> StepRecords:
        """The step just built, for workers that `load` it (the builder was made with exports=True)."""
        writes, self._table_writes = self._table_writes, []
        return StepRecords(step, self._decode_np[:step.decode_size].copy(),
                           self._prefill_np[:step.num_prefill_tokens].copy(), writes)

    def load(self, records: StepRecords) -> StepInputs:
        """Writes a step another builder exported into this one's buffers and copies them to the device."""
        if self._copied is not None:
            self._copied.synchronize()
        step = records.step
        self._decode_np[:step.decode_size] = records.decode
        self._prefill_np[:step.num_prefill_tokens] = records.prefill
        for row, start, blocks in records.table_writes:
            self._table_np[row, start:start + len(blocks)] = blocks
            self._dirty = [min(self._dirty[0], row), max(self._dirty[1], row + 1)]
        self._copy_to_device(step.decode_size, step.num_prefill_tokens)
        return step

    def _copy_to_device(self, decode_rows: int, prefill_tokens: int) -> None:
        if self._copied is None:
            return
        self._decode_dev[:decode_rows].copy_(self._decode_host[:decode_rows], non_blocking=True)
        if prefill_tokens:
            self._prefill_dev[:prefill_tokens].copy_(self._prefill_host[:prefill_tokens], non_blocking=True)
        lo, hi = self._dirty
        if lo < hi:
            self._table_dev[lo:hi].copy_(self._table_host[lo:hi], non_blocking=True)
        self._dirty = [self._table_np.shape[0], 0]
        self._copied.record()

    # ---- device side (torch ops only: the decode part runs inside CUDA graphs) ----
    def decode_tensors(self, n: int) -> DecodeTensors:
        """The first n decode rows (padding included) as device tensors."""
        ids, positions, rows, adapter_slots, context_lens, _, source = self._decode_dev[:n].t().contiguous()
        # A failed row's -1 becomes token 0: that row's result is dropped, but an id outside the
        # vocabulary would fault the embedding on the GPU.
        ids = torch.where(source >= 0, self._sampled_dev[source.clamp(min=0)].clamp(min=0), ids)
        tables = self._table_dev.index_select(0, rows)
        block = tables.gather(1, (positions // self.block_size)[:, None])[:, 0]
        return DecodeTensors(ids, positions, self._slots(block, positions), tables, context_lens, adapter_slots)

    def decode_sample_index(self, step: StepInputs) -> torch.Tensor:
        return self._decode_dev[:step.num_decode_samples, 5]

    def prefill_tensors(self, step: StepInputs) -> PrefillTensors:
        ids, positions, rows, adapter_slots, _ = self._prefill_dev[:step.num_prefill_tokens].t().contiguous()
        block = self._table_dev[rows, positions // self.block_size]
        tables = [self._table_dev[row, :width].long() for row, width in step.prefill_table_rows]
        return PrefillTensors(ids, positions, self._slots(block, positions), adapter_slots, tables)

    def prefill_sample_index(self, step: StepInputs) -> torch.Tensor:
        return self._prefill_dev[:step.num_prefill_samples, 4]

    def record_sampled(self, token_ids: torch.Tensor, order: list[int], batch_size: int) -> "SampledTokens":
        """Keeps a step's sampled ids [k] (sample order) on the device for the next step, and starts their
        copy to the host."""
        k = len(order)
        self._sampled_dev[:k].copy_(token_ids)
        if not self._sampled_host:
            return SampledTokens(order, batch_size, self._sampled_dev[:k].clone(), None)
        self._sampled_host.reverse()    # alternate: the previous step's buffer may not be read yet
        host = self._sampled_host[0][:k]
        host.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return SampledTokens(order, batch_size, host, ready)

    def _slots(self, block: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block.long() * self.block_size + positions % self.block_size
