"""AdapterSlotWeights: every LoRA layer's per-slot A/B/scales in one device buffer, and the uploads into it.

The buffer is [num_slots, slot_bytes] bytes; each layer's `lora_a`, `lora_b` and
`lora_scales` are typed views into it (model dtype for A/B, float32 scales), so
one adapter slot is one contiguous byte range over all layers and slices. Inside
a slot the bytes are rank-major: first every layer's scales, then rank row 0 of
every layer's A and B, then rank row 1, ... So an adapter of rank r fills a
prefix of its slot, and its host image is exactly that prefix, laid out like the
slot: built once per adapter (pinned memory on GPUs, so the copy is a real DMA
that never blocks the host), uploaded with ONE copy of r / max_rank of a slot.
Rows left over from a previous adapter of higher rank are zeroed on the device.

On a GPU the copy runs on a side stream and the host never waits: the compute
stream waits on the copy's event only before the first step that uses the slot
(`wait_for_uploads`), so an adapter uploaded ahead (prefetched for a waiting
request) never delays the steps in between. The side stream first waits for the
work already queued on the compute stream, which may still read the slot's
previous adapter. Each copy is timed with CUDA events, read once they have
completed (`take_finished_uploads`, which never waits); on the CPU, wall time.
"""

from __future__ import annotations

import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from multilora.lora.lora_linear import LoRALinear, LoRATarget

_ALIGN = 64  # bytes: every typed view starts aligned, for any dtype and vectorised loads


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class _LayerLayout:
    scales_offset: int  # bytes from the slot's start: [n] float32
    a_offset: int       # bytes from a rank row's start: [n, in] model dtype (row j of each slice's A)
    b_offset: int       # bytes from a rank row's start: [out] model dtype (column j of B)


