"""The import layering of docs/ARCHITECTURE.md, checked on the source with `ast`.

Nothing is imported: every `import` statement of every file (including those
inside functions) is read and resolved to a module of this repository, or to
a top-level third-party or standard-library name.
"""

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parents[1]
BACKEND = REPO / "backend_src"
PACKAGE = BACKEND / "multilora"
KERNELS = REPO / "kernels"  # imported as `multilora_kernels`
CLIENTS = REPO / "client_examples"

TRITON_SERVER = {"triton_python_backend_utils", "tritonclient", "pytriton"}

# Floors, top to bottom: a module may import its own floor and the floors below.
# lora/request.py is a plain record that outputs.py (bottom floor) needs.
TOP, ENGINE, MODEL, LORA, BASE = 4, 3, 2, 1, 0
FLOOR_OF_MODULE = {
    "multilora": TOP, "multilora.llm": TOP, "multilora.engine.async_engine": TOP,
    "multilora.config": BASE, "multilora.sampling_params": BASE, "multilora.sampler": BASE,
    "multilora.errors": BASE, "multilora.outputs": BASE, "multilora.lora.request": BASE,
    "multilora.tensor_parallel": BASE,
}
FLOOR_OF_PACKAGE = {"multilora.engine": ENGINE, "multilora.model": MODEL, "multilora.lora": LORA}
FLOOR_NAMES = {TOP: "llm/async_engine/multilora", ENGINE: "engine/", MODEL: "model/", LORA: "lora/", BASE: "bottom"}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    name: str  # dotted, absolute

    @property
    def top(self) -> str:
        return self.name.split(".")[0]

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line} imports {self.name}"


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def imports_in(path: Path, module: str) -> Iterator[Import]:
    """Every import of `path`; `from X import a` yields X.a (resolve() drops it if it is no module)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield Import(path, node.lineno, f"{base}.{alias.name}" if alias.name != "*" else base)


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p, PACKAGE, "multilora"): p for p in python_files(PACKAGE)}


def resolve(name: str, modules: dict[str, Path]) -> Optional[str]:
    """The longest module of ours that `name` lies in, or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def floor(module: str) -> Optional[int]:
    if module in FLOOR_OF_MODULE:
        return FLOOR_OF_MODULE[module]
    return next((f for pkg, f in FLOOR_OF_PACKAGE.items() if module == pkg or module.startswith(pkg + ".")), None)


def package_imports() -> Iterator[tuple[str, Import, Optional[str]]]:
    """(importing module, import, imported module of ours or None) for every import in multilora."""
    modules = package_modules()
    for module, path in modules.items():
        for imp in imports_in(path, module):
            yield module, imp, resolve(imp.name, modules)


# ---------------------------------------------------------------- tests


def test_resolver_sees_the_package():
    """Guards the checks below against passing on an empty walk."""
    modules = package_modules()
    assert {"multilora", "multilora.errors", "multilora.lora.request"} <= set(modules)
    imported = {target for _, _, target in package_imports() if target}
    assert "multilora.errors" in imported and "multilora.lora.request" in imported
    assert python_files(KERNELS)


def test_kernels_import_only_torch_triton_and_the_standard_library():
    allowed = {"torch", "triton", "multilora_kernels", *sys.stdlib_module_names}
    bad = []
    for path in python_files(KERNELS):
        for imp in imports_in(path, module_name(path, KERNELS, "multilora_kernels")):
            if imp.top not in allowed:
                bad.append(str(imp))
    assert not bad, "kernels/ may import only torch, triton and the standard library:\n" + "\n".join(bad)


def test_backend_imports_nothing_of_the_triton_server():
    bad = []
    for path in python_files(BACKEND) + python_files(KERNELS):
        module = module_name(path, BACKEND, "") if path.is_relative_to(BACKEND) else "multilora_kernels"
        for imp in imports_in(path, module.lstrip(".")):
            if imp.top in TRITON_SERVER:
                bad.append(str(imp))
    assert not bad, "Triton server code belongs in model_repository/*/model.py:\n" + "\n".join(bad)


def test_nothing_imports_upward():
    bad = []
    for module, imp, target in package_imports():
        own, theirs = floor(module), floor(target) if target else None
        if own is None or theirs is None or module == "multilora":
            continue
        if theirs > own:
            bad.append(f"{imp} ({FLOOR_NAMES[own]} -> {FLOOR_NAMES[theirs]})")
    assert not bad, "upward imports (see docs/ARCHITECTURE.md floors):\n" + "\n".join(bad)


def test_only_the_top_floor_imports_the_public_api():
    """Modules outside the floors table (detokenizer, ...) still never import llm/async_engine/the package."""
    bad = [str(imp) for module, imp, target in package_imports()
           if target and floor(target) == TOP and floor(module) != TOP and module != "multilora.__main__"]
    assert not bad, "\n".join(bad)


def test_no_two_modules_import_each_other():
    edges = {(module, target) for module, _, target in package_imports() if target and target != module}
    mutual = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert not mutual, f"modules importing each other: {mutual}"


def test_clients_import_nothing_of_the_engine():
    """Client examples need tritonclient, not the engine (demo_tasks is pure standard library on purpose)."""
    forbidden = {"torch", "transformers", "multilora_kernels", "triton_python_backend_utils"}
    bad = []
    for path in python_files(CLIENTS) if CLIENTS.is_dir() else []:
        for imp in imports_in(path, path.stem):
            if imp.top in forbidden or (imp.top == "multilora" and not imp.name.startswith("multilora.demo_tasks")):
                bad.append(str(imp))
    assert not bad, "\n".join(bad)
