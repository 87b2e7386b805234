"""The package's layers import only the layers before them: core <- tasks <- engine <- io <- runs <- cli. Inside the
package no module imports the package face (`jaxtrace/__init__.py`), the module-level imports have no cycle, and
every folder of modules is a package (has an `__init__.py`)."""

import ast
from pathlib import Path

import jaxtrace

LAYERS = ("core", "tasks", "engine", "io", "runs", "cli")
PACKAGE = Path(jaxtrace.__file__).parent


def imported_layers(path: Path) -> set[str]:
    """The jaxtrace layers a module imports, at its top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("jaxtrace.") and name.split(".")[1] in LAYERS}


def test_each_layer_imports_only_earlier_layers():
    offences = []
    for rank, layer in enumerate(LAYERS):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            later = {other for other in imported_layers(path) if LAYERS.index(other) > rank}
            offences += [f"{path.relative_to(PACKAGE)} imports jaxtrace.{other}" for other in sorted(later)]
    assert not offences, offences
    assert all((PACKAGE / layer).is_dir() for layer in LAYERS)


def test_relative_imports_stay_inside_their_layer():
    """`from ..x import y` would bypass the check above: the package uses absolute imports only."""
    relative = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                if any(isinstance(n, ast.ImportFrom) and n.level > 0 for n in ast.walk(ast.parse(path.read_text())))]
    assert not relative, relative


def test_no_module_imports_the_package_face():
    """`import jaxtrace` / `from jaxtrace import x` inside the package would run through `jaxtrace/__init__.py`,
    which imports every layer (an import cycle); modules import the module that defines a name instead."""
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(alias.name == "jaxtrace" for alias in node.names):
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: import jaxtrace")
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "jaxtrace":
                offences.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: from jaxtrace import "
                                + ", ".join(alias.name for alias in node.names))
    assert not offences, offences


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def top_level_imports(tree: ast.Module):
    """The import statements run when the module is imported: at its top, in a class body or under a top-level
    `if`/`try`/`with`, not inside functions nor under `if TYPE_CHECKING:`."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
        else:
            pending.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
            if isinstance(node, ast.Try) or (hasattr(ast, "TryStar") and isinstance(node, ast.TryStar)):
                pending.extend(statement for handler in node.handlers for statement in handler.body)


def import_graph() -> dict[str, set[str]]:
    """Each jaxtrace module -> the jaxtrace modules its module-level imports name: `import a.b` names `a.b`, and
    `from a.b import c` names `a.b.c` when that is a module, else `a.b`. (The parent packages Python runs first are
    not edges: a package's `__init__` importing its own submodules, which import each other, is no cycle.)"""
    modules = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif node.level == 0 and node.module:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_module_level_imports_have_no_cycle():
    graph = import_graph()
    assert {"jaxtrace", "jaxtrace.version", "jaxtrace.core.models.base", "jaxtrace.cli"} <= graph.keys()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("import a\nif TYPE_CHECKING:\n    import b\ndef f():\n    import c\nclass K:\n    import d\n"
                     "try:\n    import e\nexcept ImportError:\n    import f\n")
    assert sorted(alias.name for node in top_level_imports(tree) for alias in node.names) == ["a", "d", "e", "f"]


def test_every_folder_of_modules_is_a_package():
    folders = sorted({path.parent for path in PACKAGE.rglob("*.py")})
    missing = [str(folder.relative_to(PACKAGE.parent)) for folder in folders if not (folder / "__init__.py").is_file()]
    assert not missing, f"folders without an __init__.py: {missing}"
