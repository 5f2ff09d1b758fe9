"""Every tensor of a safetensors file in a few torch calls, one per group of tensors of one dtype and shape.

An adapter load runs on a preparing thread beside the engine's threads, and each torch call releases
the GIL and waits up to the switch interval to get it back; `safe_open(...).get_tensor` makes about
nine calls per tensor (a Llama-3-8B adapter has 448). Here the file is mapped once (privately), and
each group's bytes are gathered with one index_select (so the copying runs without the GIL, beside
the engine's threads) and become the group's tensors with a few calls (view, unbind). The rows are
contiguous and own their memory (never the file's).

The caller parses the file with safetensors first (`safe_open`, native and strict), so only files it
accepted reach this reader; the header is parsed again here, from the bytes actually read, and every
offset is checked against them. Whatever this reader does not take (a dtype it does not map, a
tensor without elements, a header that disagrees with the parser's: the file changed in between)
returns None, and the caller reads tensor by tensor as before.
"""

import json
import os
import math
import sys
from typing import Optional

import torch

# safetensors dtype codes this reader maps; others go the caller's way.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LENGTH_BYTES = 8
_MAX_BLOCKS = 1 << 16    # index entries of one gather (an 8B adapter's groups need a few thousand)


def read_grouped(path: str, size: int, keys) -> Optional[dict[str, torch.Tensor]]:
    """Tensor name -> tensor for the file at `path` of `size` bytes whose tensor names safetensors
    listed as `keys`; None when this reader does not take the file (see the module docstring)."""
    if sys.byteorder != "little":      # safetensors stores little-endian; get_tensor swaps, we do not
        return None
    # Mapped, not read: the gathers below copy each byte once, from the page cache, without the GIL
    # (safe_open maps the file the same way). Private, so nothing written here reaches the file.
    storage = torch.UntypedStorage.from_file(path, shared=False, nbytes=size)
    file_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
    if file_bytes.numel() != size or os.path.getsize(path) != size:
        return None                    # changed since safetensors parsed it
    data = memoryview(file_bytes.numpy())
    parsed = _entries(data, set(keys))
    if parsed is None:
        return None
    base, entries = parsed
    tensor_bytes = file_bytes[base:]
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[tuple[str, int, int]]] = {}
    for name, (dtype, shape, start, end) in entries.items():
        groups.setdefault((dtype, shape), []).append((name, start, end))
    tensors = {}
    for (dtype, shape), members in groups.items():
        gathered = _gather(tensor_bytes, [(start, end) for _, start, end in members])
        if gathered is None:
            return None
        rows = gathered.view(dtype).view(len(members), *shape).unbind(0)
        tensors.update(zip((name for name, _, _ in members), rows))
    return tensors


def _gather(tensor_bytes: torch.Tensor, ranges: list[tuple[int, int]]) -> Optional[torch.Tensor]:
    """The byte ranges of `tensor_bytes` one after another in a new tensor, with one index_select over
    blocks of their common divisor; None when that divisor is so small that the index would be large."""
    unit = math.gcd(*(x for r in ranges for x in r))
    blocks = sum(end - start for start, end in ranges) // unit
    if blocks > _MAX_BLOCKS:
        return None
    index = torch.tensor([i for start, end in ranges for i in range(start // unit, end // unit)])
    whole = tensor_bytes[:tensor_bytes.numel() // unit * unit].view(-1, unit)
    return whole.index_select(0, index).view(-1)


def _entries(data: memoryview, keys: set[str]):
    """-> (where the tensors' bytes start, name -> (dtype, shape, start, end) from there); None unless
    every entry is one we take."""
    if len(data) < _LENGTH_BYTES:
        return None
    header_len = int.from_bytes(data[:_LENGTH_BYTES], "little")
    base = _LENGTH_BYTES + header_len
    if base > len(data):
        return None
    try:
        header = json.loads(bytes(data[_LENGTH_BYTES:base]))
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict) or set(header) - {"__metadata__"} != keys:
        return None
    entries = {}
    for name in keys:
        entry = header[name]
        if not isinstance(entry, dict):
            return None
        dtype, shape, offsets = _DTYPES.get(entry.get("dtype")), entry.get("shape"), entry.get("data_offsets")
        if (dtype is None or not _ints(shape) or not _ints(offsets) or len(offsets) != 2
                or min(shape, default=1) <= 0):
            return None
        start, end = offsets
        if not 0 <= start <= end <= len(data) - base or end - start != math.prod(shape) * dtype.itemsize:
            return None
        entries[name] = (dtype, tuple(shape), start, end)
    return base, entries


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)
