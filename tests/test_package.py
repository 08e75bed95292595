"""The package's shape: no import cycle (between modules or between its folders), light entry points."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import hf_contmerge

PACKAGE = Path(hf_contmerge.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in it (lazy imports included; imports
    under ``if TYPE_CHECKING:`` are not made at run time and are left out)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node)
                for child in node.body for n in ast.walk(child)}
        found: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.add(base)
                found |= {f"{base}.{a.name}" for a in node.names}  # `from . import layout` imports a module
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_between_modules():
    graph = import_graph()
    assert "hf_contmerge.engine.run" in graph and graph["hf_contmerge.engine.run"]  # the walk sees imports
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_no_import_cycle_between_folders():
    """io, sources, methods, engine, artifacts, hub, … form layers: no folder imports one that imports it."""
    def folder(module: str) -> str:
        return ".".join(module.split(".")[:2])

    layers: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        if module == "hf_contmerge":
            continue  # the package's own __init__ (lazy public names) is not a folder
        layers.setdefault(folder(module), set()).update(folder(m) for m in imported if folder(m) != folder(module))
    assert _cycle(layers) is None, f"folders import each other: {' -> '.join(_cycle(layers))}"


def test_cycle_detector_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_needs_neither_torch_nor_transformers():
    out = _python(
        "import contextlib, io, json, sys\n"
        "from hf_contmerge.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))\n"
    )
    assert json.loads(out) == []


def test_importing_opcm_does_not_import_the_hub_client():
    out = _python("import json, sys; import hf_contmerge.methods.opcm; "
                  "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'huggingface_hub')))")
    assert json.loads(out) == []


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "hf_contmerge", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "merge" in done.stdout and "inspect" in done.stdout
    done = subprocess.run([sys.executable, "-m", "hf_contmerge", "merge", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--stream" in done.stdout and "opcm" in done.stdout  # the methods, built lazily


def test_public_names_resolve_lazily():
    out = _python("import json, sys; import hf_contmerge as h; before = 'hf_contmerge.api' in sys.modules; "
                  "names = [n for n in h.__all__ if getattr(h, n) is None]; "
                  "print(json.dumps([before, names, h.__version__]))")
    before, missing, version = json.loads(out)
    assert before is False and missing == [] and version == hf_contmerge.__version__
