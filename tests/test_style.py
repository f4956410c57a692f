import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_code_is_ruff_clean():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_importing_the_library_sets_no_prefect_environment():
    """The library is plain functions: importing it (all of its core modules) leaves the
    environment's PREFECT_* settings alone and does not import Prefect."""
    code = (
        "import os, sys\n"
        "import polar_cube, polar_cube.dataset, polar_cube.keys, polar_cube.cube.merge\n"
        "import polar_cube.cube.carry, polar_cube.cube.target, polar_cube.cube.versions\n"
        "import polar_cube.cube.verify, polar_cube.sources.staging\n"
        "print(sorted(k for k in os.environ if k.startswith('PREFECT_')))\n"
        "print('prefect' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "False"], result.stdout


PREFECT_LAYER = ("polar_cube.tasks", "polar_cube.flows", "polar_cube.deployments", "polar_cube.cli")


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_library_imports_neither_prefect_nor_the_layers_above_it():
    """`polar_cube/` is plain functions: no Prefect, and nothing from tasks, flows,
    deployments or the command line, which depend on it (never the other way round)."""
    offenders = []
    for path in sorted((REPO / "polar_cube").rglob("*.py")):
        for module in _imported_modules(path):
            top = module.split(".")[0]
            if top in ("prefect", "prefect_aws", "prefect_dask", "flows", "tasks") or (
                module.startswith(PREFECT_LAYER)
            ):
                offenders.append(f"{path.relative_to(REPO)}: {module}")
    assert offenders == []


def test_tasks_and_flows_never_import_the_command_line():
    offenders = [
        f"{path.relative_to(REPO)}: {module}"
        for folder in ("tasks", "flows", "deployments")
        for path in sorted((REPO / folder).rglob("*.py"))
        for module in _imported_modules(path)
        if module.startswith("polar_cube.cli")
    ]
    assert offenders == []


def test_installing_adds_no_generic_top_level_package(tmp_path):
    """Outside the checkout, only `polar_cube` is importable: the Prefect layer's folders are
    installed as polar_cube.tasks, .flows, .deployments and .cli."""
    code = (
        "import importlib.util as u\n"
        "print([n for n in ('flows', 'tasks', 'deployments', 'cli') if u.find_spec(n)])\n"
        "import polar_cube.flows.build_cube, polar_cube.cli, polar_cube.deployments.operate\n"
        "print(polar_cube.flows.build_cube.build_cube.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "build-cube"], result.stdout
