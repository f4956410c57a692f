"""`pip install .` into a fresh virtual environment gives a working `polar-cube`: the whole of
`bin/check-install` (a new venv, a real non-editable install with the lock as constraints
only, every module imported, `--help`, `spec check`, stand-ins served over HTTP, a 3 km
build and the cube opened, all from outside the checkout), run by the suite so that it runs
beside the other tests."""

import os
import subprocess

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_a_fresh_pip_install_builds_and_opens_a_cube():
    checked = subprocess.run(
        ["bash", str(REPO / "bin" / "check-install")],
        # the test session's Prefect and AWS settings stay out of it, as on a user's machine
        env={k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert checked.returncode == 0, checked.stdout[-6000:] + checked.stderr[-3000:]
    assert "check-install: passed in" in checked.stdout
    for step in ("import-every-module", "spec-check", "build", "open-cube"):
        assert f"check-install: {step}" in checked.stdout, checked.stdout[-3000:]
