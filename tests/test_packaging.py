"""What the shipped code imports must be installed by a plain `pip install .` (not only by the test extras)."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0] for req in project["dependencies"]}
    return {name.lower().replace("_", "-") for name in names}


def _imported_top_level_modules() -> set[str]:
    modules = set()
    for path in list((ROOT / "services").rglob("*.py")) + list((ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def test_every_third_party_import_of_the_shipped_code_is_a_declared_dependency() -> None:
    declared = _declared_distributions()
    providers = packages_distributions()
    undeclared = {}
    for module in sorted(_imported_top_level_modules()):
        if module in sys.stdlib_module_names or module in ("services", "__future__"):
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists & declared and not _pulled_in_by_declared(dists, declared):
            undeclared[module] = sorted(dists) or ["(not installed)"]
    assert not undeclared, f"imported by services/ or scripts/ but not in [project] dependencies: {undeclared}"


def _pulled_in_by_declared(dists: set[str], declared: set[str]) -> bool:
    """botocore comes with boto3, starlette and anyio with fastapi: a dependency of a declared dependency."""
    from importlib.metadata import requires

    for name in declared:
        for req in requires(name) or []:
            if "extra ==" in req:
                continue
            if re.split(r"[<>=!~\[ ;(]", req, maxsplit=1)[0].lower().replace("_", "-") in dists:
                return True
    return False
