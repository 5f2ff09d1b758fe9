"""Tensor parallelism (Megatron-style): which part of each weight a rank holds, and the collectives.

A model split over N ranks (`tensor_parallel_size`):
- q/k/v and gate/up are column-parallel: each rank computes its own heads (its part of the
  intermediate columns) from the whole input; KV heads are split across ranks, or replicated
  when there are fewer KV heads than ranks (rank r then holds KV head r // (N / kv_heads));
- o_proj and down_proj are row-parallel: each rank reads its part of the input (its heads,
  its intermediate columns) and produces a partial sum; one all-reduce after each adds them;
- the vocabulary (lm_head) is column-parallel: each rank computes ceil(V / N) logit columns
  (zero rows pad the last one), gathered on rank 0, which samples and broadcasts the ids.

LoRA is sharded with its base layer (as vLLM does): for a column-parallel layer A is whole and
B holds this rank's output rows (per slice of a fused layer); for a row-parallel layer A holds
this rank's input columns and B is whole. The shrink then gives partial rank-R sums, and since
the expand is linear in them, each rank's expand adds its partial LoRA delta to its partial
output: the layer's one all-reduce sums base and LoRA together, exactly.

`SINGLE` (size 1) makes every collective the identity, so one device runs the same code.
Collectives go through torch.distributed's default group (one per worker process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """Part [start, start + size) of a dimension of length `full`; past `full` it is zero padding."""

    start: int
    size: int
    full: int

    @classmethod
    def whole(cls, n: int) -> "Shard":
        return cls(0, n, n)

    def scaled(self, n: int) -> "Shard":
        """The same part in units n times smaller (heads -> features of n per head)."""
        return Shard(self.start * n, self.size * n, self.full * n)

    @property
    def is_whole(self) -> bool:
        return self.start == 0 and self.size == self.full

    @property
    def index(self) -> slice:
        """The part of the full dimension that exists (padding excluded)."""
        return slice(self.start, min(self.start + self.size, self.full))


@dataclass(frozen=True)
class LinearShard:
    """Where one rank's (possibly fused) linear layer sits in the full HF modules."""

    outputs: tuple[Shard, ...]     # per slice: the rows of the full module's output this rank computes
    input: Shard                   # the columns of the full input this rank reads
    adds_bias: bool = True         # row-parallel partial outputs are summed: one rank alone adds the bias

    @classmethod
    def whole(cls, in_features: int, slices: tuple[int, ...]) -> "LinearShard":
        return cls(tuple(Shard.whole(n) for n in slices), Shard.whole(in_features))

    def weight_index(self, i: int) -> tuple[slice, slice]:
        """Slice i's part of its full [out, in] HF weight."""
        return self.outputs[i].index, self.input.index

    def full_weight_shape(self, i: int) -> tuple[int, int]:
        return self.outputs[i].full, self.input.full

    def lora(self, i: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of slice i's full A [r, in] and B [out, r] (themselves when whole: no torch call,
        as a host image is built beside the engine's threads and each call is a wait for the GIL)."""
        if self.input.is_whole and self.outputs[i].is_whole:
            return lora_a, lora_b
        return lora_a[:, self.input.index], lora_b[self.outputs[i].index]


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among `size`, the shards that follow from it, and the collectives."""

    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    # ---- shards ---------------------------------------------------------
    def split(self, n: int, what: str) -> Shard:
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size {self.size}")
        part = n // self.size
        return Shard(self.rank * part, part, n)

    def kv_heads(self, num_kv_heads: int) -> Shard:
        """This rank's KV heads: split when there are at least as many as ranks, else one replicated."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size {self.size} is not a multiple of num_key_value_heads "
                             f"{num_kv_heads}, so the KV heads cannot be replicated evenly")
        return Shard(self.rank // (self.size // num_kv_heads), 1, num_kv_heads)

    def vocab(self, vocab_size: int) -> Shard:
        part = -(-vocab_size // self.size)
        return Shard(self.rank * part, part, vocab_size)

    def column(self, in_features: int, outputs: tuple[Shard, ...]) -> LinearShard:
        return LinearShard(tuple(outputs), Shard.whole(in_features))

    def row(self, input: Shard, out_features: int) -> LinearShard:
        return LinearShard((Shard.whole(out_features),), input, adds_bias=self.is_first)

    # ---- collectives (identity at size 1) --------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place (inside CUDA graphs too: NCCL collectives are capturable)."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def gather_columns(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Every rank's x [n, c] side by side on rank 0 ([n, size * c]); None on the other ranks."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.is_first else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=1) if self.is_first else None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src=0)
        return x

    def min(self, value: int, device: torch.device) -> int:
        """The smallest of every rank's `value` (each rank measures its own free memory)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TensorParallel()
