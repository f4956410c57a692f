"""The cube opens without Prefect or polar_cube: the snippets `build` and `demo` print run in a
plain Python (xarray + s3fs, and xcube), with the keys from `polar-cube s3 credentials` in the
environment, or pasted as-is with the AWS profile the demo writes. No keys are printed but by
`s3 credentials`. Every AWS file used here lives under tmp_path (AWS_SHARED_CREDENTIALS_FILE,
AWS_CONFIG_FILE): the real ~/.aws is never read or written."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import botocore.session
import pytest

from polar_cube.cli.app import _print_cube
from polar_cube.servers.s3server import (
    LOCAL_PROFILE,
    AwsProfileError,
    S3ServerInfo,
    aws_profile_for,
    write_aws_profile,
)
from polar_cube.spec import load_spec
from tests.conftest import REPO

# The cube built once for this module, as tests/test_cube_flow.py builds it (3 km, small
# stand-ins, the session's SeaweedFS); importing the fixtures gives this module its own.
from tests.test_cube_flow import BUCKET_BLOCK, blocks, built, mirror, work  # noqa: F401

FORBIDDEN = ("prefect", "prefect_aws", "prefect_dask", "polar_cube")
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
)
# appended to each snippet: which of the forbidden modules did it import?
REPORT_MODULES = (
    "\nimport json as _json, sys as _sys\n"
    f"_names = {FORBIDDEN!r}\n"
    'print("IMPORTED " + _json.dumps(sorted(m for m in _sys.modules'
    ' if m.split(".")[0] in _names)))\n'
)


@pytest.fixture(autouse=True)
def aws_files(tmp_path, monkeypatch):
    """AWS files in tmp_path (not there yet) and no AWS keys in this process's environment."""
    folder = tmp_path / "aws"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "config"))
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return folder


def fake_server(tmp_path, port=1, access="AKIAPOLAR", secret="polar-secret") -> S3ServerInfo:
    return S3ServerInfo(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key=access,
        secret_key=secret,
        pid=0,
        state_dir=tmp_path,
    )


def profile_seen_by_botocore(name):
    session = botocore.session.Session(profile=name)
    credentials = session.get_credentials()
    return credentials.access_key, credentials.secret_key, session.get_scoped_config()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the AWS profile ----------------------------------------------------------------------


def test_profile_is_written_beside_the_other_profiles_owner_only(tmp_path, aws_files):
    aws_files.mkdir()
    credentials, config = aws_files / "credentials", aws_files / "config"
    mine = "# my keys\n[default]\naws_access_key_id = MINE\naws_secret_access_key = M\n\n"
    mine += "# the work account\n[work]\naws_access_key_id = WORK\naws_secret_access_key = W\n"
    credentials.write_text(mine)
    config.write_text("[default]\nregion = eu-west-1\n")
    credentials.chmod(0o644)

    files = write_aws_profile(fake_server(tmp_path))

    assert (files.credentials, files.config) == (credentials, config)
    assert credentials.read_text().startswith(mine)  # other profiles and comments untouched
    assert config.read_text().startswith("[default]\nregion = eu-west-1\n")
    assert mode(credentials) == mode(config) == 0o600
    access, secret, scoped = profile_seen_by_botocore(LOCAL_PROFILE)
    assert (access, secret) == ("AKIAPOLAR", "polar-secret")
    assert scoped["endpoint_url"] == "http://127.0.0.1:1"
    assert scoped["region"] == "us-east-1"
    assert profile_seen_by_botocore("work")[:2] == ("WORK", "W")

    # rewritten in place with the server's new endpoint and keys; still one section
    write_aws_profile(fake_server(tmp_path, port=2, access="AKIANEW", secret="new-secret"))
    text = credentials.read_text()
    assert text.startswith(mine) and text.count(f"[{LOCAL_PROFILE}]") == 1
    assert "polar-secret" not in text
    assert config.read_text().count(f"[profile {LOCAL_PROFILE}]") == 1
    assert profile_seen_by_botocore(LOCAL_PROFILE)[0] == "AKIANEW"
    assert aws_profile_for("http://127.0.0.1:2", "AKIANEW") == LOCAL_PROFILE
    assert aws_profile_for("http://127.0.0.1:1", "AKIANEW") is None
    assert aws_profile_for("http://127.0.0.1:2", "AKIAPOLAR") is None


