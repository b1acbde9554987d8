"""The shape of the package (docs/architecture.md): layers that import downward only, no import
circle, no module reading another's underscore names, docstrings without stray control characters.

Every check reads the source with ``ast``; imports inside functions count as much as those at
the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "polyak"

#: The layers, bottom first; a module may import its own layer or the ones below.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (
        "polyak.validation",
        "polyak.interrupts",
        "polyak.registry",
        "polyak.tensors",
        "polyak.schedules",
        "polyak.kernels",
        "polyak.gpu",
        "polyak.tuning",
        "polyak.engine",
        "polyak.sharded",
    ),
    "files": ("polyak.files", "polyak.checkpoint"),
    "averages": (
        "polyak.health",
        "polyak.models",
        "polyak.openmmlab",
        "polyak.averaged_model",
        "polyak.parameter_average",
        "polyak.group",
        "polyak.posthoc",
        "polyak.bn",
        "polyak.rl",
        "polyak.compat",
    ),
    "scale": ("polyak.distributed",),
    "edge": ("polyak.hooks", "polyak.integrations", "polyak.cli", "polyak.__main__", "polyak"),
}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = list(f.relative_to(SRC.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (f, package)
    return out


MODULES = _modules()


def _imports(module: str) -> set[str]:
    """The polyak modules ``module`` imports, at any depth of its code (a name imported from a
    package counts as its submodule when there is one)."""
    path, package = MODULES[module]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        out |= {t for t in targets if t in MODULES and t != module}
    return out


EDGES = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    best = None
    for rank, prefixes in enumerate(LAYERS.values()):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (rank, len(p))
    assert best is not None, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return best[0]


def test_every_module_has_a_layer() -> None:
    for m in MODULES:
        _layer(m)


def test_layers_import_downward_only() -> None:
    names = list(LAYERS)
    upward = [
        f"{m} ({names[_layer(m)]}) imports {t} ({names[_layer(t)]})"
        for m, targets in EDGES.items()
        for t in sorted(targets)
        if _layer(t) > _layer(m)
    ]
    assert upward == []


def test_no_import_circle() -> None:
    """Depth-first search for a cycle in the import graph (a package and its submodules count
    as separate nodes, so a submodule importing its own package's ``__init__`` while that imports
    it is a circle too)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(EDGES[m]):
            if state.get(t) == 1:
                circles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)
    assert circles == [], " ; ".join(" -> ".join(c) for c in circles)


def _private_definitions(path: Path) -> set[str]:
    """Underscore names a module defines: functions, classes, methods, attributes assigned on
    ``self``/``cls`` or at module level (dunder names excluded)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            targets = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            for t in targets:
                if isinstance(t, ast.Attribute):
                    names.append(t.attr)
                elif isinstance(t, ast.Name):
                    names.append(t.id)
        out |= {n for n in names if n.startswith("_") and not n.startswith("__")}
    return out


def test_no_module_reads_another_modules_underscore_names() -> None:
    defined = {m: _private_definitions(p) for m, (p, _) in MODULES.items()}
    owners: dict[str, set[str]] = {}
    for m, names in defined.items():
        for n in names:
            owners.setdefault(n, set()).add(m)
    found = []
    for m, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            used: list[str] = []
            if isinstance(node, ast.Attribute):
                used = [node.attr]
            elif isinstance(node, ast.ImportFrom):
                used = [a.name for a in node.names]
            for n in used:
                if n in owners and m not in owners[n]:
                    found.append(f"{m}:{node.lineno} uses {n} of {sorted(owners[n])}")
    assert found == []


def _docstrings(path: Path) -> list[tuple[str, str]]:
    out = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((getattr(node, "name", "<module>"), doc))
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_docstrings_have_no_stray_control_characters(module: str) -> None:
    """A single backslash before b, t, r, f or v in a (non-raw) docstring becomes a control
    character, and the maths renders wrong (``\\bar`` is a backspace and ``ar``)."""
    path, _ = MODULES[module]
    for name, doc in _docstrings(path):
        bad = sorted({repr(c) for c in doc if c in "\t\r\f\v\b\a"})
        assert not bad, f"{module}.{name} docstring holds {', '.join(bad)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_says_what_it_holds(module: str) -> None:
    path, _ = MODULES[module]
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{module} has no module docstring"


def _is_write(node: ast.Call) -> bool:
    """Whether a call writes or renames a file: ``torch.save``, ``dcp.save``, ``save_file``,
    ``.write_text``, ``.write_bytes``, ``.savefig``, ``os.replace``, ``os.rename``,
    ``open(..., "w...")``."""
    func = node.func
    if isinstance(func, ast.Attribute):
        owner = getattr(func.value, "id", "")
        if func.attr == "save" and owner in ("torch", "dcp"):
            return True
        if func.attr in ("write_text", "write_bytes", "savefig"):
            return True
        return func.attr in ("replace", "rename") and owner == "os"
    if isinstance(func, ast.Name):
        if func.id == "save_file":
            return True
        if func.id == "open" and len(node.args) > 1:
            mode = node.args[1]
            return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and "w" in mode.value
    return False


def _writes_outside_the_atomic_writer() -> list[str]:
    """Calls that write or rename a file outside ``polyak.files``, except inside an
    ``atomic_write(...)`` or ``atomic_directory(...)`` call: where each such call sits."""
    found = []
    for module, (path, _) in MODULES.items():
        if module == "polyak.files" or module.startswith("polyak.files."):
            continue
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not _is_write(node):
                continue
            above = _ancestors(node, parents)
            if any(_calls(p, ("atomic_write", "atomic_directory")) for p in above):
                continue
            function = next((p.name for p in above if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef))), "")
            found.append(f"{module}.{function}")
    return sorted(set(found))


def _calls(node: ast.AST, names: tuple[str, ...]) -> bool:
    if isinstance(node, ast.Call):
        func = node.func
        return str(getattr(func, "attr", getattr(func, "id", ""))).endswith(names)
    if isinstance(node, (ast.With, ast.AsyncWith)):
        return any(_calls(item.context_expr, names) for item in node.items)
    return False


def _ancestors(node: ast.AST, parents: dict) -> list[ast.AST]:
    out = []
    while node in parents:
        node = parents[node]
        out.append(node)
    return out


def test_every_file_polyak_writes_goes_through_the_atomic_writer() -> None:
    """The only write outside polyak.files that is not inside an ``atomic_write(...)`` call is the
    demo's PNG encoder, which ``atomic_write`` calls on its temporary file."""
    assert _writes_outside_the_atomic_writer() == ["polyak.cli.demo._save_png"]
