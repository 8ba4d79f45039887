"""The package's shape, read from its source: no import cycles, one owner per state, one strategy seam.

These are the rules of DESIGN.md's "Architecture: owners and seams" that a reviewer would otherwise
check by hand on every change:
- no import cycle between torchkeel's modules, counting imports made inside functions (lazy ones)
  and the package ``__init__`` that importing a submodule runs; ``if TYPE_CHECKING:`` imports are not
  imports at run time and do not count;
- no module but the trainer's own (``loop.py``) reads or writes ``trainer._anything``;
- no module calls or reads another torchkeel module's private names (``dcp._read_manifest``);
- only ``torchkeel.parallel`` asks how a model is held (``isinstance`` against DDP or FSDP2, or
  ``parallel.sharded.is_sharded``): everything else asks the trainer's strategy.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "torchkeel"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of every node under an ``if TYPE_CHECKING:`` block."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            inside.update(id(sub) for sub in ast.walk(node))
    return inside


def imports_of(name: str) -> set[str]:
    """The torchkeel modules that importing (or running a function of) module ``name`` imports."""
    tree = ast.parse(MODULES[name].read_text())
    skip = type_checking_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchkeel"):
            targets += [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                        for a in node.names]
        elif isinstance(node, ast.Import):
            targets += [a.name for a in node.names if a.name.startswith("torchkeel")]
        for target in targets:
            # importing a.b.c runs the packages a.b and a too; the root package is where every import starts
            parts = target.split(".")
            for i in range(2, len(parts) + 1):
                step = ".".join(parts[:i])
                if step in MODULES and step != name and not name.startswith(step + "."):
                    found.add(step)
    return found


def cycle() -> list[str] | None:
    graph = {name: imports_of(name) for name in MODULES}
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep] if dep in path else [*path, name, dep]
            if dep not in state and (found := visit(dep, [*path, dep])):
                return found
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name, [name])):
            return found
    return None


def test_no_import_cycle_at_run_time_or_inside_functions() -> None:
    found = cycle()
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path, monkeypatch: object) -> None:
    """The rule above can fail: two modules that import each other, one lazily, are a cycle."""
    graph = {"torchkeel.a": "def f():\n    from torchkeel import b\n", "torchkeel.b": "from torchkeel.a import f\n"}
    for name, text in graph.items():
        (tmp_path / f"{name.split('.')[1]}.py").write_text(text)
    saved = dict(MODULES)
    try:
        MODULES.clear()
        MODULES.update({name: tmp_path / f"{name.split('.')[1]}.py" for name in graph})
        assert cycle() in (["torchkeel.a", "torchkeel.b", "torchkeel.a"], ["torchkeel.b", "torchkeel.a", "torchkeel.b"])
    finally:
        MODULES.clear()
        MODULES.update(saved)


def test_only_the_trainer_touches_its_private_attributes() -> None:
    offenders = []
    for name, path in MODULES.items():
        if name == "torchkeel.loop":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in ("trainer", "tr") and node.attr.startswith("_"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_only_the_parallel_package_asks_how_a_model_is_held() -> None:
    held = {"DistributedDataParallel", "FSDPModule", "DataParallel"}
    offenders = []
    for name, path in MODULES.items():
        if name.startswith("torchkeel.parallel"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass") \
                    and {n.attr if isinstance(n, ast.Attribute) else getattr(n, "id", "") for n in ast.walk(node.args[1])} & held:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, ast.Attribute) and node.attr == "is_sharded" and ast.unparse(node.value).endswith("sharded"):
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_no_module_reaches_into_another_modules_private_names() -> None:
    """``dcp._read_manifest`` from the store, ``io._entries`` from discovery: a private name is its module's
    own; another module that needs it gets a public one (or the seam that owns the question)."""
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = set()       # names this module binds to a torchkeel module
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchkeel"):
                aliases |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES}
            elif isinstance(node, ast.Import):
                aliases |= {a.asname for a in node.names if a.asname and a.name in MODULES}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)
