"""A file of kernels/ loaded as a private module whose Triton kernels are interpreted.

A private copy, because `multilora_kernels.<file>` may already be imported by other tests with
compiled kernels, and Triton picks compiled or interpreted as each kernel is decorated
(`multilora_kernels._launch.jit` reads INTERPRET_ENV then).
"""

import importlib.util
import os
import sys
from pathlib import Path

from multilora_kernels._launch import INTERPRET_ENV

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"


def _restore(mapping, key: str, value) -> None:
    if value is None:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def load_interpreted(filename: str, name: str, imports: dict | None = None):
    """kernels/`filename` executed as module `name` (registered in sys.modules: dataclasses look their
    module up there), its kernels interpreted. `imports`: module name -> module that its own imports
    get meanwhile (a private copy of another kernel file it imports from)."""
    imports = imports or {}
    saved_modules = {key: sys.modules.get(key) for key in imports}
    saved_env = os.environ.get(INTERPRET_ENV)
    os.environ[INTERPRET_ENV] = "1"
    sys.modules.update(imports)
    try:
        spec = importlib.util.spec_from_file_location(name, KERNELS_DIR / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        _restore(os.environ, INTERPRET_ENV, saved_env)
        for key, value in saved_modules.items():
            _restore(sys.modules, key, value)
    return module
