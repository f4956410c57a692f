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
        "import polar_cube, polar_cube.dataset, polar_cube.merge, polar_cube.upload\n"
        "import polar_cube.publish, polar_cube.verify, polar_cube.source_bucket\n"
        "print(sorted(k for k in os.environ if k.startswith('PREFECT_')))\n"
        "print('prefect' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "False"], result.stdout
