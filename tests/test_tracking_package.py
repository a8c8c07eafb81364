"""``psydef.tracking`` is a package of one module per concept; callers use ``tracking.X`` for any of them."""
import ast
import importlib
import pkgutil
from pathlib import Path

from psydef import tracking


def _public_names(module) -> list[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
    return [n for n in names if not n.startswith("_") and n != "logger"]


def test_every_public_name_of_every_tracking_module_is_tracking_x():
    modules = [importlib.import_module(f"psydef.tracking.{m.name}") for m in pkgutil.iter_modules(tracking.__path__)]
    assert {m.__name__.rsplit(".", 1)[1] for m in modules} == {
        "names", "store", "writes", "queries", "runs", "liveness", "lease", "models"}
    for module in modules:
        missing = [n for n in _public_names(module) if getattr(tracking, n, None) is not getattr(module, n)]
        assert not missing, f"{module.__name__}: not re-exported by psydef.tracking: {missing}"


def test_names_hold_only_names():
    """names.py imports nothing from MLflow and defines no function but the URI spelling."""
    source = Path(importlib.import_module("psydef.tracking.names").__file__).read_text()
    assert "mlflow" not in {n.names[0].name.split(".")[0] for n in ast.parse(source).body
                            if isinstance(n, (ast.Import, ast.ImportFrom)) and n.names} | {
        (n.module or "").split(".")[0] for n in ast.parse(source).body if isinstance(n, ast.ImportFrom)}
    functions = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    assert functions == ["registered_model_uri"]
