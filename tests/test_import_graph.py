"""The import graph keeps DESIGN.md's layers; each rule is an error naming file:line.

1. Production never imports the toy world: every module under components/ (except
   components/toy/), tasks/ and flows/ is parsed, and any import of `components.toy` fails.
   The toy plugs in through entry points instead: judges, sources, and its commands
   (`lcmlora.cli`: components/toy/cli.py, mounted by flows/cli.py).
2. The library never climbs: no module under components/ (components/toy/ included) imports
   `flows` or `tasks`. What the command lines share lives in the library
   (components/cli/conventions.py, components/cli/progress_view.py).
3. No import circle among the modules of components/, tasks/ and flows/, the modules of one
   package among themselves included; each circle is reported as its files and the imports
   that close it.
4. The packages are layered: `LAYERS` orders components' packages and top modules, lowest first,
   with tasks/ and flows/ above them; a module imports only modules of its own layer or lower.

Every rule sees absolute imports, imports inside functions, and `import_module` / `__import__`
calls with a literal module name; rules 3 and 4 see relative imports too."""

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


# --- 3. and 4.: the module graph --------------------------------------------------------

# Lowest first; a module may import its own layer and those below. Packages stand as one entry
# so that moving files inside one (components/stages/ is being regrouped) keeps the table.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("components.config", "components.executables", "components.paths", "components.progress",
     "components.run_summary", "components.storage"),
    ("components.claims", "components.data", "components.dvc_runner", "components.lineage",
     "components.models", "components.plugins"),
    ("components.lora",),
    ("components.distill", "components.evaluate", "components.registry"),
    ("components.cli", "components.preflight", "components.serve", "components.stages"),
    ("components.toy",),  # production never imports it (rule 1), so it may sit on top
    ("tasks",),
    ("flows",),
)
NAMESPACE = "components"  # the top package itself: a docstring, no layer of its own


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file for every .py under root/components, root/tasks and root/flows."""
    names = {}
    for top in PRODUCTION:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of the tree that importing `name` runs: its longest prefix that is a module."""
    parts = name.split(".")
    return next((m for i in range(len(parts), 0, -1) if (m := ".".join(parts[:i])) in modules), None)


