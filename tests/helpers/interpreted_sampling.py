"""The sampler with kernels/sampling.py's Triton kernels interpreted, so that its CUDA path runs on CPU tensors."""

import importlib.util
import sys
from pathlib import Path

from multilora import sampler as sampler_module
from multilora_kernels import _launch

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
_NAME = "_interpreted_sampling_kernels"


def use_interpreted_sampling_kernels(monkeypatch):
    """Routes multilora.sampler's kernel calls to an interpreted copy of kernels/sampling.py for the
    test (monkeypatch undoes it); returns that copy."""
    monkeypatch.setenv(_launch.INTERPRET_ENV, "1")        # decorates interpreted, and dispatches CPU tensors to Triton
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, KERNELS_DIR / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_NAME] = module
    module = sys.modules[_NAME]
    for name in ("argmax_probs_over_noise", "rank_window", "window_softmax_input"):
        monkeypatch.setattr(sampler_module, name, getattr(module, name))
    return module
