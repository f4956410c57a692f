"""The command line: clear one-line errors for bad input, help that matches the code."""

import json
import subprocess
import sys

import pytest

from polar_cube.grid import TargetGrid
from polar_cube.spec import load_spec


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_spec_check_summarises_the_repo_spec(repo_spec_path):
    spec = load_spec(repo_spec_path)
    grid = TargetGrid.from_spec(spec)
    result = run_cli("spec", "check", str(repo_spec_path))
    assert result.returncode == 0, result.stderr
    assert (
        f"{len(spec.variables)} variables from {len(spec.sources)} sources on a "
        f"{grid.width}x{grid.height} grid at {grid.resolution:g} m"
    ) in result.stdout


def test_bad_spec_is_one_clear_line_not_a_traceback(tmp_path, repo_spec_path):
    document = json.loads(repo_spec_path.read_text())
    document["properties"]["variables"][0]["resampling"] = "bicubic"
    bad = tmp_path / "bad.geojson"
    bad.write_text(json.dumps(document))
    result = run_cli("spec", "check", str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bad.geojson: invalid spec" in result.stderr
    assert "variables[0:curie_depth_200km].resampling" in result.stderr


@pytest.mark.parametrize(
    ("resolution", "problem"),
    [
        ("2000", "--resolution 2000: 2000 m does not divide the bbox x extent 1953000 m"),
        ("0", "--resolution 0: must be a positive number of metres"),
        ("-250", "--resolution -250: must be a positive number of metres"),
    ],
)
@pytest.mark.parametrize(
    "target",
    [["--output"], ["--datasets-only", "--store"]],
    ids=["cube-into-output", "datasets-only-into-store"],
)
def test_resolution_that_does_not_fit_the_grid(
    repo_spec_path, tmp_path, resolution, problem, target
):
    """Refused before anything is made: neither the cube's folder (`--output`) nor, with
    `--datasets-only`, the per-dataset cubes' (`--store`)."""
    result = run_cli(
        "build",
        "--spec",
        str(repo_spec_path),
        f"--resolution={resolution}",
        *target,
        str(tmp_path / "out"),
    )
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"polar-cube: error: {problem}")
    assert f"properties.spatial_bbox of {repo_spec_path}" in line
    assert not (tmp_path / "out").exists()


def test_help_lists_the_commands():
    result = run_cli("--help")
    for command in ("build", "demo", "sources", "spec", "view", "versions", "rollback", "prune"):
        assert command in result.stdout
    build_help = run_cli("build", "--help").stdout
    for option in (
        "--spec",
        "--only",
        "--resolution",
        "--source-mirror",
        "--cache",
        "--bucket-block",
        "--output",
        "--patch",
        "--datasets-only",
        "--store",
    ):
        assert option in build_help
    assert "with --datasets-only: where per-dataset cubes go" in " ".join(build_help.split())
    for command in ("versions", "rollback", "prune"):
        usage = " ".join(run_cli(command, "--help").stdout.split())
        for option in ("--bucket-block NAME | --output DIR", "--spec", "--resolution M"):
            assert option in usage, (command, option)
    assert "VERSION" in run_cli("rollback", "--help").stdout
    assert "--keep N" in run_cli("prune", "--help").stdout


def test_the_version_commands_need_their_arguments():
    """`rollback` without a version, `prune` without --keep: argparse's usage error (exit 2)
    before anything is read; --bucket-block and --output exclude each other."""
    for args, problem in [
        (["rollback"], "the following arguments are required: VERSION"),
        (["prune"], "the following arguments are required: --keep"),
        (
            ["versions", "--bucket-block", "b", "--output", "d"],
            "argument --output: not allowed with argument --bucket-block",
        ),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2, args
        assert result.stderr.splitlines()[-1].endswith(f"error: {problem}"), result.stderr
