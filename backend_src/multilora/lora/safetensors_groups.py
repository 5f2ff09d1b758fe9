"""Every tensor of a safetensors file in a few torch calls, one per group of tensors of one dtype and shape.

An adapter load runs on a preparing thread beside the engine's threads, and each torch call releases
the GIL and waits up to the switch interval to get it back; `safe_open(...).get_tensor` makes about
nine calls per tensor (a Llama-3-8B adapter has 448). Here the file is read once, the bytes of each
group are gathered in pure Python into one buffer, and that buffer becomes the group's tensors with
three calls (frombuffer, view, unbind). The rows are contiguous and own their memory (never the file's).

The caller parses the file with safetensors first (`safe_open`, native and strict), so only files it
accepted reach this reader; the header is parsed again here, from the bytes actually read, and every
offset is checked against them. Whatever this reader does not take (a dtype it does not map, a
tensor without elements, a header that disagrees with the parser's: the file changed in between)
returns None, and the caller reads tensor by tensor as before.
"""

import json
import math
import sys
from typing import Optional

import torch

# safetensors dtype codes this reader maps; others go the caller's way.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LENGTH_BYTES = 8


def read_grouped(path: str, size: int, keys) -> Optional[dict[str, torch.Tensor]]:
    """Tensor name -> tensor for the file at `path` of `size` bytes whose tensor names safetensors
    listed as `keys`; None when this reader does not take the file (see the module docstring)."""
    if sys.byteorder != "little":      # safetensors stores little-endian; get_tensor swaps, we do not
        return None
    with open(path, "rb") as f:
        data = memoryview(f.read(size + 1))
    entries = _entries(data, set(keys)) if len(data) == size else None
    if entries is None:
        return None
    groups: dict[tuple[torch.dtype, tuple[int, ...]], list[tuple[str, int, int]]] = {}
    for name, (dtype, shape, start, end) in entries.items():
        groups.setdefault((dtype, shape), []).append((name, start, end))
    tensors = {}
    for (dtype, shape), members in groups.items():
        length = members[0][2] - members[0][1]
        buffer = bytearray(length * len(members))
        for i, (_, start, end) in enumerate(members):
            buffer[i * length:(i + 1) * length] = data[start:end]
        rows = torch.frombuffer(buffer, dtype=dtype).view(len(members), *shape).unbind(0)
        tensors.update(zip((name for name, _, _ in members), rows))
    return tensors


def _entries(data: memoryview, keys: set[str]):
    """name -> (dtype, shape, start, end), offsets into `data`; None unless every entry is one we take."""
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
        start, end = base + offsets[0], base + offsets[1]
        if not base <= start <= end <= len(data) or end - start != math.prod(shape) * dtype.itemsize:
            return None
        entries[name] = (dtype, tuple(shape), start, end)
    return entries


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)
