"""Session-wide fixtures. Test folders add their own conftest.py next to their tests."""

import os
import sys
from pathlib import Path

import pytest
import torch

# `import helpers...` from any test folder, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))

from helpers.zoo import TinyZoo  # noqa: E402

# Tiny shapes on a shared 2-core machine: intra-op threads only spin against
# each other and other processes (a 64-wide forward measured 100x slower).
torch.set_num_threads(int(os.environ.get("MULTILORA_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> TinyZoo:
    """Tiny random models, PEFT adapters and HF + PEFT greedy references, built once per session."""
    return TinyZoo(tmp_path_factory.mktemp("tiny_zoo"))
