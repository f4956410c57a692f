import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "0"], "argument --runs: must be a whole number ≥ 1, not '0'"),
        (["--only", "layer,speed"], "argument --only: unknown part 'speed' (choose from layer,"),
        (
            ["--only", "scaling", "--resolution", "1000"],
            "--resolution 1000 (scaling also builds at 2000 m): 2000 m does not divide the "
            "bbox x extent",
        ),
        (["--only", "layer", "--layer-resolution", "123"], "--layer-resolution 123: 123 m does"),
        (["--spec", "missing.geojson"], "missing.geojson"),
    ],
)
def test_bad_options_end_with_one_clear_line(args, message):
    result = bench(*args)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m bench: error: ")
    assert message in last
    assert "Traceback" not in result.stderr
