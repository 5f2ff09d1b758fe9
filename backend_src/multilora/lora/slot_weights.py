"""SlotWeights: every LoRA layer's per-slot A/B/scales in one device buffer, and the uploads into it.

The buffer is [num_slots, slot_bytes] bytes; each layer's `lora_a`, `lora_b` and
`lora_scales` are typed views into it (model dtype for A/B, float32 scales), so
one adapter slot is one contiguous byte range over all layers and slices. An
adapter's host image is laid out exactly like a slot: built once per adapter
(pinned memory on GPUs, so the copy is a real DMA that does not block the host),
it is uploaded with ONE copy. On a GPU the copy runs on a side stream and the
compute stream waits on its event before the step that first uses the slot
(issued at upload time, which the engine does right before that step), so the
host never waits and no step before it is delayed.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from multilora.lora.lora_linear import LoRALinear, LoRATarget

_ALIGN = 64  # bytes: every typed view starts aligned, for any dtype and vectorised loads


@dataclass(frozen=True)
class _LayerLayout:
    a_offset: int       # byte offsets inside one slot
    b_offset: int
    scales_offset: int


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class SlotWeights:
    """Allocates the slot buffer, attaches every layer's views, and uploads adapters into slots."""

    def __init__(self, targets: dict[tuple[int, str], LoRATarget], num_slots: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device):
        self.targets, self.num_slots, self.max_rank = targets, num_slots, max_rank
        self.dtype, self.device = dtype, device
        self.layers: list[LoRALinear] = list(dict.fromkeys(t.layer for t in targets.values()))
        self.layouts: dict[LoRALinear, _LayerLayout] = {}
        offset = 0
        for layer in self.layers:
            a_bytes = len(layer.slices) * max_rank * layer.in_features * dtype.itemsize
            b_bytes = layer.out_features * max_rank * dtype.itemsize
            self.layouts[layer] = _LayerLayout(offset, offset + _aligned(a_bytes), offset + _aligned(a_bytes)
                                               + _aligned(b_bytes))
            offset += _aligned(a_bytes) + _aligned(b_bytes) + _aligned(4 * len(layer.slices))
        self.slot_bytes = offset
        self.buffer = torch.zeros(num_slots, self.slot_bytes, dtype=torch.uint8, device=device)
        for layer in self.layers:
            layer.attach_lora(*self._views(self.buffer, layer))
        self._images: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def _views(self, buffer: torch.Tensor, layer: LoRALinear):
        """(lora_a, lora_b, lora_scales) of `layer` inside `buffer` [..., slot_bytes]."""
        lead, layout, r, n = buffer.shape[:-1], self.layouts[layer], self.max_rank, len(layer.slices)

        def typed(offset: int, dtype: torch.dtype, *shape: int) -> torch.Tensor:
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            return buffer[..., offset:offset + nbytes].view(dtype).view(*lead, *shape)

        return (typed(layout.a_offset, self.dtype, n * r, layer.in_features),
                typed(layout.b_offset, self.dtype, layer.out_features, r),
                typed(layout.scales_offset, torch.float32, n))

    def host_image(self, adapter) -> torch.Tensor:
        """The adapter laid out like one slot: [slot_bytes] bytes, pinned on GPUs; built once per adapter."""
        cached = self._images.get(id(adapter))
        if cached is not None and cached[0]() is adapter:
            return cached[1]
        image = torch.zeros(self.slot_bytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        for key, (a, b, scaling) in adapter.weights.items():
            target = self.targets.get(key)
            if target is None:
                continue  # a module this model serves without LoRA; the adapter loader validated the rest
            lora_a, lora_b, scales = self._views(image, target.layer)
            rank, first = a.shape[0], target.index * self.max_rank
            lora_a[first:first + rank].copy_(a)
            lora_b[target.rows, :rank].copy_(b)
            scales[target.index] = scaling
        try:
            ref = weakref.ref(adapter)
        except TypeError:  # a record without weak references: rebuilt at each upload (rare, small)
            return image
        self._images[id(adapter)] = (ref, image)
        weakref.finalize(adapter, self._images.pop, id(adapter), None)  # pinned memory goes with the adapter
        return image

    def upload(self, adapter_slot: int, adapter) -> None:
        """Makes `adapter_slot` hold `adapter` (every layer; untargeted modules zero) with one copy."""
        assert 0 <= adapter_slot < self.num_slots, f"adapter slot {adapter_slot} outside 0..{self.num_slots - 1}"
        image = self.host_image(adapter)
        if self._stream is None:
            self.buffer[adapter_slot].copy_(image)
            return
        compute = torch.cuda.current_stream(self.device)
        # The slot's previous adapter may still be read by work already queued: copy after it.
        self._stream.wait_stream(compute)
        with torch.cuda.stream(self._stream):
            self.buffer[adapter_slot].copy_(image, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        compute.wait_event(done)
