"""The rooms of `lora_trainer/` (ARCHITECTURE.md): every module imports, no import circle, imports run only
downward through the stages, and no module takes another's private names.

The import graph is read from the source (every `import`, also the ones inside functions that load torch
lazily), so a circle that only closes at run time is found too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "lora_trainer"

# Lowest first. A room may import its own modules and the rooms of a lower layer, never a higher or an equal one.
LAYERS: Dict[str, int] = {
    "shared": 0,  # config, errors, files, callbacks, monitor: what every stage uses
    "model": 1,
    "data": 2, "adapters": 2,
    "evaluate": 3,
    "training": 4,
    "experiments": 5,  # many runs: queue, sweep, compare
    "ui": 6,  # the front ends: the tab (A1111/Forge, standalone) …
    "cli": 7,  # … and the command line, which also serves the standalone tab (`python -m lora_trainer ui`)
}
FRONT_DOOR = {"lora_trainer", "lora_trainer.__main__"}  # the public API re-exports and `python -m`


def _modules() -> Dict[str, Path]:
    found = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, List[str]]]:
    """(imported module, the names taken from it) for every import of `path` that lands in lora_trainer."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            out += [(s, []) for s in submodules]
            rest = [n for n in names if f"{target}.{n}" not in modules]
            if rest or not submodules:
                out.append((target, rest))
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: {target for target, _ in _imports(name, path, modules) if target != name}
            for name, path in modules.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (CORE / parts[1]).is_dir()) else "shared"


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in _modules() if n not in FRONT_DOOR)
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint(len(sys.argv) - 1)"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(len(names)) and len(names) > 60


def test_the_import_graph_has_no_circle():
    graph = _graph()
    assert "lora_trainer.training.objective" in graph["lora_trainer.training.validation"]  # the graph is read
    assert _cycles(graph) == []


def test_imports_run_only_downward_through_the_rooms():
    rooms = {_room(m) for m in _modules() if m not in FRONT_DOOR}
    assert rooms == set(LAYERS), f"a new room needs its layer in LAYERS (and ARCHITECTURE.md): {rooms - set(LAYERS)}"
    wrong = []
    for module, targets in _graph().items():
        if module in FRONT_DOOR:
            continue
        here = _room(module)
        for target in targets:
            there = _room(target)
            if there != here and (LAYERS[there] >= LAYERS[here] or target in FRONT_DOOR):
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_no_module_takes_another_modules_private_names():
    modules = _modules()
    taken = [f"{name} takes {target}.{n}"
             for name, path in modules.items() for target, names in _imports(name, path, modules)
             for n in names if n.startswith("_") and not n.startswith("__") and target != name]
    assert not taken, "\n".join(taken)


def test_the_loop_and_validation_share_one_objective():
    """Validation scores with the objective training minimises: neither defines a loss of its own."""
    graph = _graph()
    for module in ("lora_trainer.training.loop", "lora_trainer.training.validation"):
        assert "lora_trainer.training.objective" in graph[module]
        source = _modules()[module].read_text(encoding="utf-8")
        assert "mse_loss" not in source and "add_noise" not in source, module
