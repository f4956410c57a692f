"""Every package the code imports is declared in pyproject.toml, and the lock pins it.

`bin/setup` installs requirements.lock and then the project with `--no-deps`, so a package
that the code imports but pyproject.toml does not declare still works here while
`pip install .` elsewhere breaks. These tests read the imports (ast, lazy imports inside
functions included) and compare them with pyproject.toml and requirements.lock; no import is
run. `bin/check-install` is the end-to-end proof (a fresh venv, `pip install .`, a build).
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# what `pip install .` installs (the Prefect layer's folders install under polar_cube)
LIBRARY_ROOTS = ("polar_cube", "tasks", "flows", "deployments", "cli")
# code that runs only from a checkout: its imports may also come from the `test` extra
CHECKOUT_ROOTS = ("tests", "bench")
OWN_MODULES = {"polar_cube", *LIBRARY_ROOTS, *CHECKOUT_ROOTS}
# imported, but deliberately not a declared dependency
EXCEPTIONS = {
    # GDAL's bindings must be built against the system libgdal (3.6.2 from Debian's
    # libgdal-dev), so bin/setup and bin/check-install install `gdal==$(gdal-config
    # --version)` themselves; xcube-core already requires `gdal` without a version.
    "osgeo": "GDAL",
}


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"pyproject.toml: cannot read the requirement {requirement!r}"
    return canonical(match.group(1))


def declared(*extras: str) -> dict[str, str]:
    """{normalised name: requirement string} of [project] dependencies (+ these extras)."""
    project = pyproject()["project"]
    requirements = list(project["dependencies"])
    for extra in extras:
        requirements += project["optional-dependencies"][extra]
    return {requirement_name(r): r for r in requirements}


def locked() -> dict[str, str]:
    """{normalised name: version} pinned in requirements.lock."""
    pins = {}
    for number, line in enumerate((REPO / "requirements.lock").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep, f"requirements.lock:{number}: not pinned with '==': {line!r}"
        pins[canonical(name)] = version.split(";", 1)[0].strip()
    return pins


def python_files(roots: Iterable[str]) -> list[Path]:
    return sorted(
        path
        for root in roots
        for path in (REPO / root).rglob("*.py")
        if "__pycache__" not in path.parts
    )


def imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, dotted name, line) of every absolute import in the file, wherever it stands.

    `from a.b import c` gives ("a.b", "a.b.c", line): c may be a module of its own, owned by
    another distribution than a.b (pystac's extensions are)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [alias.name for alias in node.names if alias.name != "*"]
            found += [(node.module, f"{node.module}.{name}", node.lineno) for name in names]
            found += [] if names else [(node.module, node.module, node.lineno)]
    return found


def third_party_imports(roots: Iterable[str]) -> list[tuple[str, str, Path, int]]:
    """(module, dotted name, file, line) of every import that is neither stdlib nor ours."""
    found = []
    for path in python_files(roots):
        for module, name, line in imports(path):
            top = module.partition(".")[0]
            if top in sys.stdlib_module_names or top in OWN_MODULES:
                continue
            found.append((module, name, path, line))
    return found


@cache
def top_level_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def distribution_files(distribution: str) -> frozenset[str]:
    return frozenset(str(f) for f in metadata.distribution(distribution).files or ())


def owning_distributions(module: str) -> list[str]:
    """The installed distribution(s) whose files hold this module (or the nearest package
    above it); all those providing its top-level name when no file says more."""
    candidates = sorted(set(top_level_distributions().get(module.split(".")[0], ())))
    if len(candidates) <= 1:
        return candidates
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        stem = "/".join(parts[:end])
        owners = [
            distribution
            for distribution in candidates
            if any(
                f == f"{stem}.py" or f == f"{stem}/__init__.py" or f.startswith(f"{stem}.cpython")
                for f in distribution_files(distribution)
            )
        ]
        if owners:
            return owners
    return candidates


def undeclared(roots: Iterable[str], allowed: dict[str, str]) -> list[str]:
    problems = []
    for module, name, path, line in third_party_imports(roots):
        where = f"{path.relative_to(REPO)}:{line}"
        if module.partition(".")[0] in EXCEPTIONS:
            continue
        owners = owning_distributions(name)
        if not owners:
            problems.append(f"{where}: imports {module!r}, which no installed distribution has")
        elif not any(canonical(owner) in allowed for owner in owners):
            problems.append(
                f"{where}: imports {module!r} from distribution {' or '.join(owners)!r}, "
                "which pyproject.toml does not declare"
            )
    return sorted(set(problems))


def test_library_imports_are_declared_dependencies():
    problems = undeclared(LIBRARY_ROOTS, declared())
    assert not problems, "add to [project] dependencies:\n" + "\n".join(problems)


def test_test_and_bench_imports_are_declared_with_the_test_extra():
    problems = undeclared(CHECKOUT_ROOTS, declared("test"))
    assert not problems, "add to [project.optional-dependencies] test:\n" + "\n".join(problems)


def test_the_scan_sees_lazy_and_submodule_imports(tmp_path):
    code = tmp_path / "example.py"
    code.write_text(
        "import numpy as np\n"
        "from . import sibling\n"
        "def later():\n"
        "    from pystac.extensions.projection import ProjectionExtension\n"
        "    import xarray.backends\n"
    )
    assert imports(code) == [
        ("numpy", "numpy", 1),
        ("pystac.extensions.projection", "pystac.extensions.projection.ProjectionExtension", 4),
        ("xarray.backends", "xarray.backends", 5),
    ]
    # pystac's core and each of its extensions are separate distributions
    assert owning_distributions("pystac.extensions.projection.ProjectionExtension") == [
        "pystac-ext-projection"
    ]
    assert owning_distributions("pystac.Item") == ["pystac-core"]


def test_every_dependency_is_locked_within_its_range():
    extras = tuple(pyproject()["project"].get("optional-dependencies", {}))
    pins = locked()
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip's tooling here
        Requirement = None
    problems = []
    for name, requirement in declared(*extras).items():
        if name not in pins:
            problems.append(f"{requirement!r} is not pinned in requirements.lock")
        elif Requirement and not Requirement(requirement).specifier.contains(
            pins[name], prereleases=True
        ):
            problems.append(f"requirements.lock pins {name}=={pins[name]}, outside {requirement!r}")
    assert not problems, "\n".join(problems)


def test_declared_exceptions_are_not_declared():
    # GDAL stays out of pyproject.toml (and the lock): its version follows the system library
    names = set(declared(*pyproject()["project"].get("optional-dependencies", {})))
    for distribution in EXCEPTIONS.values():
        assert canonical(distribution) not in names
        assert canonical(distribution) not in locked()


def test_every_package_folder_is_installed():
    """Each folder with an __init__.py under the library's roots is in [tool.setuptools]
    packages (a forgotten subpackage installs without its modules)."""
    setuptools = pyproject()["tool"]["setuptools"]
    folders = {package: REPO / package.replace(".", "/") for package in setuptools["packages"]}
    folders |= {package: REPO / path for package, path in setuptools["package-dir"].items()}
    listed = {folder.resolve() for folder in folders.values()}
    missing = [
        str(init.parent.relative_to(REPO))
        for root in LIBRARY_ROOTS
        for init in (REPO / root).rglob("__init__.py")
        if "__pycache__" not in init.parts and init.parent.resolve() not in listed
    ]
    assert not missing, f"not in [tool.setuptools] packages: {missing}"


@pytest.mark.parametrize("package", sorted(pyproject()["tool"]["setuptools"]["package-data"]))
def test_package_data_exists(package):
    setuptools = pyproject()["tool"]["setuptools"]
    folder = REPO / setuptools["package-dir"].get(package, package.replace(".", "/"))
    for pattern in setuptools["package-data"][package]:
        assert list(folder.glob(pattern)), f"{package}: no {pattern} in {folder}"