class AdapterSlotWeights:
    """Allocates the slot buffer, attaches every layer's views, and uploads adapters into slots."""

    def __init__(self, targets: dict[tuple[int, str], LoRATarget], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.targets, self.num_slots, self.max_rank = targets, num_slots, max_rank
        self.dtype, self.device = dtype, device
        layers: list[LoRALinear] = list(dict.fromkeys(t.layer for t in targets.values()))
        self.layouts: dict[LoRALinear, _LayerLayout] = {}
        # A rank row cut into columns (elements of the model dtype) in layout order: each slice's A row,
        # padding, each slice's B column, padding; so one split of an image's rows gives every module's
        # destination (`_fill_image`), not a few view calls per module.
        self._row_widths: list[int] = []
        self._columns: dict[tuple[LoRALinear, int], tuple[int, int]] = {}   # (layer, slice) -> (A, B) column
        header = row = 0
        for layer in layers:
            n = len(layer.slices)
            a_bytes = _aligned(n * layer.in_features * dtype.itemsize)
            b_bytes = _aligned(layer.out_features * dtype.itemsize)
            self.layouts[layer] = _LayerLayout(header, row, row + a_bytes)
            header += _aligned(4 * n)
            row += a_bytes + b_bytes
            first_a = len(self._row_widths)
            self._row_widths += [layer.in_features] * n + [a_bytes // dtype.itemsize - n * layer.in_features]
            first_b = len(self._row_widths)
            self._row_widths += [*layer.slices, b_bytes // dtype.itemsize - layer.out_features]
            self._columns.update({(layer, i): (first_a + i, first_b + i) for i in range(n)})
        self.header_bytes, self.row_bytes = header, row
        self.slot_bytes = header + max_rank * row
        self.buffer = torch.zeros(num_slots, self.slot_bytes, dtype=torch.uint8, device=device)
        for layer in layers:
            layer.attach_lora(*self._views(self.buffer, layer, max_rank))
        self._slot_ranks = [0] * num_slots  # rank rows that may be non-zero, per slot
        self._images: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._unawaited: dict[int, torch.cuda.Event] = {}   # slot -> its last copy, not yet waited for
        # (adapter name, start event, end event) of copies in stream order; on the CPU (name, seconds).
        self._timing: list[tuple] = []

    def _views(self, buffer: torch.Tensor, layer: LoRALinear, rank: int):
        """(lora_a [.., n, rank, in], lora_b [.., out, rank], lora_scales [.., n]) of `layer` in `buffer`."""
        lead, layout, n = buffer.shape[:-1], self.layouts[layer], len(layer.slices)
        item = self.dtype.itemsize
        scales = buffer[..., layout.scales_offset:layout.scales_offset + 4 * n].view(torch.float32)
        rows = buffer[..., self.header_bytes:self.header_bytes + rank * self.row_bytes]
        rows = rows.view(self.dtype).view(*lead, rank, self.row_bytes // item)
        a_start, b_start = layout.a_offset // item, layout.b_offset // item
        lora_a = rows[..., a_start:a_start + n * layer.in_features].unflatten(-1, (n, layer.in_features))
        lora_b = rows[..., b_start:b_start + layer.out_features]
        return lora_a.movedim(-3, -2), lora_b.transpose(-1, -2), scales

    def host_image(self, adapter) -> torch.Tensor:
        """The adapter laid out like the prefix of a slot that its rank fills: uint8 bytes, pinned on
        GPUs; built once per adapter and freed with it."""
        cached = self._images.get(id(adapter))
        if cached is not None and cached[0]() is adapter:
            return cached[1]
        rank = self._rank(adapter)
        # Any thread may build it (the engine does so as it loads the adapter); pinned memory is
        # allocated in the engine device's context, never a new one on the thread's default device.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
            image = torch.empty(self.header_bytes + rank * self.row_bytes, dtype=torch.uint8,
                                pin_memory=self.device.type == "cuda")
        self._fill_image(image, adapter, rank)
        return self._cache(adapter, image)

    def shared_image(self, adapter) -> torch.Tensor:
        """The adapter's host image in new shared memory (zero-filled by the system, so no copy and no
        zeroing pass), for another process to take (`adopt_image`); not kept here."""
        rank = self._rank(adapter)
        storage = torch.UntypedStorage._new_shared(self.header_bytes + rank * self.row_bytes)
        image = torch.empty(0, dtype=torch.uint8).set_(storage)
        self._fill_image(image, adapter, rank)
        return image

    def _rank(self, adapter) -> int:
        rank = max((a.shape[0] for a, _, _ in adapter.weights.values()), default=0)
        assert rank <= self.max_rank, f"adapter '{adapter.name}' has rank {rank} > max_lora_rank {self.max_rank}"
        return rank

    def adopt_image(self, adapter, image: torch.Tensor) -> torch.Tensor:
        """Takes `image`, the host image of `adapter` built elsewhere (a load worker's, in shared memory,
        laid out by a copy of this layout), as its host image: copied into pinned memory on GPUs (one
        copy, so the upload stays a DMA that never blocks the host), and kept with the adapter."""
        assert image.dtype == torch.uint8 and image.numel() == self.header_bytes + adapter.rank * self.row_bytes, (
            f"the image of adapter '{adapter.name}' does not match this slot layout")
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                pinned = torch.empty(image.numel(), dtype=torch.uint8, pin_memory=True)
            image = pinned.copy_(image)
        return self._cache(adapter, image)

    def _cache(self, adapter, image: torch.Tensor) -> torch.Tensor:
        try:
            ref = weakref.ref(adapter)
        except TypeError:  # a record without weak references: rebuilt at each upload
            return image
        self._images[id(adapter)] = (ref, image)
        weakref.finalize(adapter, self._images.pop, id(adapter), None)  # pinned memory goes with the adapter
        return image

    def _fill_image(self, image: torch.Tensor, adapter, rank: int) -> None:
        """Writes the adapter's weights and scales into `image` of `rank` rows and zeroes every byte they
        leave (untargeted modules, rows past a lower-ranked module's rank, padding), in a few torch calls
        whatever the number of modules: the image is built beside the engine's threads, and each call is
        one more wait for the GIL. `image` may hold anything (a reused pinned block), so no zeroing pass
        over it first: that pass and a stacked copy of every B made up most of an image's time."""
        scales = [0.0] * (self.header_bytes // 4)
        if rank:
            rows = image[self.header_bytes:].view(self.dtype).view(rank, -1)
            columns = rows.split(self._row_widths, dim=1)          # [rank, width] each
            # The image holds B transposed (rank-major): the same columns, seen [width, rank], take
            # each B [out, r] as it is, with no transposed copy of it first.
            columns_t = rows.t().split(self._row_widths, dim=0)
            dsts, srcs, zeros, written = [], [], [], set()
            for key, (a, b, scaling) in adapter.weights.items():
                target = self.targets.get(key)
                if target is None:
                    continue  # a module this model serves without LoRA; the adapter loader validated the rest
                layer = target.layer
                a, b = target.shard_lora(a, b)     # this rank's part under tensor parallelism
                a_column, b_column = self._columns[(layer, target.index)]
                r = a.shape[0]
                if r == rank:
                    dsts += [columns[a_column], columns_t[b_column]]
                else:
                    dsts += [columns[a_column][:r], columns_t[b_column][:, :r]]
                    zeros += [columns[a_column][r:], columns[b_column][r:]]
                srcs += [a, b]
                written.update((a_column, b_column))
                scales[self.layouts[layer].scales_offset // 4 + target.index] = scaling
            zeros += [column for i, column in enumerate(columns) if i not in written]
            if dsts:
                torch._foreach_copy_(dsts, srcs)
            if zeros:
                torch._foreach_zero_(zeros)
        if self.header_bytes:
            image[:self.header_bytes].view(torch.float32).copy_(torch.tensor(scales, dtype=torch.float32))

    def upload(self, adapter_slot: int, adapter) -> None:
        """Makes `adapter_slot` hold `adapter` (every layer; untargeted modules zero) with one copy."""
        self.upload_image(adapter_slot, self.host_image(adapter), adapter.name)

    def upload_image(self, adapter_slot: int, image: torch.Tensor, name: str) -> None:
        """Makes `adapter_slot` hold adapter `name`, whose `host_image` is `image` (built here or, under
        tensor parallelism, by the engine process for this rank)."""
        assert 0 <= adapter_slot < self.num_slots, f"adapter slot {adapter_slot} outside 0..{self.num_slots - 1}"
        rank = (image.numel() - self.header_bytes) // self.row_bytes
        dst = self.buffer[adapter_slot]
        stale = dst[image.numel():self.header_bytes + self._slot_ranks[adapter_slot] * self.row_bytes]
        self._slot_ranks[adapter_slot] = rank
        if self._stream is None:
            start = time.perf_counter()
            dst[:image.numel()].copy_(image)
            stale.zero_()
            self._timing.append((name, time.perf_counter() - start))
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # queued steps may read the old adapter
        with torch.cuda.stream(self._stream):
            start, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self._stream)
            dst[:image.numel()].copy_(image, non_blocking=True)
            stale.zero_()
            done.record(self._stream)
        self._unawaited[adapter_slot] = done
        self._timing.append((name, start, done))

    def wait_for_uploads(self, adapter_slots) -> None:
        """Makes the compute stream wait for the copies into these slots (those of the step it is about
        to run) that it has not waited for yet; the host never waits."""
        if not self._unawaited:
            return
        compute = torch.cuda.current_stream(self.device)
        for slot in set(adapter_slots):
            done = self._unawaited.pop(slot, None)
            if done is not None:
                compute.wait_event(done)

    def take_finished_uploads(self) -> list[tuple[str, float]]:
        """(adapter name, seconds) of each copy completed since the last call, in upload order; never waits."""
        if self._stream is None:
            finished, self._timing = self._timing, []
            return finished
        finished = []
        while self._timing and self._timing[0][2].query():    # one stream: they complete in order
            name, start, done = self._timing.pop(0)
            finished.append((name, start.elapsed_time(done) / 1e3))
        return finished
