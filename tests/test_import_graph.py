"""Production never imports the toy world: every module under components/ (except
components/toy/), tasks/ and flows/ (except flows/toy_cli.py, the toy's own command line) is
parsed, and any import of `components.toy` or `flows.toy_cli` is an error naming file:line.
The toy plugs in through entry points instead: judges, sources, and its commands
(`lcmlora.cli`, mounted by flows/cli.py)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = "components.toy"
TOY_CLI = "flows.toy_cli"
PRODUCTION = ("components", "tasks", "flows")
EXCLUDED = ("components/toy", "flows/toy_cli.py")


def _is_toy(module: str) -> bool:
    return module in (TOY, TOY_CLI) or module.startswith(TOY + ".")


def toy_imports(source: str, filename: str) -> list[str]:
    """`file:line: what` for every import of the toy package in `source`, in line order."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_toy(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if _is_toy(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            else:  # from components import toy
                found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                          if _is_toy(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _is_toy(node.args[0].value):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, f"{name}({node.args[0].value!r})"))
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


def production_modules(root: Path) -> list[Path]:
    """Every .py file under root/components, root/tasks and root/flows, less the toy's own."""
    files = []
    for top in PRODUCTION:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not any(rel == ex or rel.startswith(ex + "/") for ex in EXCLUDED):
                files.append(path)
    return files


def check_import_graph(root: Path) -> list[str]:
    """Every production -> toy import under `root`, as `file:line: what`."""
    return [hit for path in production_modules(root)
            for hit in toy_imports(path.read_text(), path.relative_to(root).as_posix())]


def test_production_never_imports_the_toy_world():
    modules = production_modules(REPO)
    assert len(modules) > 20 and REPO / "components" / "evaluation.py" in modules and REPO / "flows" / "cli.py" in modules
    assert REPO / "flows" / "toy_cli.py" not in modules
    assert not any("components/toy" in m.as_posix() for m in modules)
    violations = check_import_graph(REPO)
    assert violations == [], "production imports the toy world:\n" + "\n".join(violations)


def test_the_checker_finds_every_form_of_toy_import(tmp_path):
    (tmp_path / "components" / "toy").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "components" / "toy" / "judges.py").write_text("from components.judges import Judges\n")
    (tmp_path / "components" / "clean.py").write_text(
        "import components.toys_are_not_toy\nfrom components import judges\nimport importlib\n"
        "importlib.import_module('components.judges')\n")
    (tmp_path / "components" / "bad.py").write_text(
        "import os\n"
        "import components.toy.render\n"
        "from components.toy.judges import toy_judges\n"
        "from components import toy\n"
        "def f():\n"
        "    import importlib\n"
        "    return importlib.import_module('components.toy.classifier')\n")
    (tmp_path / "tasks" / "bad_task.py").write_text(
        "from importlib import import_module\n"
        "toy = import_module('components.toy')\n"
        "from components import config, toy as t\n")
    violations = check_import_graph(tmp_path)
    assert violations == [
        "components/bad.py:2: import components.toy.render",
        "components/bad.py:3: from components.toy.judges import ...",
        "components/bad.py:4: from components import toy",
        "components/bad.py:7: import_module('components.toy.classifier')",
        "tasks/bad_task.py:2: import_module('components.toy')",
        "tasks/bad_task.py:3: from components import toy",
    ]


def _project_imports() -> list[tuple[str, int, str, list[str]]]:
    """Every absolute `from components|tasks|flows|tests... import ...` in the repository's code."""
    found = []
    for folder in ("components", "tasks", "flows", "bench", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] in ("components", "tasks", "flows", "tests")):
                    found.append((str(path.relative_to(REPO)), node.lineno, node.module,
                                  [a.name for a in node.names if a.name != "*"]))
    return found


def test_every_project_import_resolves() -> None:
    """Imports inside functions run late (a nightly failed in distill on a moved name): check all now."""
    import importlib

    broken = []
    for where, line, module, names in _project_imports():
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            broken.append(f"{where}:{line}: {module}: {exc}")
            continue
        for name in names:
            if not hasattr(mod, name):
                try:
                    importlib.import_module(f"{module}.{name}")
                except ImportError:
                    broken.append(f"{where}:{line}: {module} has no {name}")
    assert not broken, "imports that fail at run time:\n" + "\n".join(broken)