def test_a_profile_that_polar_cube_did_not_write_is_left_alone(tmp_path, aws_files):
    aws_files.mkdir()
    credentials = aws_files / "credentials"
    theirs = f"[{LOCAL_PROFILE}]\naws_access_key_id = THEIRS\naws_secret_access_key = T\n"
    credentials.write_text(theirs)
    with pytest.raises(AwsProfileError, match="exists and was not written by polar-cube"):
        write_aws_profile(fake_server(tmp_path))
    assert credentials.read_text() == theirs
    assert not (aws_files / "config").exists()
    assert aws_profile_for("http://127.0.0.1:1", "THEIRS") is None


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "polar_cube.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_credentials_help_says_it_prints_secrets_and_needs_a_running_server(tmp_path):
    help_text = " ".join(run_cli("s3", "credentials", "--help").stdout.split())
    assert "Printing these secrets is the purpose of this command" in help_text
    assert "no other polar-cube command prints them" in help_text
    result = run_cli("s3", "credentials", "--state-dir", str(tmp_path / "none"))
    assert result.returncode == 2
    assert result.stderr == (
        f"polar-cube: error: no S3 server running for {tmp_path / 'none'}; "
        f"start it with `polar-cube s3 start --state-dir {tmp_path / 'none'}`\n"
    )


def exported(s3_server) -> dict[str, str]:
    """What `eval "$(polar-cube s3 credentials --state-dir …)"` puts into a shell."""
    command = [sys.executable, "-m", "polar_cube.cli", "s3", "credentials"]
    command += ["--state-dir", str(s3_server.state_dir)]
    script = 'eval "$("$@")" && env -0'
    result = subprocess.run(
        ["bash", "-c", script, "bash", *command],
        capture_output=True,
        timeout=120,
        env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")},
    )
    assert result.returncode == 0, result.stderr
    pairs = (item.split(b"=", 1) for item in result.stdout.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode() for k, v in pairs if k.startswith(b"AWS_")}


def test_credentials_command_exports_the_keys_or_writes_a_profile(s3_server, aws_files):
    assert exported(s3_server) == {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
    }
    result = run_cli(
        "s3", "credentials", "--state-dir", str(s3_server.state_dir), "--profile", "lab"
    )
    assert result.returncode == 0, result.stderr
    assert s3_server.secret_key not in result.stdout + result.stderr
    assert s3_server.access_key not in result.stdout + result.stderr
    assert "wrote AWS profile 'lab'" in result.stdout
    assert mode(aws_files / "credentials") == mode(aws_files / "config") == 0o600
    access, secret, scoped = profile_seen_by_botocore("lab")
    assert (access, secret) == (s3_server.access_key, s3_server.secret_key)
    assert scoped["endpoint_url"] == s3_server.endpoint_url


# --- the printed snippets, run in plain Pythons --------------------------------------------


def printed(capsys, url, *, local_server=None) -> tuple[str, dict[str, str]]:
    """What `build`/`demo` print after the cube is published: all of it, and each snippet."""
    _print_cube(url, BUCKET_BLOCK, local_server=local_server)
    output = capsys.readouterr().out
    lines = output.splitlines()
    snippets, index = {}, 0
    while index < len(lines):
        header = re.fullmatch(r"--- (.+) ---", lines[index])
        if header:
            end = lines.index("---", index + 1)
            snippets[header.group(1)] = "\n".join(lines[index + 1 : end])
            index = end
        index += 1
    assert list(snippets) == [
        "open the cube",
        "open it with xcube: the cube and its overview levels",
    ]
    return output, snippets


def no_prefect_environment(tmp_path, base: dict[str, str]) -> dict[str, str]:
    """`base` plus a Prefect set-up under which any use of Prefect fails or leaves traces."""
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir(exist_ok=True)
    return base | {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",  # nothing listens on port 9
    }


