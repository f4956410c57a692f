import sys
import textwrap

import pytest

from bench.measure import CommandFailed, measure_command

MB = 2**20

# A parent holding 150 MB whose child holds 100 MB at the same time.
TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    held = b"p" * (150 * 2**20)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; held = b'c' * (100 * 2**20); time.sleep(1.5)"]
    )
    child.wait()
    print("parent done", len(held))
    """
)


def test_peak_rss_sums_the_whole_process_tree(tmp_path):
    measured = measure_command(
        [sys.executable, "-c", TREE], tmp_path / "tree.log", what="a process tree"
    )
    assert measured.wall_seconds >= 1.5
    assert 150 * MB <= measured.largest_process_peak_bytes < 240 * MB  # the parent alone
    # not a copy of this (pytest) process between fork and exec either
    assert measured.tree_peak_bytes >= 250 * MB  # parent and child together
    assert measured.peak_rss_bytes == measured.tree_peak_bytes
    assert max(rss for _, rss in measured.samples) == measured.tree_peak_bytes
    assert "parent done" in (tmp_path / "tree.log").read_text()


def test_a_failing_command_is_named_with_its_exit_code_and_log(tmp_path):
    log = tmp_path / "fails.log"
    command = [sys.executable, "-c", "print('something broke'); raise SystemExit(3)"]
    with pytest.raises(CommandFailed) as failure:
        measure_command(command, log, what="the failing step (run 1/1)")
    message = str(failure.value)
    assert message.startswith("the failing step (run 1/1) failed with exit code 3;")
    assert str(log) in message and "something broke" in message


def test_a_missing_program_is_named(tmp_path):
    with pytest.raises(CommandFailed, match="^gdal step: cannot start /nonexistent/gdalwarp:"):
        measure_command(["/nonexistent/gdalwarp"], tmp_path / "x.log", what="gdal step")
