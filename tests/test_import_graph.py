"""The import graph keeps DESIGN.md's layers; each rule is an error naming file:line.

1. Production never imports the toy world: every module under components/ (except
   components/toy/), tasks/ and flows/ is parsed, and any import of `components.toy` fails.
   The toy plugs in through entry points instead: judges, sources, and its commands
   (`lcmlora.cli`: components/toy/cli.py, mounted by flows/cli.py).
2. The library never climbs: no module under components/ (components/toy/ included) imports
   `flows` or `tasks`. What the command lines share lives in the library
   (components/cli/conventions.py, components/cli/progress_view.py).

Both rules see absolute imports, imports inside functions, and `import_module` / `__import__`
calls with a literal module name."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY = "components.toy"
UPPER = ("flows", "tasks")  # the layers above components/
PRODUCTION = ("components", "tasks", "flows")
EXCLUDED = ("components/toy",)


def _is_toy(module: str) -> bool:
    return module == TOY or module.startswith(TOY + ".")


def _is_upper(module: str) -> bool:
    return module.split(".")[0] in UPPER


def imports_of(source: str, filename: str, wanted: Callable[[str], bool]) -> list[str]:
    """`file:line: what` for every import in `source` of a module `wanted` accepts, in line order."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if wanted(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if wanted(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            else:  # from components import toy
                found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names
                          if wanted(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and wanted(node.args[0].value):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, f"{name}({node.args[0].value!r})"))
    return [f"{filename}:{line}: {what}" for line, what in sorted(found)]


def toy_imports(source: str, filename: str) -> list[str]:
    """`file:line: what` for every import of the toy package in `source`, in line order."""
    return imports_of(source, filename, _is_toy)


def upward_imports(source: str, filename: str) -> list[str]:
    """`file:line: what` for every import of `flows` or `tasks` in `source`, in line order."""
    return imports_of(source, filename, _is_upper)


def production_modules(root: Path) -> list[Path]:
    """Every .py file under root/components, root/tasks and root/flows, less components/toy/."""
    files = []
    for top in PRODUCTION:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not any(rel == ex or rel.startswith(ex + "/") for ex in EXCLUDED):
                files.append(path)
    return files


def library_modules(root: Path) -> list[Path]:
    """Every .py file under root/components, the toy world included."""
    return sorted((root / "components").rglob("*.py"))


def check_import_graph(root: Path) -> list[str]:
    """Every production -> toy import under `root`, as `file:line: what`."""
    return [hit for path in production_modules(root)
            for hit in toy_imports(path.read_text(), path.relative_to(root).as_posix())]


def check_library_layer(root: Path) -> list[str]:
    """Every components -> flows/tasks import under `root`, as `file:line: what`."""
    return [hit for path in library_modules(root)
            for hit in upward_imports(path.read_text(), path.relative_to(root).as_posix())]


def test_production_never_imports_the_toy_world():
    modules = production_modules(REPO)
    assert len(modules) > 20 and REPO / "components" / "evaluate" / "evaluation.py" in modules and REPO / "flows" / "cli.py" in modules
    for top in ("flows", "tasks"):  # no exception: every module of the upper layers is checked
        assert set((REPO / top).rglob("*.py")) <= set(modules), top
    assert not any("components/toy" in m.as_posix() for m in modules)
    violations = check_import_graph(REPO)
    assert violations == [], "production imports the toy world:\n" + "\n".join(violations)


def test_the_library_never_imports_flows_or_tasks():
    modules = library_modules(REPO)
    assert len(modules) > 20 and REPO / "components" / "cli" / "conventions.py" in modules
    assert REPO / "components" / "toy" / "cli.py" in modules and REPO / "components" / "toy" / "hard" / "world.py" in modules
    violations = check_library_layer(REPO)
    assert violations == [], "components/ imports a layer above it:\n" + "\n".join(violations)


def test_the_checker_finds_every_form_of_toy_import(tmp_path):
    (tmp_path / "components" / "toy").mkdir(parents=True)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "components" / "toy" / "judges.py").write_text("from components.evaluate.judges import Judges\n")
    (tmp_path / "components" / "clean.py").write_text(
        "import components.toys_are_not_toy\nfrom components import judges\nimport importlib\n"
        "importlib.import_module('components.evaluate.judges')\n")
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


def test_the_checker_finds_every_form_of_upward_import(tmp_path):
    for folder in ("components/toy", "flows", "tasks"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "flows" / "cli.py").write_text("from tasks.progress import showing\nimport components\n")
    (tmp_path / "tasks" / "progress.py").write_text("import flows.runtime\n")  # not the library's rule
    (tmp_path / "components" / "clean.py").write_text(
        '"""Drawn by flows/cli.py; tasks/ wrap it."""\n'
        "import flowsy\nimport tasks_queue.worker\nfrom components import tasks, flows\n"
        "from components.flows_like import x\nimport importlib\n"
        "importlib.import_module('components.tasks')\n")
    (tmp_path / "components" / "bad.py").write_text(
        "import os\n"
        "import flows.cli\n"
        "import tasks\n"
        "from flows.cli_common import console\n"
        "from tasks import progress as p\n"
        "def f():\n"
        "    from tasks.progress import showing\n"
        "    import importlib\n"
        "    return importlib.import_module('flows.cli'), __import__('tasks.distill')\n")
    (tmp_path / "components" / "toy" / "cli.py").write_text(
        "from importlib import import_module\n"
        "view = import_module('flows.progress_view')\n"
        "from components.config import Params\n"
        "from flows import cli_common\n")
    violations = check_library_layer(tmp_path)
    assert violations == [
        "components/bad.py:2: import flows.cli",
        "components/bad.py:3: import tasks",
        "components/bad.py:4: from flows.cli_common import ...",
        "components/bad.py:5: from tasks import ...",
        "components/bad.py:7: from tasks.progress import ...",
        "components/bad.py:9: __import__('tasks.distill')",
        "components/bad.py:9: import_module('flows.cli')",
        "components/toy/cli.py:2: import_module('flows.progress_view')",
        "components/toy/cli.py:4: from flows import ...",
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
