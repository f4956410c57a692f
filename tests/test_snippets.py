"""Every fenced block of README.md, deployments/README.md and docs/*.md is marked, and every
block marked as a snippet is run or checked by a test that reads it from its file.

Shell snippets that are cheap run as written (`bash -euo pipefail -c`) in a temporary copy;
those that need servers, a cluster or hours have each of their commands parsed by the real
parser (`polar-cube`'s argparse, Prefect's own CLI, the benchmark's) with their values
checked against the code they name. The last tests break snippets and show that the same
checks fail on them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import xarray as xr
import yaml

from polar_cube.grid import TargetGrid
from polar_cube.spec import load_spec
from tests.conftest import free_port_block, layer_count
from tests.snippets import CHECKED_FILES, FENCE_LINE, REPO, blocks, snippet

TEST_FILES = sorted([*(REPO / "tests").glob("*.py"), *(REPO / "bench" / "tests").glob("*.py")])
SNIPPET_CALL = re.compile(r'(?<!\w)snippet\("([^"]+)", "([^"]+)"\)')
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
CLI = REPO / ".venv" / "bin" / "polar-cube"
ADD_SOURCE = "docs/adding-a-source.md"


class SnippetError(AssertionError):
    """A snippet that does not hold: a command that does not parse, a path that is missing."""


# --- every block is marked, every snippet is used --------------------------------------------


def marker_problems(file: str, content: str) -> list[str]:
    """What is wrong with the markers of `file`'s blocks (its text is `content`)."""
    found = blocks(file, content)
    problems = []
    fences = len(FENCE_LINE.findall(content))
    if fences != 2 * len(found):
        problems.append(
            f"{file}: {fences} fence lines but {len(found)} blocks: a fence is unclosed, "
            "uses ~~~, or is indented differently from its closing fence"
        )
    names = {}
    for block in found:
        where = f"{file}:{block.line}: the ```{block.language} block"
        if block.kind is None:
            problems.append(
                f"{where} has no marker line right before it "
                "(<!-- snippet: NAME --> or <!-- not run: REASON -->)"
            )
        elif block.kind == "not run" and not block.label:
            problems.append(f"{where} is marked not run without a reason")
        elif block.kind == "snippet" and not NAME.match(block.label):
            problems.append(f"{where} has the snippet name {block.label!r} (use [a-z0-9._-])")
        elif block.kind == "snippet" and block.label in names:
            problems.append(f"{where} reuses the name {block.label!r} of line {names[block.label]}")
        if block.kind == "snippet":
            names.setdefault(block.label, block.line)
    return problems


def snippet_calls() -> set[tuple[str, str]]:
    """Every `snippet(FILE, NAME)` written in a test file."""
    return {call for path in TEST_FILES for call in SNIPPET_CALL.findall(path.read_text())}


@pytest.mark.parametrize("file", CHECKED_FILES)
def test_every_block_has_a_marker(file):
    problems = marker_problems(file, (REPO / file).read_text())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("file", CHECKED_FILES)
def test_every_snippet_is_used_by_a_test(file):
    calls = snippet_calls()
    unused = [
        f"{file}:{b.line}: snippet {b.label!r}: no test calls snippet({file!r}, {b.label!r})"
        for b in blocks(file)
        if b.kind == "snippet" and (file, b.label) not in calls
    ]
    assert not unused, "\n".join(unused)


def test_every_snippet_a_test_asks_for_exists():
    marked = {(f, b.label) for f in CHECKED_FILES for b in blocks(f) if b.kind == "snippet"}
    assert snippet_calls() - marked == set()


# --- running shell snippets ----------------------------------------------------------------------


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def run_bash(text: str, cwd: Path, *, timeout: float = 120, env: dict | None = None) -> Ran:
    """`text` run by `bash -euo pipefail -c` in `cwd`, in its own process group, which is
    killed afterwards (a snippet's background jobs end with it)."""
    out, err = cwd / ".snippet.out", cwd / ".snippet.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", text],
            cwd=cwd,
            env=env,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return Ran(returncode, out.read_text(), err.read_text())


