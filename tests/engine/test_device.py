"""Device choice: a CUDA device always carries an index (torch.cuda.set_device refuses a bare "cuda")."""

import torch

from multilora.config import EngineConfig
from multilora.engine.model_runner import resolve_device


def test_auto_is_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(EngineConfig(model="m")) == torch.device("cpu")


def test_cuda_gets_the_current_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device(EngineConfig(model="m")) == torch.device("cuda", 3)
    assert resolve_device(EngineConfig(model="m", device="cuda")) == torch.device("cuda", 3)
    assert resolve_device(EngineConfig(model="m", device="cuda:1")) == torch.device("cuda", 1)
