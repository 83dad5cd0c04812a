"""The layering of DESIGN.md, checked on the imports: no module imports anything from a higher layer."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "slimformer"
LAYERS = {  # top-level module or package -> layer
    "errors": 0, "machine": 0, "files": 0, "records": 0,
    "models": 1, "data": 1,
    "calibration": 2,
    "methods": 3, "evaluation": 3, "search": 3, "export": 3,
    "report": 4, "recipes": 4, "auto": 4,
    "cli": 5,
}


def imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slimformer."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("slimformer.")}
    return names


def test_no_module_imports_a_higher_layer():
    checked = 0
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if rel[0] == "__init__.py":
            continue
        own = LAYERS[rel[0].removesuffix(".py")]
        for name in imported(ast.parse(path.read_text())):
            assert LAYERS[name] <= own, f"{'/'.join(rel)} (layer {own}) imports slimformer.{name} (layer {LAYERS[name]})"
        checked += 1
    assert checked > 15