def workspace(folder: Path) -> Path:
    """A folder to run the repository's snippets in: the spec and patch copied, `.venv`
    linked, so nothing is written into the checkout."""
    (folder / ".venv").symlink_to(REPO / ".venv")
    for name in ("cube.geojson", "patch.yaml"):
        shutil.copy(REPO / name, folder / name)
    return folder


# --- checking the commands of snippets that cannot run here ---------------------------------


def shell_commands(text: str) -> list[list[str]]:
    """The simple commands of a shell snippet, as words (comments and separators dropped)."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if set(token) <= set(";&|"):
                if words:
                    commands.append(words)
                words = []
            else:
                words.append(token)
    return commands


def parse_polar_cube(argv: list[str]):
    from polar_cube.cli.app import make_parser

    return parse_argparse(make_parser(), argv, "polar-cube")


def parse_argparse(parser, argv: list[str], program: str):
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parser.parse_args(argv)
    except SystemExit:
        message = errors.getvalue().strip().splitlines()[-1:]
        raise SnippetError(f"{program} {shlex.join(argv)}: {' '.join(message)}") from None


def parse_prefect(argv: list[str]):
    import cyclopts
    from prefect.cli._app import _app  # Prefect's own CLI (cyclopts), parsing only

    try:
        _, bound, _ = _app.parse_args(argv, exit_on_error=False, print_error=False)
    except cyclopts.CycloptsError as error:
        raise SnippetError(f"prefect {shlex.join(argv)}: {error}") from None
    return bound.arguments


def parse_python(argv: list[str]):
    if argv[:1] != ["-m"] or len(argv) < 2:
        raise SnippetError(f"python {shlex.join(argv)}: only `python -m MODULE` is checked")
    module, args = argv[1], argv[2:]
    if module == "bench":
        from bench.run import make_parser, make_plan

        parser = make_parser()
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                return make_plan(parser.parse_args(args), parser)
        except SystemExit:
            message = errors.getvalue().strip().splitlines()[-1:]
            message = " ".join(message)
            raise SnippetError(f"python -m bench {shlex.join(args)}: {message}") from None
    if module == "pytest" and not args:
        return None
    raise SnippetError(f"python -m {module} {shlex.join(args)}: no checker for it")


def check_bash_script(argv: list[str]):
    script = REPO / argv[0]
    if not script.is_file():
        raise SnippetError(f"bash {argv[0]}: no such file")
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    if result.returncode:
        raise SnippetError(f"bash {argv[0]}: {result.stderr.strip()}")


def check_export(argv: list[str]):
    for word in argv:
        if not re.fullmatch(r"[A-Za-z_]\w*=.*", word):
            raise SnippetError(f"export {word}: not NAME=VALUE")
    return dict(word.split("=", 1) for word in argv)


CHECKERS = {
    "polar-cube": parse_polar_cube,
    "prefect": parse_prefect,
    "python": parse_python,
    "bash": check_bash_script,
    "export": check_export,
}
# run for real by the test of the block that uses them
RUN_BY_THEIR_TEST = {"cp", "kill", "chromium"}


def check_commands(text: str, placeholders: dict[str, str] | None = None) -> list[tuple]:
    """Each command of a shell snippet, parsed by its program's real parser: a list of
    (program, parsed arguments). Raises SnippetError naming the first that does not hold.
    `placeholders` replaces words such as SCHEDULE_ID with sample values first."""
    for word, value in (placeholders or {}).items():
        text = re.sub(rf"\b{re.escape(word)}\b", value, text)
    syntax = subprocess.run(["bash", "-n", "-c", text], capture_output=True, text=True)
    if syntax.returncode:
        raise SnippetError(f"not valid bash: {syntax.stderr.strip()}")
    checked = []
    for words in shell_commands(text):
        while len(words) > 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
            words = words[1:]  # VAR=value before a command
        path, args = words[0], words[1:]
        program = Path(path).name
        if "/" in path and not (REPO / path).exists():
            raise SnippetError(f"{path}: no such program in the repository")
        if program in CHECKERS:
            checked.append((program, CHECKERS[program](args)))
        elif program not in RUN_BY_THEIR_TEST:
            raise SnippetError(f"{path}: no checker for this program (add one to CHECKERS)")
    return checked


def polar_cube_runs(text: str, **placeholders) -> list:
    """The parsed arguments of every polar-cube command of a snippet (all checked)."""
    return [args for program, args in check_commands(text, placeholders) if program == "polar-cube"]


# --- README.md ---------------------------------------------------------------------------------


def test_readme_starts_with_the_main_and_the_test_command():
    first, second = blocks("README.md")[:2]
    assert (first.kind, first.label, second.kind, second.label) == (
        "snippet",
        "main-command",
        "snippet",
        "test-command",
    )
    main = snippet("README.md", "main-command")
    tests = snippet("README.md", "test-command")
    assert main == "bash bin/setup && .venv/bin/polar-cube demo"
    assert tests == "bash bin/setup && .venv/bin/python -m pytest"
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == tests
    (setup, _), (program, demo) = check_commands(main)
    assert (setup, program, demo.command) == ("bash", "polar-cube", "demo")
    assert [program for program, _ in check_commands(tests)] == ["bash", "python"]


@cache
def cli_help(*words: str) -> str:
    """`polar-cube WORDS --help`, run."""
    result = subprocess.run([CLI, *words, "--help"], capture_output=True, text=True, timeout=60)
    if result.returncode:
        raise SnippetError(f"polar-cube {' '.join(words)} --help: {result.stderr.strip()}")
    return result.stdout


def usage_choices(help_text: str) -> set[str]:
    """The `{a,b,c}` sub-commands or positional choices of a help's usage lines."""
    usage = help_text.split("\n\n", 1)[0]
    found = re.findall(r"(?<![-\w] )\{([\w,-]+)\}", usage)
    return {choice for group in found for choice in group.split(",")}


