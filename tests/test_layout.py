"""The package layout dvc.yaml relies on: each stage's code is one or two folders of digitpairs/, so
a folder dependency covers every module the stage imports, and no module imports in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.e2e import REPO

PACKAGE = REPO / "digitpairs"
# what each subpackage may import from the others (core: code every stage runs)
ALLOWED = {"core": set(), "data": {"core"}, "training": {"core", "data"}, "report": {"core"}}


def imports(path: Path) -> set[str]:
    """Every digitpairs module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("digitpairs"):
            found |= {f"{node.module}.{a.name}" if node.module.count(".") < 2 else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("digitpairs")}
    return found


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def graph() -> dict[str, set[str]]:
    modules = {module_of(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {i for i in imports(p) if i in modules and i != m} for m, p in modules.items()}


def test_subpackages_import_only_what_their_stages_declare():
    for module, deps in graph().items():
        parts = module.split(".")
        if len(parts) < 3:
            continue  # digitpairs/__init__.py: a file dependency of every stage
        for dep in deps - {"digitpairs"}:  # ray_executor ships the whole package to a cluster
            other = dep.split(".")[1]
            assert other == parts[1] or other in ALLOWED[parts[1]], f"{module} imports {dep}"


def test_no_import_cycle():
    g = graph()

    def visit(m: str, path: list[str]) -> None:
        for d in g[m]:
            assert d not in path, f"import cycle: {' -> '.join([*path, d])}"
            visit(d, [*path, d])

    for m in g:
        visit(m, [m])


def test_every_stage_depends_on_the_folders_of_the_code_it_imports():
    """A stage module's digitpairs imports, followed transitively, stay inside its declared deps."""
    g = graph()
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        module = stage["cmd"].split()[2]  # python -m stages.<name> [arg]
        path = REPO / Path(*module.split(".")).with_suffix(".py")
        todo, seen = {i for i in imports(path) if i in g} | {"digitpairs"}, set()
        while todo:
            m = todo.pop()
            seen.add(m)
            todo |= g[m] - seen
        declared = {d for d in stage["deps"] if d.startswith(("digitpairs", "stages"))}
        assert {"stages/__init__.py", str(path.relative_to(REPO))} <= declared, name
        for m in seen:
            file = Path(*m.split("."))
            covered = any(
                str(file.with_suffix(".py")) == d or str(file / "__init__.py") == d or str(file).startswith(d + "/")
                for d in declared
            )
            assert covered, f"stage {name} imports {m}, which dvc.yaml does not declare"
