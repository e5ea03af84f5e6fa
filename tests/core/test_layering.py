"""Core code does not import the app: ``anystory.app`` (Gradio, the demo's page) sits on top of the core, so a
script, a training run or the ComfyUI pack never needs the app package to draw a routing map."""
import ast
from pathlib import Path

import anystory

ROOT = Path(anystory.__file__).parent


def _imported_modules(path: Path):
    package = ".".join(("anystory",) + path.relative_to(ROOT).parent.parts)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            yield ".".join(base + ([node.module] if node.module else []))


def test_no_core_module_imports_the_app():
    offenders = [f"{path.relative_to(ROOT)}: {name}"
                 for path in sorted(ROOT.rglob("*.py")) if "app" not in path.relative_to(ROOT).parts[:1]
                 for name in _imported_modules(path) if name == "anystory.app" or name.startswith("anystory.app.")]
    assert offenders == []


def test_the_scan_sees_app_imports():
    app_module = ROOT / "app" / "generation.py"
    assert any(name.startswith("anystory.") for name in _imported_modules(app_module))