@dataclass
class SynopsisEntry:
    command: str
    subcommands: list[str]  # `s3 start|stop|status`; empty for none
    positional_choices: list[str]  # `view [start|stop|status]`
    options: list[str]
    option_choices: dict[str, set[str]]  # `--scale small|full`
    text: str


def read_synopsis(text: str) -> list[SynopsisEntry]:
    entries = []
    for part in re.split(r"(?=\bpolar-cube )", " ".join(text.split())):
        words = part.split()
        if not words:
            continue
        assert words[0] == "polar-cube", part
        command, subcommands, choices = words[1], [], []
        if len(words) > 2 and re.fullmatch(r"[a-z]+(\|[a-z]+)*", words[2]):
            subcommands = words[2].split("|")
        elif len(words) > 2 and re.fullmatch(r"\[[a-z]+(\|[a-z]+)*\]", words[2]):
            choices = words[2][1:-1].split("|")
        entries.append(
            SynopsisEntry(
                command=command,
                subcommands=subcommands,
                positional_choices=choices,
                options=re.findall(r"(?<![\w-])--[a-z0-9][\w-]*", part),
                option_choices={
                    option: set(values.split("|"))
                    for option, values in re.findall(r"(--[\w-]+) ([a-z]+(?:\|[a-z]+)+)\b", part)
                },
                text=part.strip(),
            )
        )
    return entries


