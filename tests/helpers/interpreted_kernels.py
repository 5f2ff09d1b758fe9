"""A file of kernels/ loaded as a private module whose Triton kernels are interpreted.

A private copy, because `multilora_kernels.<file>` may already be imported by other tests with
compiled kernels, and Triton picks compiled or interpreted as each kernel is decorated
(`multilora_kernels._launch.jit` reads MULTILORA_TRITON_INTERPRET_KERNELS then).
"""

import importlib.util
import os
import sys
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
INTERPRET_ENV = "MULTILORA_TRITON_INTERPRET_KERNELS"


def load_interpreted(filename: str, name: str, imports: dict | None = None):
    """kernels/`filename` executed as module `name` (registered in sys.modules: dataclasses look their
    module up there), its kernels interpreted. `imports`: module name -> module that its own imports
    get meanwhile (a private copy of another kernel file it imports from)."""
    imports = imports or {}
    saved = {key: sys.modules.get(key) for key in imports}
    saved_env = os.environ.get(INTERPRET_ENV)
    os.environ[INTERPRET_ENV] = "1"
    sys.modules.update(imports)
    try:
        spec = importlib.util.spec_from_file_location(name, KERNELS_DIR / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        for key, value in [*saved.items(), (INTERPRET_ENV, saved_env)]:
            mapping = os.environ if key == INTERPRET_ENV else sys.modules
            if value is None:
                mapping.pop(key, None)
            else:
                mapping[key] = value
    return module
