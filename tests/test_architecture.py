"""Issue 19: imports only point down the floors of docs/architecture.md, there is no circle,
and every error the project raises derives from the one base error."""

import importlib
import inspect
import subprocess

from polar_cube.errors import PolarCubeError
from tests.import_floors import circles, floor, imports, project_modules, upward
from tests.snippets import REPO, snippet


def test_the_documented_check_finds_no_import_up_a_floor_and_no_circle():
    checked = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", snippet("docs/architecture.md", "import-floors")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip().endswith(": 0 up a floor, 0 circles")


def test_the_check_sees_an_import_up_a_floor_and_a_circle():
    graph = {
        "polar_cube.spec": {"polar_cube.cube.merge"},  # floor 1 -> floor 5
        "polar_cube.cube.merge": {"polar_cube.cube.publish"},
        "polar_cube.cube.publish": {"polar_cube.cube.merge"},  # a circle on one floor
        "polar_cube.cube": {"polar_cube.cube.merge"},  # a package's face: no circle
    }
    assert upward(graph) == [("polar_cube.spec", "polar_cube.cube.merge")]
    assert circles(graph) == [["polar_cube.cube.merge", "polar_cube.cube.publish"]]


def test_the_floors_read_as_the_pipeline():
    ordered = [
        "polar_cube.spec",
        "polar_cube.sources.fetch",
        "polar_cube.resample",
        "polar_cube.dataset",
        "polar_cube.cube.merge",
        "polar_cube.servers.viewer",
        "polar_cube.flows.build_cube",
    ]
    assert [floor(m) for m in ordered] == [1, 2, 3, 4, 5, 6, 7]
    modules = project_modules()
    assert "polar_cube.cli.app" in modules and "polar_cube.tasks.cube" in modules


def test_errors_imports_nothing_from_the_project():
    assert imports(project_modules())["polar_cube.errors"] == set()


def test_every_error_the_project_defines_derives_from_the_base():
    not_based = []
    for name in sorted(project_modules()):
        if name.endswith(".__main__"):  # runs the command when imported
            continue
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            own = cls.__module__ == name and not cls_name.startswith("_")
            if own and issubclass(cls, Exception) and not issubclass(cls, PolarCubeError):
                not_based.append(f"{name}.{cls_name}")
    assert not_based == []