def synopsis_problems(text: str) -> list[str]:
    """Where the README's command synopsis and the real `polar-cube … --help` differ."""
    problems = []
    entries = read_synopsis(text)
    commands = usage_choices(cli_help())
    listed = {entry.command for entry in entries}
    problems += [f"polar-cube {c} is missing from the synopsis" for c in sorted(commands - listed)]
    for entry in entries:
        if entry.command not in commands:
            problems.append(f"{entry.text}: polar-cube has no command {entry.command!r}")
            continue
        own = usage_choices(cli_help(entry.command))
        helps = [cli_help(entry.command)]
        for sub in entry.subcommands:
            if sub not in own:
                problems.append(f"{entry.text}: polar-cube {entry.command} has no {sub!r}")
            else:
                helps.append(cli_help(entry.command, sub))
        for choice in entry.positional_choices:
            if choice not in own:
                problems.append(f"{entry.text}: polar-cube {entry.command} takes no {choice!r}")
        for option in entry.options:
            if not any(re.search(rf"(?<![\w-]){option}(?![\w-])", h) for h in helps):
                problems.append(f"{entry.text}: no option {option} in its --help")
        for option, values in entry.option_choices.items():
            real = set()
            for h in helps:
                for group in re.findall(rf"{option} \{{([\w,]+)\}}", h):
                    real |= set(group.split(","))
            if real != values:
                problems.append(
                    f"{entry.text}: {option} takes {sorted(real)}, not {sorted(values)}"
                )
    for command in sorted(commands & listed):
        shown = {
            name
            for entry in entries
            if entry.command == command
            for name in entry.subcommands + entry.positional_choices
        }
        missing = usage_choices(cli_help(command)) - shown
        problems += [
            f"polar-cube {command} {m} is missing from the synopsis" for m in sorted(missing)
        ]
    return problems


def test_the_commands_synopsis_matches_the_cli():
    problems = synopsis_problems(snippet("README.md", "commands"))
    assert not problems, "\n".join(problems)


def layout_paths(text: str) -> tuple[list[str], set[str]]:
    """The paths the layout tree lists, and the folders whose contents it lists."""
    paths, expanded, parents = [], set(), []
    for line in text.splitlines():
        if not line[:22].strip():
            continue  # a description's next line
        indent = len(line) - len(line.lstrip())
        depth = indent // 2
        names = re.split(r"\s{2,}", line.strip())[0]
        parents = parents[:depth]
        if depth:
            expanded.add("/".join(parents))
        for name in names.split(", "):
            paths.append("/".join([*parents, name.rstrip("/")]))
        if names.endswith("/"):
            parents.append(names.rstrip("/"))
    return paths, expanded


def layout_problems(text: str) -> list[str]:
    """Listed paths that do not exist, and modules or packages missing from a folder the
    tree lists the contents of."""
    paths, expanded = layout_paths(text)
    problems = [
        f"{p}: listed in the layout, not in the repository"
        for p in paths
        if not (REPO / p).exists()
    ]
    for folder in sorted(expanded):
        for path in sorted((REPO / folder).iterdir()):
            module = path.suffix == ".py" and not path.name.startswith("__")
            package = (path / "__init__.py").is_file()
            name = f"{folder}/{path.name}"
            if (module or package) and name not in paths:
                problems.append(f"{name}: in the repository, missing from the layout")
    return problems


def test_the_layout_lists_what_is_in_the_repository():
    problems = layout_problems(snippet("README.md", "layout"))
    assert not problems, "\n".join(problems)


def test_the_benchmark_command_is_a_valid_plan():
    text = snippet("README.md", "bench-command")
    ((program, plan),) = check_commands(text)
    assert program == "python" and plan.runs == 3 and (REPO / plan.out).is_file()
    assert set(plan.parts) >= {"layer", "build", "rerun"}  # the whole table
    assert {"scaling", "sizes"} & set(plan.parts)  # and builds at other sizes
    # the table's own record of the command is this one
    assert f"Command: `{text}`" in (REPO / "README.md").read_text()


# --- deployments/README.md --------------------------------------------------------------------


def test_the_scheduled_build_steps_parse():
    from polar_cube.deployments.operate import DEFAULT_PORT

    text = snippet("deployments/README.md", "scheduled-builds")
    checked = check_commands(text)
    steps = [
        (args.command, getattr(args, f"{args.command}_command", None))
        for program, args in checked
        if program == "polar-cube"
    ]
    assert steps == [
        ("server", "start"),
        ("s3", "start"),
        ("blocks", "create"),
        ("pool", "create"),
        ("deploy", None),
        ("worker", "start"),
        ("run", None),
    ]
    (exported,) = [args for program, args in checked if program == "export"]
    assert exported == {"PREFECT_API_URL": f"http://127.0.0.1:{DEFAULT_PORT}/api"}


