"""The package's layers import only the layers before them: core <- tasks <- engine <- io <- runs <- cli."""

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
