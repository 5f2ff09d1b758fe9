"""Import the Triton model's helper modules (model_repository/multilora/1/) in unit tests, as the stub does."""

import importlib
import sys
from pathlib import Path

MODEL_VERSION_DIR = Path(__file__).resolve().parents[2] / "model_repository" / "multilora" / "1"


def import_model_module(name: str):
    """The Python backend puts the version directory on sys.path; so do we."""
    if str(MODEL_VERSION_DIR) not in sys.path:
        sys.path.insert(0, str(MODEL_VERSION_DIR))
    return importlib.import_module(name)