def flow_parameters() -> set[str]:
    from polar_cube.flows.build_cube import build_cube

    return set(inspect.signature(build_cube.fn).parameters)


def test_the_deploy_examples_name_real_flow_parameters_and_a_valid_cron():
    from prefect.schedules import Cron

    from polar_cube.cli.ops import parse_params
    from polar_cube.deployments.operate import DEFAULT_CRON

    runs = polar_cube_runs(snippet("deployments/README.md", "deploy-examples"))
    assert [args.command for args in runs] == ["deploy", "deploy", "run"]
    params = {k: v for args in runs for k, v in parse_params(args.param).items()}
    assert params == {
        "resolution": 1000,
        "cache_dir": "/data/polar-cube/sources",
        "only": ["ice_thickness"],
    }
    assert set(params) <= flow_parameters()
    crons = [args.cron for args in runs if args.command == "deploy"]
    assert crons == [DEFAULT_CRON, "0 3 * * 1"]  # the default, then "weekly instead"
    for cron in crons:
        Cron(cron, timezone="UTC")  # what `deploy` builds from it


def test_the_prefect_deploy_commands_parse_and_prefect_yaml_is_polar_cube_deploy():
    from polar_cube.deployments.operate import (
        DEFAULT_CRON,
        DEFAULT_DEPLOYMENT,
        DEFAULT_PARAMETERS,
        DEFAULT_POOL,
        FLOW_NAME,
    )

    checked = check_commands(snippet("deployments/README.md", "prefect-deploy"))
    deploy, worker, run = (args for _, args in checked)
    assert deploy == {"prefect_file": Path("deployments/prefect.yaml"), "deploy_all": True}
    assert worker == {"work_pool_name": DEFAULT_POOL, "worker_type": "process"}
    assert run == {"name": f"{FLOW_NAME}/{DEFAULT_DEPLOYMENT}", "watch": True}
    config = yaml.safe_load((REPO / deploy["prefect_file"]).read_text())
    (deployment,) = config["deployments"]
    module, function = deployment["entrypoint"].split(":")
    assert (REPO / module).is_file() and f"def {function}(" in (REPO / module).read_text()
    (schedule,) = deployment["schedules"]
    assert (deployment["name"], deployment["work_pool"]["name"]) == (
        DEFAULT_DEPLOYMENT,
        DEFAULT_POOL,
    )
    assert (schedule["cron"], schedule["timezone"]) == (DEFAULT_CRON, "UTC")
    assert deployment["parameters"] == DEFAULT_PARAMETERS
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_the_schedule_commands_parse():
    from polar_cube.deployments.operate import DEFAULT_DEPLOYMENT, FLOW_NAME

    schedule_id = str(uuid.uuid4())
    text = snippet("deployments/README.md", "schedule-commands")
    checked = check_commands(text, {"SCHEDULE_ID": schedule_id})
    assert [args["deployment_name"] for _, args in checked] == [
        f"{FLOW_NAME}/{DEFAULT_DEPLOYMENT}"
    ] * 3
    assert [str(args.get("schedule_id")) for _, args in checked[1:]] == [schedule_id] * 2


