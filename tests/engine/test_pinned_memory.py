"""The engine's pinning mode: registered pages unless the operator set a pinned_* option."""

import pytest
import torch

from multilora.engine import pinned_memory


@pytest.fixture
def settings(monkeypatch):
    applied = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", applied.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    return applied


def test_pages_are_registered_from_threads_by_default(settings):
    pinned_memory.register_pinned_pages()
    assert settings == ["pinned_use_cuda_host_register:True,pinned_num_register_threads:8"]


def test_an_operator_pinned_option_is_left_alone(settings, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True,pinned_use_cuda_host_register:False")
    pinned_memory.register_pinned_pages()
    assert settings == []


def test_other_allocator_options_do_not_stop_it(settings, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    pinned_memory.register_pinned_pages()
    assert len(settings) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_registered_pinned_blocks_upload_what_they_hold():
    pinned_memory.register_pinned_pages()
    block = torch.empty(3 << 20, dtype=torch.uint8, pin_memory=True)
    assert block.is_pinned()
    block.copy_(torch.arange(block.numel(), dtype=torch.int64) % 251)
    on_gpu = block.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), block)