def module_imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every import in `path` of another module of the tree, in line order."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[tuple[int, str | None]] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, _resolve(a.name, modules)) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            # `from a import b` runs a.b where b is a module, else only a.
            found |= {(node.lineno, _resolve(f"{source}.{a.name}", modules)) for a in node.names}
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            if (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) in (
                    "import_module", "__import__"):
                found.add((node.lineno, _resolve(node.args[0].value, modules)))
    return sorted((line, m) for line, m in found if m is not None and m != module)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph` with more than one node."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                on_stack.discard(top)
                component.append(top)
            on_stack.discard(node)
            if component:
                found.append(sorted([node, *component]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def check_import_circles(root: Path) -> list[str]:
    """Every import circle under `root`: its files, then each import inside it as file:line -> file."""
    modules = module_names(root)
    rel = {m: path.relative_to(root).as_posix() for m, path in modules.items()}
    imports = {m: module_imports(m, path, modules) for m, path in modules.items()}
    graph = {m: {target for _, target in found} for m, found in imports.items()}
    circles = []
    for members in _strongly_connected(graph):
        files = sorted(rel[m] for m in members)
        ties = sorted(f"{rel[m]}:{line} -> {rel[target]}" for m in members
                      for line, target in imports[m] if target in members)
        circles.append(f"circle of {len(files)} files: {', '.join(files)} ({'; '.join(ties)})")
    return sorted(circles)


def layer_of(module: str) -> tuple[int, str] | None:
    """(1-based layer, LAYERS entry) of `module`: the entry that is it or a package above it."""
    for number, entries in enumerate(LAYERS, start=1):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):
                return number, entry
    return None


def check_layers(root: Path) -> list[str]:
    """Every import of a higher layer, and every module in no layer, under `root`."""
    modules = module_names(root)
    violations = []
    for module, path in modules.items():
        if module == NAMESPACE:
            continue
        rel = path.relative_to(root).as_posix()
        if (own := layer_of(module)) is None:
            violations.append(f"{rel}: {module} stands in no layer; add it to LAYERS in "
                              "tests/test_import_graph.py where its imports put it")
            continue
        for line, target in module_imports(module, path, modules):
            theirs = layer_of(target)
            if theirs is not None and theirs[0] > own[0]:
                violations.append(f"{rel}:{line}: {module} (layer {own[0]}, {own[1]}) imports {target} "
                                  f"(layer {theirs[0]}, {theirs[1]}), a higher layer")
    return violations


def test_no_import_circle():
    modules = module_names(REPO)
    assert "components.storage.storage" in modules and "components.toy.hard.plugins" in modules
    assert "tasks.caching" in modules and "flows.cli" in modules
    circles = check_import_circles(REPO)
    assert circles == [], "import circles (move what both sides need into a module of its own):\n" + \
        "\n".join(circles)


def test_every_layer_entry_is_a_module_of_the_tree():
    modules = module_names(REPO)
    entries = [entry for layer in LAYERS for entry in layer]
    assert len(entries) == len(set(entries)), "an entry stands in two layers"
    stale = [entry for entry in entries if entry not in modules]
    assert stale == [], f"LAYERS names what is no module or package of the tree: {stale}"


def test_no_module_imports_a_higher_layer():
    violations = check_layers(REPO)
    assert violations == [], "imports that run back up the layers:\n" + "\n".join(violations)


def test_the_checkers_find_a_planted_circle_and_upward_import(tmp_path):
    files = {
        # A backend that takes its errors from the class that picks it, inside a function.
        "components/storage/storage.py": "from components.storage.local import LocalBackend\n",
        "components/storage/local.py": "import os\ndef f():\n    from components.storage.storage import StorageError\n",
        # Three files over two packages, one of them an arrow back up (models -> lora).
        "components/lora/io.py": "from components.models.base_model import load_base\n",
        "components/models/base_model.py": "import numpy\nimport components.models.layout\n",
        "components/models/layout.py": "from components.lora import io as lora_io\n",
        # Relative imports: `from . import x` and `from .x import y`.
        "components/data/encode.py": "from . import shards\n",
        "components/data/shards.py": "from .encode import encode_shard\n",
        "components/data/__init__.py": "",
        # Upward, but no circle.
        "components/evaluate/gate.py": "import importlib\nimportlib.import_module('components.stages.keys')\n",
        "components/stages/keys.py": "from components.storage.storage import Storage\nfrom components import config\n",
        "components/config.py": "import pydantic\n",
        "tasks/caching.py": "from components.stages.keys import output_rel\nfrom flows.cli import main\n",
        "flows/cli.py": "import components\nfrom tasks.caching import cached\n",
        "components/__init__.py": "",
        "components/newpkg/thing.py": "from components.config import Params\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert check_import_circles(tmp_path) == [
        ("circle of 2 files: components/data/encode.py, components/data/shards.py "
         "(components/data/encode.py:1 -> components/data/shards.py; "
         "components/data/shards.py:1 -> components/data/encode.py)"),
        ("circle of 2 files: components/storage/local.py, components/storage/storage.py "
         "(components/storage/local.py:3 -> components/storage/storage.py; "
         "components/storage/storage.py:1 -> components/storage/local.py)"),
        # tasks/ and flows/ are modules of the graph too.
        ("circle of 2 files: flows/cli.py, tasks/caching.py "
         "(flows/cli.py:2 -> tasks/caching.py; tasks/caching.py:2 -> flows/cli.py)"),
        ("circle of 3 files: components/lora/io.py, components/models/base_model.py, "
         "components/models/layout.py (components/lora/io.py:1 -> components/models/base_model.py; "
         "components/models/base_model.py:2 -> components/models/layout.py; "
         "components/models/layout.py:1 -> components/lora/io.py)"),
    ]
    assert sorted(check_layers(tmp_path)) == [
        ("components/evaluate/gate.py:2: components.evaluate.gate (layer 4, components.evaluate) imports "
         "components.stages.keys (layer 5, components.stages), a higher layer"),
        ("components/models/layout.py:1: components.models.layout (layer 2, components.models) imports "
         "components.lora.io (layer 3, components.lora), a higher layer"),
        ("components/newpkg/thing.py: components.newpkg.thing stands in no layer; add it to LAYERS in "
         "tests/test_import_graph.py where its imports put it"),
        "tasks/caching.py:2: tasks.caching (layer 7, tasks) imports flows.cli (layer 8, flows), a higher layer",
    ]
