"""The README opens with the two commands, and CI runs the second one."""

import re

from tests.conftest import REPO


def code_blocks():
    return re.findall(r"```bash\n(.*?)\n```", (REPO / "README.md").read_text(), re.S)


def test_readme_starts_with_the_main_and_the_test_command():
    main, tests = code_blocks()[:2]
    assert main == "bash bin/setup && .venv/bin/polar-cube demo"
    assert tests == "bash bin/setup && .venv/bin/python -m pytest"
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests
