"""The package's folders are layers of one pipeline: each imports only from layers below it, and nothing imports
in a circle.

Every ``import`` of a ``chameleon_lite`` module counts, including the ones inside functions and under
``TYPE_CHECKING``: a deferred import is still a dependency a reader has to follow. Within one folder, modules may
import each other (but not in a circle).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "chameleon_lite"

# bottom to top; a module may import from its own folder and from folders with a lower number
LAYERS = {
    "safe_io": 0,
    "shipped": 0,
    "tokenization": 1,
    "model": 2,
    "data": 3,
    "world": 4,
    "generation": 5,
    "native": 6,
    "baseline": 6,
    "eval": 7,
    "training": 8,
    "comparison": 9,
    "cli": 10,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (a ``from pkg import module`` counts as importing the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name and t != "chameleon_lite"}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> tuple[str, int]:
    """The top-level folder (or module) ``module`` lives in, and its layer number."""
    parts = module.split(".")
    if len(parts) == 1:  # chameleon_lite itself: only lazy re-exports
        return "chameleon_lite", max(LAYERS.values()) + 1
    top = parts[1]
    if top not in LAYERS:
        raise AssertionError(f"{module}: the top-level name {top!r} has no layer; add it to LAYERS in {__file__}")
    return top, LAYERS[top]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        top, layer = layer_of(module)
        for dep in sorted(deps):
            dep_top, dep_layer = layer_of(dep)
            if dep_top != top and dep_layer >= layer:
                bad.append(f"{module} (layer {layer}, {top}) imports {dep} (layer {dep_layer}, {dep_top})")
    return bad


def test_every_folder_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    assert tops == set(LAYERS), f"folders without a layer: {tops - set(LAYERS)}; layers without a folder: " \
                                f"{set(LAYERS) - tops}"


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None, f"import cycle: {' -> '.join(find_cycle(import_graph()))}"


def test_layers_only_import_downwards():
    assert layer_violations(import_graph()) == []


def test_the_checks_catch_a_cycle_and_an_upward_import():
    graph = {"chameleon_lite.model.a": {"chameleon_lite.model.b"}, "chameleon_lite.model.b": {"chameleon_lite.model.a"}}
    assert find_cycle(graph) == ["chameleon_lite.model.a", "chameleon_lite.model.b", "chameleon_lite.model.a"]
    upward = {"chameleon_lite.data.x": {"chameleon_lite.training.y"}, "chameleon_lite.training.y": set()}
    assert layer_violations(upward) == [
        "chameleon_lite.data.x (layer 3, data) imports chameleon_lite.training.y (layer 8, training)"
    ]
    sideways = {"chameleon_lite.baseline.x": {"chameleon_lite.native.y"}, "chameleon_lite.native.y": set()}
    assert len(layer_violations(sideways)) == 1  # two folders on one layer do not import each other


def test_the_walk_sees_deferred_and_relative_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from chameleon_lite.model.decoder import Decoder\n")
    modules = {"chameleon_lite.x.m": module, "chameleon_lite.model.decoder": module}
    assert _imports("chameleon_lite.x.m", module, modules) == {"chameleon_lite.model.decoder"}


PUBLIC_NAMES = ("ChameleonLite", "BaselineVLM", "load_bundle", "DecoderConfig", "GenerationConfig")


def test_import_chameleon_lite_loads_neither_torch_nor_lightning():
    """``import chameleon_lite`` loads neither; reaching each public name loads torch but never Lightning. One
    process for all names (Lightning, once imported, stays in ``sys.modules``, so the check after each name sees
    every earlier name too) and the message names the first culprit."""
    code = (
        "import sys, chameleon_lite\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'import chameleon_lite: eager import'\n"
        f"for name in {PUBLIC_NAMES!r}:\n"
        "    getattr(chameleon_lite, name)\n"
        "    assert 'lightning' not in sys.modules, f'chameleon_lite.{name} imports lightning'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
