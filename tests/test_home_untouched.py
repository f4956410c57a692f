"""Nothing is written outside the current folder's state folders unless asked: `polar-cube demo`
run with an empty HOME and no PREFECT_HOME leaves HOME empty (no ~/.aws, no ~/.prefect, no
~/.cache), keeps Prefect's database in `data/prefect/home`, and the snippets it prints open
the cube after the one `eval "$(…)"` line it prints (GDAL's with the real `gdalinfo`)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polar_cube.cli.app import STATE_FOLDERS, default_state_folders
from polar_cube.spec import load_spec
from tests.conftest import REPO, free_port_block

# not inherited by the demo: each would point a tool at a folder of its own choosing
FOREIGN = ("PREFECT_", "AWS_", "MPLCONFIGDIR", "XDG_", "DASK_")


def test_state_folders_default_to_the_current_folder_unless_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    environ = {"MPLCONFIGDIR": "/somewhere/else", "PREFECT_HOME": ""}
    default_state_folders(environ)
    assert environ == {
        "MPLCONFIGDIR": "/somewhere/else",  # set by the user: kept
        "PREFECT_HOME": str(tmp_path / STATE_FOLDERS["PREFECT_HOME"]),  # absolute
    }
    assert STATE_FOLDERS["PREFECT_HOME"] == "data/prefect/home"


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def block(output: str, title: str) -> str:
    lines = output.splitlines()
    start = lines.index(f"--- {title} ---")
    return "\n".join(lines[start + 1 : lines.index("---", start)])


@pytest.mark.slow
def test_demo_writes_nothing_under_home(tmp_path):
    home, project = tmp_path / "home", tmp_path / "project"
    home.mkdir()
    project.mkdir()
    for name in ("cube.geojson", "patch.yaml"):  # a user's folder with the spec and the patch
        shutil.copy(REPO / name, project / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN)} | {"HOME": str(home)}
    cli = [sys.executable, "-m", "polar_cube.cli"]
    demo = [*cli, "demo", "--scale", "small", "--resolution", "3000"]
    demo += ["--s3-port", str(free_port_block())]
    try:
        result = subprocess.run(
            demo, capture_output=True, text=True, timeout=900, cwd=project, env=env
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert listing(home) == []
        assert (project / "data/prefect/home/prefect.db").is_file()
        assert (project / "data/s3/server.json").is_file()

        # the printed snippets, in one bash after the printed line, from the same folder:
        # the xarray one opens the version `latest` names (the first: v1.1.0), read from the
        # catalog next to it
        output = result.stdout
        spec = load_spec(REPO / "cube.geojson").at_resolution(3000)
        assert f"the cube is at s3://polar-cube/{spec.data_id}\n" in output
        catalog = f"s3://polar-cube/{spec.series}.versions.json"
        assert f"latest of {spec.series}: {catalog} (`polar-cube versions`)\n" in output
        (eval_line,) = re.findall(r'first (eval "\$\(.+\)")$', output, re.M)
        assert eval_line.endswith(' s3 credentials)"')  # the default state folder: no option
        variables = sorted(v.name for v in load_spec(REPO / "cube.geojson").variables)
        xarray = block(output, "open the cube")
        assert '"profile"' not in xarray and "polar_cube" not in xarray
        assert catalog in xarray and spec.data_id not in xarray  # resolved when it runs
        show = "\nimport json\nprint('VARIABLES', json.dumps(sorted(cube.data_vars)))"
        opened = subprocess.run(
            ["bash", "-c", f'{eval_line}\nexec "$@"', "bash", sys.executable, "-c", xarray + show],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=project,
            env=env,
        )
        assert opened.returncode == 0, opened.stderr[-3000:]
        assert opened.stdout.splitlines()[0] == spec.data_id  # the snippet prints `name` first
        (line,) = [x for x in opened.stdout.splitlines() if x.startswith("VARIABLES ")]
        assert set(variables) <= set(json.loads(line.removeprefix("VARIABLES ")))

        gdal = block(output, "open it with GDAL")
        assert gdal.endswith(f"""gdalinfo 'ZARR:"/vsis3/polar-cube/{spec.data_id}"'""")
        listed = subprocess.run(
            ["bash", "-e", "-c", gdal],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=project,
            env=env,
        )
        assert listed.returncode == 0, listed.stderr[-3000:]
        subdatasets = re.findall(r'^  SUBDATASET_\d+_NAME=ZARR:".+":/(\w+)$', listed.stdout, re.M)
        assert set(variables) <= set(subdatasets)

        # `s3 credentials --gdal` names the published cube in its gdalinfo line
        credentials = subprocess.run(
            [*cli, "s3", "credentials", "--gdal"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=project,
            env=env,
        )
        assert credentials.returncode == 0, credentials.stderr
        assert f"""# gdalinfo 'ZARR:"/vsis3/polar-cube/{spec.data_id}"'""" in credentials.stdout
        assert listing(home) == []  # nor did the snippets or gdalinfo write there
    finally:
        subprocess.run([*cli, "s3", "stop"], timeout=120, cwd=project, env=env)
    assert not (project / "data/s3/server.json").exists()
