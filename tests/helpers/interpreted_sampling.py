"""The sampler with kernels/sampling.py's Triton kernels interpreted, so that its CUDA path runs on CPU tensors."""

import sys

from helpers.interpreted_kernels import load_interpreted
from multilora import sampler as sampler_module
from multilora_kernels import _launch

_NAME = "_interpreted_sampling_kernels"


def use_interpreted_sampling_kernels(monkeypatch):
    """Routes multilora.sampler's kernel calls to an interpreted copy of kernels/sampling.py for the
    test (monkeypatch undoes it); returns that copy."""
    monkeypatch.setenv(_launch.INTERPRET_ENV, "1")        # decorates interpreted, and dispatches CPU tensors to Triton
    module = sys.modules.get(_NAME) or load_interpreted("sampling.py", _NAME)
    for name in ("argmax_probs_over_noise", "rank_window", "window_softmax_input"):
        monkeypatch.setattr(sampler_module, name, getattr(module, name))
    return module