def run_snippet(snippet: str, show: str, env: dict[str, str], *, cwd: Path, isolated: bool):
    """Run `snippet` as-is, then `show` (what the test looks at) and the modules report."""
    code = snippet + REPORT_MODULES + show
    command = [sys.executable, *(["-I"] if isolated else []), "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = found(result.stdout, "IMPORTED")
    assert imported == [], f"the snippet imported {imported}"
    assert list(Path(env["PREFECT_HOME"]).iterdir()) == []  # Prefect never ran
    return result.stdout


def check_opened(snippets, run):
    """Run both snippets: each opens the cube with every spec variable (the first prints it),
    the second also its overview levels (the coarsest one read too)."""
    variables = sorted(v.name for v in load_spec(REPO / "cube.geojson").variables)
    show = '\nprint("VARIABLES", _json.dumps(sorted(cube.data_vars)))'
    cube_output = run(snippets["open the cube"], show)
    assert "<xarray.Dataset>" in cube_output and "magnetic_anomaly" in cube_output
    assert set(variables) <= set(found(cube_output, "VARIABLES"))
    coarsest = "levels.get_dataset(levels.num_levels - 1)"
    show += (
        f'\nprint("COARSEST", _json.dumps([{coarsest}.sizes["x"], sorted({coarsest}.data_vars)]))'
    )
    xcube_output = run(snippets["open it with xcube: the cube and its overview levels"], show)
    assert set(variables) <= set(found(xcube_output, "VARIABLES"))
    (levels,) = re.findall(r"^(\d+) levels$", xcube_output, re.M)
    assert int(levels) >= 1
    width, level_variables = found(xcube_output, "COARSEST")
    assert set(variables) <= set(level_variables) and width <= 512


def found(output: str, label: str):
    (line,) = [x for x in output.splitlines() if x.startswith(label + " ")]
    return json.loads(line.removeprefix(label + " "))


def assert_no_keys(text, s3_server):
    assert s3_server.access_key not in text
    assert s3_server.secret_key not in text


@pytest.mark.slow
def test_snippets_open_the_cube_with_the_exported_keys(built, s3_server, tmp_path, capsys):  # noqa: F811
    """`build` with a bucket: keys from `eval "$(polar-cube s3 credentials)"`, run in an
    isolated Python (-I: no cwd, no PYTHON* variables) outside the repository."""
    output, snippets = printed(capsys, built.url)
    assert_no_keys(output, s3_server)
    assert 'eval "$(polar-cube s3 credentials)"' in output
    for snippet in snippets.values():
        assert "polar_cube" not in snippet and "prefect" not in snippet.lower()
        assert f'"endpoint_url": "{s3_server.endpoint_url}"' in snippet
        assert '"profile"' not in snippet
    home = tmp_path / "home"
    home.mkdir()
    base = {"PATH": os.environ["PATH"], "HOME": str(home), **exported(s3_server)}
    base |= {  # no AWS file: the keys can only come from the environment
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none" / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "none" / "config"),
    }
    env = no_prefect_environment(tmp_path, base)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    check_opened(
        snippets, lambda code, show: run_snippet(code, show, env, cwd=workdir, isolated=True)
    )


@pytest.mark.slow
def test_demo_snippets_run_pasted_as_is_with_the_profile_it_writes(
    built,  # noqa: F811
    s3_server,
    tmp_path,
    capsys,
    aws_files,
):
    """`demo`: its code path writes AWS profile polar-cube-local, the snippets name it and run
    as pasted into the project's python from the repository root, nothing exported."""
    aws_files.mkdir()
    mine = "[default]\naws_access_key_id = MINE\naws_secret_access_key = M\n"
    (aws_files / "credentials").write_text(mine)

    output, snippets = printed(capsys, built.url, local_server=s3_server)

    assert_no_keys(output, s3_server)
    assert f"wrote AWS profile '{LOCAL_PROFILE}' for the local S3 server" in output
    assert str(aws_files / "credentials") in output
    assert (aws_files / "credentials").read_text().startswith(mine)
    assert mode(aws_files / "credentials") == mode(aws_files / "config") == 0o600
    for snippet in snippets.values():
        assert f'"profile": "{LOCAL_PROFILE}"' in snippet
        assert "polar_cube" not in snippet and "prefect" not in snippet.lower()
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}  # nothing exported
    env = no_prefect_environment(tmp_path, env)
    check_opened(
        snippets, lambda code, show: run_snippet(code, show, env, cwd=REPO, isolated=False)
    )

    # a later `build` into the same server names the profile too: it holds the block's keys
    output, snippets = printed(capsys, built.url)
    assert_no_keys(output, s3_server)
    assert f"the snippets below use AWS profile '{LOCAL_PROFILE}'" in output
    assert all(f'"profile": "{LOCAL_PROFILE}"' in s for s in snippets.values())


@pytest.mark.slow
def test_demo_leaves_a_foreign_profile_alone_and_falls_back_to_exports(
    built,  # noqa: F811
    s3_server,
    tmp_path,
    capsys,
    aws_files,
):
    aws_files.mkdir()
    theirs = f"[{LOCAL_PROFILE}]\naws_access_key_id = THEIRS\naws_secret_access_key = T\n"
    (aws_files / "credentials").write_text(theirs)
    output, snippets = printed(capsys, built.url, local_server=s3_server)
    assert_no_keys(output, s3_server)
    assert f"did not write AWS profile '{LOCAL_PROFILE}'" in output
    assert 'eval "$(polar-cube s3 credentials --state-dir' in output
    assert (aws_files / "credentials").read_text() == theirs
    assert all('"profile"' not in s for s in snippets.values())
