"""Every tensor of a safetensors file in a few torch calls, one per run of one module's tensors.

An adapter load runs on a preparing thread beside the engine's threads, and each torch call releases
the GIL and waits up to the switch interval to get it back; `safe_open(...).get_tensor` makes about
nine calls per tensor (a Llama-3-8B adapter has 448). Here the whole file is read with one readinto
(without the GIL) into anonymous memory of the reader's own, asked for in huge pages: what a read
costs is mostly the page faults of fresh memory (an 84 MB adapter is ~21,000 small pages), not the
copy. The tensors are views of that buffer, with no second copy: each run of tensors of one dtype
and shape whose names differ only in their numbers (one module in every layer), lying one interval
apart as safetensors writes them, becomes one strided view and is unbound into its tensors. A run
that is not one interval apart, or not aligned to its dtype, is copied out with one index_select
instead. The tensors are contiguous and own their memory: read, never mapped, so a file that changes
or shrinks afterwards cannot touch them. They share one buffer, which lives as long as any of them.

The caller parses the file with safetensors first (`safe_open`, native and strict), so only files it
accepted reach this reader; the header is parsed again here, from the bytes actually read, and every
offset is checked against them. Whatever this reader does not take (a dtype it does not map, a
tensor without elements, tensors that overlap, a file whose size or header disagrees with the
parser's: it changed in between) returns None, and the caller reads tensor by tensor as before.
"""

import json
import math
import mmap
import re
import sys
from typing import Optional

import torch

# safetensors dtype codes this reader maps; others go the caller's way.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_LENGTH_BYTES = 8
_MAX_BLOCKS = 1 << 16    # index entries of one gather (an 8B adapter's groups need a few thousand)
_DIGITS = re.compile(r"\d+")


def read_grouped(path: str, size: int, keys) -> Optional[dict[str, torch.Tensor]]:
    """Tensor name -> tensor for the file at `path` of `size` bytes whose tensor names safetensors
    listed as `keys`; None when this reader does not take the file (see the module docstring)."""
    if sys.byteorder != "little" or size < _LENGTH_BYTES:   # safetensors stores little-endian; we do not swap
        return None
    memory = _owned_memory(size)
    data = memoryview(memory)
    if not _read_exactly(path, data):
        return None                    # changed since safetensors parsed it
    parsed = _entries(data, set(keys))
    if parsed is None:
        return None
    base, entries = parsed
    file_bytes = torch.frombuffer(memory, dtype=torch.uint8)
    # One module's tensors in every layer: one dtype and shape, names that differ only in their numbers,
    # and (as safetensors writes them) one interval apart in the file, so one strided view holds them all.
    runs: dict[tuple, list[tuple[int, int, str]]] = {}
    for name, (dtype, shape, start, end) in entries.items():
        runs.setdefault((dtype, shape, _DIGITS.sub("", name)), []).append((start, end, name))
    typed: dict[torch.dtype, torch.Tensor] = {}
    tensors = {}
    for (dtype, shape, _), members in runs.items():
        members.sort()
        starts = [base + start for start, _, _ in members]
        rows = _strided_rows(file_bytes, typed, dtype, shape, starts)
        if rows is None:               # not one interval apart, or not aligned to the dtype: copied
            gathered = _gather(file_bytes[base:], [(start, end) for start, end, _ in members])
            if gathered is None:
                return None
            rows = gathered.view(dtype).view(len(members), *shape).unbind(0)
        tensors.update(zip((name for _, _, name in members), rows))
    return tensors


def _owned_memory(size: int) -> mmap.mmap:
    """`size` bytes of anonymous private memory, in huge pages where the system allows them (transparent
    huge pages "madvise" or "always"): 2 MB pages fault 512 times less often than 4 KB ones."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no such advice here: small pages, only slower
        pass
    return memory


def _read_exactly(path: str, data: memoryview) -> bool:
    """Fills `data` with the file's bytes (FileIO.readinto releases the GIL); False unless the file holds
    exactly that many."""
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(data):
            n = f.readinto(data[done:])
            if not n:
                return False
            done += n
        return not f.read(1)


def _strided_rows(file_bytes: torch.Tensor, typed: dict, dtype: torch.dtype, shape: tuple[int, ...],
                  starts: list[int]) -> Optional[tuple[torch.Tensor, ...]]:
    """The tensors of `shape` at the byte offsets `starts` as views of `file_bytes`, with two calls; None
    unless the starts are one interval apart and every one is a multiple of the dtype's size.
    `typed` caches the file's bytes seen as each dtype."""
    item = dtype.itemsize
    step = starts[1] - starts[0] if len(starts) > 1 else item
    if starts[0] % item or step % item or any(b - a != step for a, b in zip(starts, starts[1:])):
        return None
    if dtype not in typed:
        typed[dtype] = file_bytes[:file_bytes.numel() // item * item].view(dtype)
    inner = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    return typed[dtype].as_strided((len(starts), *shape), (step // item, *inner), starts[0] // item).unbind(0)


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
    every entry is one we take and no two overlap."""
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
    # The tensors are views of one buffer: overlapping ones would write each other.
    ranges = sorted((start, end) for _, _, start, end in entries.values())
    if any(start < end for (_, end), (start, _) in zip(ranges, ranges[1:])):
        return None
    return base, entries


def _ints(value) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)
