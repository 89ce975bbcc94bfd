"""The package's imports flow one way: no module imports one that (through others) imports
it back, function-level imports included; and the layers below never reach up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ckptsurgeon"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere in its body (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            checking.update(id(n) for b in node.body for n in ast.walk(b))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in checking:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(files)) - {name} for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package's __init__ importing its own submodules is how packages re-export.
            if node.startswith(nxt + ".") or nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# Lower layers never import higher ones (SPEC's design card: formats < targets < rules <
# engine < finetune < api/cli). The job, which sequences the engine's steps and the
# fine-tune, sits between finetune and api/cli.
LAYERS = ["formats", "targets", "rules", "engine", "finetune", "job"]
TOP = {"ckptsurgeon.api", "ckptsurgeon.cli", "ckptsurgeon.__main__"}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_nothing_in_the_package_imports_the_cli_or_the_api() -> None:
    graph = _graph()
    offenders = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m not in TOP | {"ckptsurgeon"}
        for d in deps
        if d in TOP
    ]
    assert not offenders, offenders


def test_layers_below_do_not_import_layers_above() -> None:
    graph = _graph()
    upward = []
    for module, deps in graph.items():
        here = _layer(module)
        for dep in deps:
            there = _layer(dep)
            if here is not None and there is not None and there > here:
                upward.append(f"{module} -> {dep}")
    assert not upward, sorted(upward)


def test_the_job_rules_and_atomic_writes_import_no_torch() -> None:
    """The CLI hashes the source ahead and writes --report before torch is loaded."""
    import subprocess
    import sys

    modules = ["ckptsurgeon.job", "ckptsurgeon.rules.document", "ckptsurgeon.formats.atomic"]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
