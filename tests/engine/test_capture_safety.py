"""What the decode CUDA graph captures makes no host sync, checked on CPU.

A `.item()`, `.tolist()`, `int(t)`, `bool(t)`, `nonzero`, `unique` or a boolean-mask
index inside `torch.cuda.graph` fails the capture (or, worse, bakes one step's value
into every replay). Most reach the dispatcher as ops whose output size or value the
host must read (`_SYNC_OPS`, a bool index), so a dispatch mode that records those sees
them on CPU tensors too, without a GPU; `.tolist()` / `.numpy()` of a CPU tensor skip
the dispatcher, so the mode wraps them as well.
"""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multilora.engine.step_inputs import StepInputBuilder
from multilora_kernels.lora import build_lora_meta

_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default, torch.ops.aten.masked_select.default,
             torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default}
_HOST_READS = ("tolist", "numpy")


class _HostSyncs(TorchDispatchMode):
    """Records every op that would make the host wait for the device (see _SYNC_OPS)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in _HOST_READS}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._recording(name, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)
        return super().__exit__(*exc)

    def _recording(self, name, method):
        def read(tensor, *args, **kwargs):
            self.ops.append(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func is torch.ops.aten.index.Tensor and any(
            i is not None and i.dtype == torch.bool for i in args[1])
        if func in _SYNC_OPS or bool_index:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_tensors_read_static_buffers_without_host_sync():
    builder = StepInputBuilder(max_decode_rows=8, max_prefill_tokens=16, max_seqs=4, max_blocks_per_seq=3,
                               block_size=4, scratch_block=9, device=torch.device("cpu"))
    with _HostSyncs() as syncs:
        t = builder.decode_tensors(8)
    assert syncs.ops == []
    # Fresh buffers hold only padding rows: token 0 at position 0 of the scratch block, no adapter.
    assert t.input_ids.tolist() == [0] * 8 and t.positions.tolist() == [0] * 8
    assert t.slot_mapping.tolist() == [9 * 4] * 8
    assert t.context_lens.tolist() == [1] * 8 and t.adapter_slots.tolist() == [-1] * 8
    assert t.block_tables.shape == (8, 3) and t.block_tables.dtype == torch.int32


def test_lora_meta_is_built_without_host_sync_on_the_device_path():
    slots = torch.tensor([2, -1, 0, 2, 2, -1, 1, 0])
    with _HostSyncs() as syncs:
        meta = build_lora_meta(slots, 4)
    # Exactly the slot-range assert's min and max, which runs only on CPU tensors (is_cuda gates it);
    # every op of the mapping itself is sync-free, so it can run inside the decode graph.
    assert syncs.ops == [str(torch.ops.aten._local_scalar_dense.default)] * 2
    assert meta.sorted_token_ids.tolist() == [1, 5, 2, 7, 6, 0, 3, 4]
    assert meta.slot_token_counts.tolist() == [2, 1, 3, 0]
