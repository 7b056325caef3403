"""The package tree keeps the shape docs/architecture.md describes.

Each check parses the sources (no import needed) and fails naming the file and the offence:
an import that points up the layer order or closes a cycle (imports inside functions count),
a file over the size limit, logic in an ``__init__.py``, h5py outside ``store/``, an import of
another module's private name, a run-directory file name spelled outside ``store/rundir.py``, a
dtype table outside ``core/dtypes.py``, or a string literal compared where a mode enum exists.
"""

from __future__ import annotations

import ast
import enum
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "logix"

# Lower layers first: a module may import only from its own layer or the ones before it.
LAYERS = ["errors", "config", "core", "store", "data", "capture", "analysis", "integrations",
          "contribution", "report", "jobs", "cli"]
MAX_LINES = 400
MAX_INIT_LOGIC_LINES = 40


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


SOURCES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in SOURCES.items()}


def _imports(name: str) -> list[tuple[str, list[str], int]]:
    """``(module imported, names taken from it, line)`` of every import in a module, functions included."""
    is_pkg = SOURCES[name].name == "__init__.py"
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, [a.name for a in node.names], node.lineno))
    return out


def _internal_targets(target: str, names: list[str]) -> list[str]:
    """The logix modules an import statement loads (``from logix.store import rundir`` loads a module)."""
    found = [target] if target in SOURCES else []
    found += [f"{target}.{n}" for n in names if f"{target}.{n}" in SOURCES]
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name in SOURCES:
        edges = set()
        for target, names, _ in _imports(name):
            edges.update(_internal_targets(target, names))
        edges.discard(name)
        graph[name] = edges
    return graph


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the logix package itself: the public API on top
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    strays = [m for m in SOURCES if m != "logix" and _layer(m) is None]
    assert not strays, f"modules outside the layers {LAYERS} (put them in a phase folder): {strays}"


def test_imports_point_down_the_layers():
    bad = []
    for name in SOURCES:
        for target, names, line in _imports(name):
            for module in _internal_targets(target, names):
                if module == "logix" and name != "logix":
                    bad.append(f"{SOURCES[name]}:{line} imports the top-level logix package")
                    continue
                mine, theirs = _layer(name), _layer(module)
                if mine is not None and theirs is not None and theirs > mine:
                    bad.append(f"{SOURCES[name]}:{line} ({LAYERS[mine]}) imports {module} ({LAYERS[theirs]})")
    assert not bad, "imports that point up the layer order:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (imports inside functions count): {cycles}"


def test_the_cycle_check_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_file_size(name):
    n = len(SOURCES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{SOURCES[name]} has {n} lines (limit {MAX_LINES}): split it by concern"


def _logic_lines(tree: ast.Module) -> int:
    lines = 0
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # the docstring
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            continue
        lines += node.end_lineno - node.lineno + 1
    return lines


@pytest.mark.parametrize("name", sorted(m for m, p in SOURCES.items() if p.name == "__init__.py"))
def test_init_files_only_re_export(name):
    n = _logic_lines(TREES[name])
    assert n <= MAX_INIT_LOGIC_LINES, f"{SOURCES[name]} holds {n} lines of logic: move it into a module"


def test_h5py_only_in_store():
    bad = [f"{SOURCES[m]}:{line}" for m in SOURCES if not m.startswith("logix.store")
           for target, _, line in _imports(m) if target.split(".")[0] == "h5py"]
    assert not bad, f"h5py imported outside logix/store/: {bad}"


def test_no_private_imports_across_modules():
    bad = [f"{SOURCES[m]}:{line} imports {target}.{n}" for m in SOURCES
           for target, names, line in _imports(m) if target.startswith("logix")
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "imports of another module's private names (make them public):\n" + "\n".join(bad)


def _rundir_names() -> set[str]:
    tree = TREES["logix.store.rundir"]
    values = {n.value.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)}
    # file names (with a suffix) and the folders only a run directory has
    return {v for v in values if isinstance(v, str) and ("." in v or v in ("stores", "scoring"))}


def test_run_directory_names_come_from_rundir():
    names = _rundir_names()
    assert {"run.json", "checkpoints.json", "stores", "scores.h5"} <= names
    bad = []
    for m in SOURCES:
        if m == "logix.store.rundir":
            continue
        for node in ast.walk(TREES[m]):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                bad.append(f"{SOURCES[m]}:{node.lineno} spells {node.value!r}")
    assert not bad, "run-directory names spelled outside logix/store/rundir.py:\n" + "\n".join(bad)


def _is_torch_dtype(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"
            and node.attr in ("float64", "float32", "float16", "bfloat16"))


def test_one_dtype_table():
    bad = [f"{SOURCES[m]}:{node.lineno}" for m in SOURCES if m != "logix.core.dtypes"
           for node in ast.walk(TREES[m])
           if isinstance(node, ast.Dict) and sum(_is_torch_dtype(v) for v in node.values) >= 2]
    assert not bad, f"name -> torch dtype tables outside logix/core/dtypes.py: {bad}"


def _mode_values() -> set[str]:
    """Every value of every config vocabulary (logix.config.choices) that reads as a mode name."""
    import logix.config.choices as choices

    values = set()
    for obj in vars(choices).values():
        if isinstance(obj, type) and issubclass(obj, enum.Enum) and obj is not choices.ChoiceEnum:
            values.update(m.value for m in obj)
    return values


def test_modes_are_compared_as_enums():
    values = _mode_values()
    bad = []
    for m in SOURCES:
        for node in ast.walk(TREES[m]):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            literals = [o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)]
            for o in operands:  # x in ("a", "b")
                if isinstance(o, (ast.Tuple, ast.List, ast.Set)):
                    literals += [e.value for e in o.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            hits = [v for v in literals if v in values]
            if hits:
                bad.append(f"{SOURCES[m]}:{node.lineno} compares with {hits}")
    assert not bad, "mode strings compared where an enum exists (use the enum member):\n" + "\n".join(bad)
