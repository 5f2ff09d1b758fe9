"""read_grouped against safetensors' own reader: views where the file allows them, copies or None otherwise."""

import json
import os
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multilora.lora.safetensors_groups import read_grouped


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        expected = {key: f.get_tensor(key) for key in f.keys()}
    return read_grouped(str(path), os.path.getsize(path), list(expected)), expected


def _write_raw(path, header: dict, data: bytes, pad: int) -> None:
    """A safetensors file written by hand: `pad` spaces after the JSON header (safetensors pads to 8)."""
    text = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_one_view_per_module_across_layers(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.{m}.lora_{ab}.weight": torch.randn(4, 8, generator=gen).to(dtype)
               for i in range(12) for m, dtype in (("q", torch.bfloat16), ("v", torch.float32)) for ab in "AB"}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    got, expected = _read(tmp_path / "a.safetensors")
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and got[key].is_contiguous() and torch.equal(got[key], tensor)
    # All of them views of the one buffer the file was read into.
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1


def test_irregular_and_misaligned_runs_are_copied(tmp_path):
    gen = torch.Generator().manual_seed(1)
    # layer 1 has an extra tensor, so layer 0..2's q tensors are not one interval apart.
    tensors = {f"layers.{i}.q.weight": torch.randn(2, 3, generator=gen) for i in range(3)}
    tensors["layers.1.extra.weight"] = torch.randn(5, generator=gen)
    save_file(tensors, str(tmp_path / "irregular.safetensors"))
    got, expected = _read(tmp_path / "irregular.safetensors")
    assert all(torch.equal(got[key], t) for key, t in expected.items())
    # A header of odd length puts float32 data off its alignment: copied, not viewed.
    data = torch.arange(12, dtype=torch.float32)
    header = {f"layers.{i}.w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24 * i, 24 * i + 24]}
              for i in range(2)}
    for pad in range(4):
        _write_raw(tmp_path / "odd.safetensors", header, data.numpy().tobytes(), pad)
        got = read_grouped(str(tmp_path / "odd.safetensors"), os.path.getsize(tmp_path / "odd.safetensors"),
                           list(header))
        assert torch.equal(got["layers.0.w"], data[:6].view(2, 3))
        assert torch.equal(got["layers.1.w"], data[6:].view(2, 3))


def test_overlapping_or_changed_files_are_left_to_the_caller(tmp_path):
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}
    _write_raw(tmp_path / "overlap.safetensors", header, data, 0)
    path = str(tmp_path / "overlap.safetensors")
    assert read_grouped(path, os.path.getsize(path), ["a", "b"]) is None
    save_file({"a": torch.ones(4)}, str(tmp_path / "ok.safetensors"))
    path = str(tmp_path / "ok.safetensors")
    assert read_grouped(path, os.path.getsize(path) - 1, ["a"]) is None      # grew since it was parsed
    assert read_grouped(path, os.path.getsize(path) + 1, ["a"]) is None      # shrank