def test_the_postgresql_setting_is_a_url_prefect_can_use():
    from sqlalchemy.engine import make_url

    checked = check_commands(snippet("deployments/README.md", "postgresql"))
    (exported,) = [args for program, args in checked if program == "export"]
    url = make_url(exported["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert (url.drivername, url.port, url.database) == ("postgresql+asyncpg", 5432, "prefect")
    assert importlib.util.find_spec("asyncpg")  # "the driver comes with Prefect"
    (server,) = [args for program, args in checked if program == "polar-cube"]
    assert (server.command, server.server_command) == ("server", "start")


# --- docs/adding-a-source.md -----------------------------------------------------------------


def apply_the_page(folder: Path) -> None:
    """The page's steps 1–3 on the copies: its JSON blocks appended to the spec's sources and
    variables, its YAML lines under the patch's `metadata:`."""
    spec_path, patch_path = folder / "my-cube.geojson", folder / "my-patch.yaml"
    document = json.loads(spec_path.read_text())
    document["properties"]["sources"].append(
        json.loads(snippet("docs/adding-a-source.md", "source-entry"))
    )
    document["properties"]["variables"].append(
        json.loads(snippet("docs/adding-a-source.md", "variable-entry"))
    )
    spec_path.write_text(json.dumps(document, indent=2))
    patch = yaml.safe_load(patch_path.read_text())
    patch["metadata"].update(yaml.safe_load(snippet("docs/adding-a-source.md", "patch-lines")))
    patch_path.write_text(yaml.safe_dump(patch, sort_keys=False))


def page_workspace(folder: Path) -> Path:
    folder = workspace(folder)
    copied = run_bash(snippet("docs/adding-a-source.md", "copy-spec"), folder)
    assert copied.returncode == 0, copied.stderr
    assert (folder / "my-cube.geojson").read_text() == (folder / "cube.geojson").read_text()
    apply_the_page(folder)
    return folder


def test_adding_a_source_checks_and_makes_the_standins(tmp_path):
    """The page's first commands, as written: `spec check` prints what the page shows, and
    `sources make` writes a stand-in for every source, the new one included."""
    folder = page_workspace(tmp_path)
    steps = snippet("docs/adding-a-source.md", "steps")
    lines = steps.splitlines()
    first = lines[: next(i for i, line in enumerate(lines) if "sources serve" in line)]
    ran = run_bash("\n".join(first), folder)
    assert ran.returncode == 0, ran.stderr
    (shown,) = [line[2:] for line in first if line.startswith("# ")]
    assert ran.stdout.splitlines()[0].startswith(shown.removesuffix("...").rstrip())
    spec = load_spec(folder / "my-cube.geojson")
    made = sorted(p.name for p in (folder / "data" / "my-sources").iterdir())
    assert made == sorted(s.file_name for s in spec.sources)
    assert "ASE_bed_elevation_1km.tif" in made
    runs = polar_cube_runs(steps)  # the build's options too
    assert [args.command for args in runs] == ["spec", "sources", "sources", "build"]


@pytest.mark.slow
def test_adding_a_source_builds_the_cube_as_the_page_says(tmp_path):
    """The page's whole step 4, run as written (the mirror on a free port instead of 8765)."""
    folder = page_workspace(tmp_path)
    steps = snippet("docs/adding-a-source.md", "steps")
    assert len(re.findall(r"\b8765\b", steps)) == 2  # the mirror's port, served and used
    port = free_port_block(1)
    ran = run_bash(re.sub(r"\b8765\b", str(port), steps), folder, timeout=900)
    assert ran.returncode == 0, ran.stderr[-3000:]
    from tests.test_add_source import check_layer, new_source_and_variable, standin_values

    spec = load_spec(folder / "my-cube.geojson")
    source, variable = new_source_and_variable(spec)
    named = spec.at_resolution(3000).data_id
    inputs = folder / "data" / "my-cube" / named.replace(".zarr", ".inputs")
    assert sorted(p.name for p in inputs.glob("*.zarr")) == sorted(
        f"{s.id}.zarr" for s in spec.sources
    )  # every source's part of the version, the new one included
    assert not (folder / "data" / "datasets").exists()  # no local per-dataset copies
    cube = xr.open_zarr(folder / "data" / "my-cube" / named, consolidated=True)
    assert set(cube.data_vars) - {"crs"} == {v.name for v in spec.variables}
    elevation = cube[variable.name]
    standin = standin_values(folder / "data" / "my-sources" / source.file_name)
    check_layer(elevation, source, variable, standin, TargetGrid.from_spec(spec, 3000))
    assert elevation.attrs["color_bar_name"] == "terrain"  # from the page's patch lines
    assert elevation.attrs["source"] == source.download_url
    quicklooks = folder / "data" / "my-cube" / f"{named.removesuffix('.zarr')}.quicklooks"
    assert len(list(quicklooks.glob("*.png"))) == layer_count(spec)
    assert (quicklooks / f"{variable.name}.png").is_file()


# --- docs/cluster.md ----------------------------------------------------------------------------


def test_the_cluster_build_command_parses():
    (args,) = polar_cube_runs(snippet("docs/cluster.md", "cluster-build"))
    assert args.command == "build" and args.bucket_block == "polar-cube-bucket"
    assert args.dask_address.startswith("tcp://") and args.dask_address.endswith(":8786")


# --- a broken snippet fails ---------------------------------------------------------------------


def test_a_broken_shell_snippet_fails_when_run(tmp_path):
    text = snippet("docs/adding-a-source.md", "copy-spec")
    assert "cp cube.geojson" in text
    ran = run_bash(text.replace("cp cube.geojson", "cp cube.gejson"), workspace(tmp_path))
    assert ran.returncode != 0 and "cube.gejson" in ran.stderr
    # and a failure in the middle of a line stops the snippet too (pipefail, -e)
    ran = run_bash("false | cat\ntouch after", tmp_path)
    assert ran.returncode != 0 and not (tmp_path / "after").exists()


@pytest.mark.parametrize(
    ("file", "name", "old", "new", "message"),
    [
        ("deployments/README.md", "deploy-examples", "--param", "--parm", "unrecognized arguments"),
        ("deployments/README.md", "prefect-deploy", "--all", "--al", "Unknown option"),
        ("deployments/README.md", "schedule-commands", "pause", "paus", 'Unknown command "paus"'),
        ("docs/cluster.md", "cluster-build", "--dask-address", "--dask-adress", "unrecognized"),
        ("README.md", "bench-command", "--runs 3", "--runs 0", "must be a whole number"),
        ("README.md", "main-command", "bin/setup", "bin/set-up", "bin/set-up: no such file"),
    ],
)
def test_a_broken_command_fails_its_check(file, name, old, new, message):
    text = snippet(file, name)
    assert old in text
    check_commands(text, {"SCHEDULE_ID": str(uuid.uuid4())})  # as written: holds
    with pytest.raises(SnippetError, match=re.escape(message)):
        check_commands(text.replace(old, new, 1), {"SCHEDULE_ID": str(uuid.uuid4())})


def test_a_broken_synopsis_or_layout_fails_its_check():
    synopsis = snippet("README.md", "commands")
    broken = synopsis.replace("[--patch FILE]", "[--patch FILE] [--dry-run]")
    assert any("no option --dry-run" in p for p in synopsis_problems(broken))
    broken = synopsis.replace("--scale small|full OUT_DIR", "--scale small|medium OUT_DIR")
    assert any("--scale takes ['full', 'small']" in p for p in synopsis_problems(broken))
    broken = synopsis.replace("polar-cube spec check [FILE]", "")
    assert "polar-cube spec is missing from the synopsis" in synopsis_problems(broken)
    layout = snippet("README.md", "layout")
    broken = layout.replace("  grid.py ", "  grids.py")
    assert set(layout_problems(broken)) >= {
        "polar_cube/grids.py: listed in the layout, not in the repository",
        "polar_cube/grid.py: in the repository, missing from the layout",
    }


def test_an_unmarked_or_unused_block_fails_the_coverage_check():
    content = (REPO / ADD_SOURCE).read_text()
    assert marker_problems(ADD_SOURCE, content) == []
    unmarked = content.replace("<!-- snippet: copy-spec -->\n", "", 1)
    assert any("has no marker line" in p for p in marker_problems(ADD_SOURCE, unmarked))
    no_reason = content.replace("<!-- snippet: copy-spec -->", "<!-- not run: -->", 1)
    assert any("without a reason" in p for p in marker_problems(ADD_SOURCE, no_reason))
    twice = content.replace("<!-- snippet: copy-spec -->", "<!-- snippet: steps -->", 1)
    assert any("reuses the name 'steps'" in p for p in marker_problems(ADD_SOURCE, twice))
    tilde = content + "\n~~~bash\nls\n~~~\n"
    assert any("fence lines but" in p for p in marker_problems(ADD_SOURCE, tilde))
