"""The cube opens without Prefect or polar_cube: the snippets `build` and `demo` print run in a
plain Python (xarray + s3fs + fsspec, and xcube), with the keys from `polar-cube s3
credentials` in the environment, or pasted as-is with an AWS profile written when asked for;
they read the catalog `<series>.versions.json` and open the version `latest` names (printing
its name first), so the same pasted snippet opens a newer version once one is published and
the older one after `polar-cube rollback`. GDAL's `gdalinfo` opens the version built with what
`s3 credentials --gdal` prints. The blocks of the README's "Open the cube" are what the demo
prints and run as written too. No keys are printed but by `s3 credentials`. Every AWS file
used here lives under tmp_path (AWS_SHARED_CREDENTIALS_FILE, AWS_CONFIG_FILE): the real ~/.aws
is never read or written."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import botocore.session
import pytest

from polar_cube.cli.app import _print_cube, make_parser
from polar_cube.grid import TargetGrid
from polar_cube.servers.s3server import AwsProfileError, S3ServerInfo, write_aws_profile
from polar_cube.spec import load_spec
from tests.conftest import REPO
from tests.snippets import snippet
from tests.test_versions_cli import session_api_url

# The cube is built once for this module as tests/test_cube_flow.py builds it (3 km, small
# stand-ins, the session's SeaweedFS), into a folder of the bucket of its own: the last test
# publishes a second version there and rolls back.
RESOLUTION = 3000.0
BUCKET_BLOCK = "polar-open-bucket"
BUCKET_FOLDER = "open"
SPEC = load_spec(REPO / "cube.geojson").at_resolution(RESOLUTION)  # polar-3km-…-v1.1.0.zarr
PROFILE = "polar-cube-local"
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


@pytest.fixture(scope="module")
def mirror(small_standins):
    from polar_cube.sources.mirror import serving_mirror

    with serving_mirror(small_standins) as url:
        yield url


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("open-cube")


@pytest.fixture(scope="module")
def blocks(s3_server) -> dict:
    """The S3Bucket block of <bucket>/open/ on the session's SeaweedFS; its s3fs options."""
    from polar_cube.tasks.blocks import load_bucket, save_blocks, storage_options_from_blocks

    save_blocks(
        bucket_block=BUCKET_BLOCK,
        credentials_block="polar-open-credentials",
        bucket_name="polar-test",
        bucket_folder=BUCKET_FOLDER,
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    return storage_options_from_blocks(load_bucket(BUCKET_BLOCK))


def build_options(work, mirror, **extra) -> dict:
    return dict(
        spec_path=str(REPO / "cube.geojson"),
        resolution=RESOLUTION,
        source_mirror=mirror,
        cache_dir=str(work / "cache"),
        bucket_block=BUCKET_BLOCK,
        **extra,
    )


@pytest.fixture(scope="module")
def built(work, mirror, blocks):
    """The first version of the 3 km cube, published into <bucket>/open/."""
    from polar_cube.flows.build_cube import build_cube

    cube = build_cube(**build_options(work, mirror))
    assert (cube.url, cube.version) == (f"s3://polar-test/open/{SPEC.data_id}", SPEC.version)
    return cube


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

    files = write_aws_profile(fake_server(tmp_path), PROFILE)

    assert (files.credentials, files.config) == (credentials, config)
    assert credentials.read_text().startswith(mine)  # other profiles and comments untouched
    assert config.read_text().startswith("[default]\nregion = eu-west-1\n")
    assert mode(credentials) == mode(config) == 0o600
    access, secret, scoped = profile_seen_by_botocore(PROFILE)
    assert (access, secret) == ("AKIAPOLAR", "polar-secret")
    assert scoped["endpoint_url"] == "http://127.0.0.1:1"
    assert scoped["region"] == "us-east-1"
    assert profile_seen_by_botocore("work")[:2] == ("WORK", "W")

    # rewritten in place with the server's new endpoint and keys; still one section
    new = fake_server(tmp_path, port=2, access="AKIANEW", secret="new-secret")
    write_aws_profile(new, PROFILE)
    text = credentials.read_text()
    assert text.startswith(mine) and text.count(f"[{PROFILE}]") == 1
    assert "polar-secret" not in text
    assert config.read_text().count(f"[profile {PROFILE}]") == 1
    assert profile_seen_by_botocore(PROFILE)[0] == "AKIANEW"
    assert profile_seen_by_botocore(PROFILE)[2]["endpoint_url"] == "http://127.0.0.1:2"


def test_a_profile_that_polar_cube_did_not_write_is_left_alone(tmp_path, aws_files):
    aws_files.mkdir()
    credentials = aws_files / "credentials"
    theirs = f"[{PROFILE}]\naws_access_key_id = THEIRS\naws_secret_access_key = T\n"
    credentials.write_text(theirs)
    with pytest.raises(AwsProfileError, match="exists and was not written by polar-cube"):
        write_aws_profile(fake_server(tmp_path), PROFILE)
    assert credentials.read_text() == theirs
    assert not (aws_files / "config").exists()


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


def exported(s3_server, *options) -> dict[str, str]:
    """What `eval "$(polar-cube s3 credentials --state-dir … [options])"` puts into a shell."""
    command = [sys.executable, "-m", "polar_cube.cli", "s3", "credentials"]
    command += ["--state-dir", str(s3_server.state_dir), *options]
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
    keys = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_ENDPOINT_URL": s3_server.endpoint_url,
    }
    assert exported(s3_server) == keys
    assert exported(s3_server, "--gdal") == keys | {  # what GDAL 3.6 reads instead
        "AWS_S3_ENDPOINT": s3_server.endpoint_url.removeprefix("http://"),
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    assert not aws_files.exists()  # nothing written under ~/.aws unless asked
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

XARRAY, XCUBE, GDAL = (
    "open the cube",
    "open it with xcube: the cube and its overview levels",
    "open it with GDAL",
)


def printed(capsys, url, spec=SPEC, **kwargs) -> tuple[str, dict[str, str]]:
    """What `build`/`demo` print after the cube is published: all of it, and each snippet.
    The Python snippets read `latest` from the catalog (nothing in them names a version)."""
    capsys.readouterr()
    _print_cube(url, BUCKET_BLOCK, series=spec.series, **kwargs)
    output = capsys.readouterr().out
    folder = url.rsplit("/", 1)[0]
    catalog = f"{folder}/{spec.series}.versions.json"
    assert output.startswith(
        f"the cube is at {url}\nlatest of {spec.series}: {catalog} (`polar-cube versions`)\n"
    )
    lines = output.splitlines()
    snippets, index = {}, 0
    while index < len(lines):
        header = re.fullmatch(r"--- (.+) ---", lines[index])
        if header:
            end = lines.index("---", index + 1)
            snippets[header.group(1)] = "\n".join(lines[index + 1 : end])
            index = end
        index += 1
    assert list(snippets) == [XARRAY, XCUBE, GDAL]  # a local S3 server: GDAL's too
    for text in (snippets[XARRAY], snippets[XCUBE]):
        assert f"{spec.series}.versions.json" in text and '["latest_cube"]' in text
        assert not re.search(r"-v\d+\.\d+\.\d+\.zarr", text)  # no version pinned
    assert gdal_path_of(url) in snippets[GDAL]  # GDAL's opens the version built
    return output, snippets


def gdal_path_of(url: str) -> str:
    return f"""'ZARR:"/vsis3/{url.removeprefix("s3://")}"'"""


def no_prefect_environment(tmp_path, base: dict[str, str]) -> dict[str, str]:
    """`base` plus a Prefect set-up under which any use of Prefect fails or leaves traces."""
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir(exist_ok=True)
    return base | {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_URL": "http://127.0.0.1:9/api",  # nothing listens on port 9
    }


def bare_environment(tmp_path) -> dict[str, str]:
    """PATH, an empty HOME and no AWS file: keys can only come from what a snippet exports."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none" / "credentials"),
        "AWS_CONFIG_FILE": str(tmp_path / "none" / "config"),
    }


def run_snippet(
    snippet: str,
    show: str,
    env: dict[str, str],
    *,
    cwd: Path,
    isolated: bool,
    shell_first: str = "",
):
    """Run `snippet` as-is, then `show` (what the test looks at) and the modules report; with
    `shell_first`, bash runs those lines first (e.g. `eval "$(… s3 credentials)"`) and then
    the Python, as a user would in one shell."""
    code = snippet + REPORT_MODULES + show
    python = [sys.executable, *(["-I"] if isolated else []), "-c", code]
    if shell_first:
        python = ["bash", "-c", f'{shell_first}\nexec "$@"', "bash", *python]
    result = subprocess.run(python, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = found(result.stdout, "IMPORTED")
    assert imported == [], f"the snippet imported {imported}"
    assert list(Path(env["PREFECT_HOME"]).iterdir()) == []  # Prefect never ran
    return result.stdout


def check_opened(snippets, run, name: str | None = SPEC.data_id, title: str | None = None):
    """Run both Python snippets: each opens the cube with every spec variable (the first prints
    it), the second also its overview levels (the coarsest one read too). With `name`, each
    prints first the name of the version it opened, that one; with `title`, the cube has it."""
    variables = spec_variables()
    show = '\nprint("VARIABLES", _json.dumps(sorted(cube.data_vars)))'
    show += '\nprint("TITLE", _json.dumps(cube.attrs["title"]))'
    cube_output = run(snippets[XARRAY], show)
    assert "<xarray.Dataset>" in cube_output and "magnetic_anomaly" in cube_output
    assert set(variables) <= set(found(cube_output, "VARIABLES"))
    coarsest = "levels.get_dataset(levels.num_levels - 1)"
    show += (
        f'\nprint("COARSEST", _json.dumps([{coarsest}.sizes["x"], sorted({coarsest}.data_vars)]))'
    )
    xcube_output = run(snippets[XCUBE], show)
    assert set(variables) <= set(found(xcube_output, "VARIABLES"))
    (levels,) = re.findall(r"^(\d+) levels$", xcube_output, re.M)
    assert int(levels) >= 1
    width, level_variables = found(xcube_output, "COARSEST")
    assert set(variables) <= set(level_variables) and width <= 512
    for output in (cube_output, xcube_output):
        if name is not None:
            assert output.splitlines()[0] == name
        if title is not None:
            assert found(output, "TITLE") == title
    return cube_output, xcube_output


def spec_variables() -> list[str]:
    return sorted(v.name for v in load_spec(REPO / "cube.geojson").variables)


def run_gdal_snippet(snippet: str, env: dict[str, str], cwd: Path) -> str:
    """Run a GDAL snippet (bash: the eval of `s3 credentials --gdal`, then the real system
    `gdalinfo`) and check that it opened the cube: every variable is one of its subdatasets."""
    result = subprocess.run(
        ["bash", "-e", "-c", snippet], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Driver: Zarr/Zarr" in result.stdout
    subdatasets = re.findall(r'^  SUBDATASET_\d+_NAME=ZARR:".+\.zarr":/(\w+)$', result.stdout, re.M)
    assert set(spec_variables()) <= set(subdatasets), result.stdout[-3000:]
    return result.stdout


def found(output: str, label: str):
    (line,) = [x for x in output.splitlines() if x.startswith(label + " ")]
    return json.loads(line.removeprefix(label + " "))


def assert_no_keys(text, s3_server):
    assert s3_server.access_key not in text
    assert s3_server.secret_key not in text


@pytest.fixture
def sandbox(tmp_path, s3_server) -> Path:
    """A folder laid out like the repository root for what the printed and README commands
    need: `.venv` (this one) and `data/s3` (the session's S3 server's state folder)."""
    folder = tmp_path / "sandbox"
    (folder / "data").mkdir(parents=True)
    (folder / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (folder / "data" / "s3").symlink_to(s3_server.state_dir)
    return folder


@pytest.mark.slow
def test_snippets_open_the_cube_with_the_exported_keys(
    built,
    s3_server,
    tmp_path,
    capsys,
    sandbox,
    aws_files,
):
    """`build` with a bucket: keys from `eval "$(polar-cube s3 credentials)"`, run in an
    isolated Python (-I: no cwd, no PYTHON* variables) outside the repository; GDAL's block
    as printed, from a folder like the repository root."""
    output, snippets = printed(capsys, built.url)
    assert_no_keys(output, s3_server)
    assert re.search(r'first eval "\$\((\S*/)?polar-cube s3 credentials\)"$', output, re.M)
    for snippet_text in (snippets[XARRAY], snippets[XCUBE]):
        assert "polar_cube" not in snippet_text and "prefect" not in snippet_text.lower()
        assert f'"endpoint_url": "{s3_server.endpoint_url}"' in snippet_text
        assert '"profile"' not in snippet_text
    base = bare_environment(tmp_path) | exported(s3_server)
    env = no_prefect_environment(tmp_path, base)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    check_opened(
        snippets, lambda code, show: run_snippet(code, show, env, cwd=workdir, isolated=True)
    )
    assert "s3 credentials --gdal)" in snippets[GDAL]
    run_gdal_snippet(snippets[GDAL], bare_environment(tmp_path), sandbox)
    assert not aws_files.exists()


@pytest.mark.slow
def test_demo_snippets_run_after_the_one_line_it_prints(
    built,
    s3_server,
    tmp_path,
    capsys,
    aws_files,
):
    """`demo`'s code path writes nothing under ~/.aws: its snippets take the keys from the
    environment after the one `eval "$(…)"` line it prints (naming its server's folder), run
    in one bash as a user would, in the project's python from the repository root."""
    output, snippets = printed(capsys, built.url, local_server=s3_server)

    assert_no_keys(output, s3_server)
    assert not aws_files.exists()
    (eval_line,) = re.findall(r'first (eval "\$\(.+\)")$', output, re.M)
    assert f"s3 credentials --state-dir {s3_server.state_dir}" in eval_line
    for snippet_text in (snippets[XARRAY], snippets[XCUBE]):
        assert "polar_cube" not in snippet_text and "prefect" not in snippet_text.lower()
        assert '"profile"' not in snippet_text
    env = no_prefect_environment(tmp_path, bare_environment(tmp_path))
    check_opened(
        snippets,
        lambda code, show: run_snippet(
            code, show, env, cwd=REPO, isolated=False, shell_first=eval_line
        ),
    )
    assert snippets[GDAL].startswith(eval_line.removesuffix(')"') + ' --gdal)"\ngdalinfo ')
    run_gdal_snippet(snippets[GDAL], bare_environment(tmp_path), REPO)
    assert not aws_files.exists()


@pytest.mark.slow
def test_demo_snippets_run_pasted_as_is_with_a_profile_when_asked(
    built,
    s3_server,
    tmp_path,
    capsys,
    aws_files,
):
    """`demo --aws-profile NAME`: the profile is written (beside the user's), the snippets name
    it and run as pasted, nothing exported."""
    aws_files.mkdir()
    mine = "[default]\naws_access_key_id = MINE\naws_secret_access_key = M\n"
    (aws_files / "credentials").write_text(mine)
    write_aws_profile(s3_server, PROFILE)  # what `demo --aws-profile` does before its build

    output, snippets = printed(capsys, built.url, local_server=s3_server, aws_profile=PROFILE)

    assert_no_keys(output, s3_server)
    assert f"the snippets below use AWS profile '{PROFILE}'" in output
    assert (aws_files / "credentials").read_text().startswith(mine)
    for snippet_text in (snippets[XARRAY], snippets[XCUBE]):
        assert f'"profile": "{PROFILE}"' in snippet_text
        assert "polar_cube" not in snippet_text and "prefect" not in snippet_text.lower()
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}  # nothing exported
    env = no_prefect_environment(tmp_path, env)
    check_opened(
        snippets, lambda code, show: run_snippet(code, show, env, cwd=REPO, isolated=False)
    )


@pytest.mark.slow
def test_demo_refuses_a_foreign_profile_before_building(s3_server, tmp_path, aws_files):
    """`demo --aws-profile NAME` where NAME is someone else's profile: one error line, before
    the stand-ins or the build, and their profile as it was."""
    aws_files.mkdir()
    theirs = f"[{PROFILE}]\naws_access_key_id = THEIRS\naws_secret_access_key = T\n"
    (aws_files / "credentials").write_text(theirs)
    port = s3_server.endpoint_url.rsplit(":", 1)[1]
    result = run_cli(
        *("demo", "--spec", str(REPO / "cube.geojson"), "--workdir", str(tmp_path / "demo")),
        *("--s3-state-dir", str(s3_server.state_dir), "--s3-port", port, "--bucket", "polar-test"),
        *("--aws-profile", PROFILE),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"polar-cube: error: {aws_files / 'credentials'}: AWS profile '{PROFILE}' exists and "
        "was not written by polar-cube; left as it is (choose another name, or remove that "
        "profile)"
    )
    assert (aws_files / "credentials").read_text() == theirs
    assert not (tmp_path / "demo").exists()


# --- the README's "Open the cube", as written -----------------------------------------------


def ours(text: str, replacements: dict[str, str]) -> str:
    """A README block with the demo's endpoint, bucket and cube name replaced by this test's
    (each must be there: a renamed cube or bucket in the README fails here)."""
    for old, new in replacements.items():
        assert old in text, f"the README block no longer names {old!r}:\n{text}"
        text = text.replace(old, new)
    return text


def test_readme_open_the_cube_blocks_are_what_the_demo_prints(tmp_path, capsys):
    """The README's Python blocks of "Open the cube" are, to the character, the snippets the
    demo prints with its defaults (bucket polar-cube, endpoint http://127.0.0.1:8333, the
    1 km cube): they open the version `latest` names, and print its name first."""
    demo = make_parser().parse_args(["demo"])
    spec = load_spec(REPO / "cube.geojson").at_resolution(demo.resolution)
    server = fake_server(tmp_path, port=demo.s3_port)
    _, snippets = printed(capsys, f"s3://{demo.bucket}/{spec.data_id}", spec, local_server=server)
    assert snippet("README.md", "open-xarray") == snippets[XARRAY]
    assert snippet("README.md", "open-xcube") == snippets[XCUBE]


@pytest.mark.slow
def test_readme_open_the_cube_blocks_run_as_written(
    built,
    s3_server,
    tmp_path,
    sandbox,
    aws_files,
):
    """Each block of the README's "Open the cube", from a folder like the repository root
    (`.venv`, `data/s3`): the keys line then each Python snippet in one bash, GDAL's block with
    the real `gdalinfo`, the operators' block in the project's python through the block."""
    demo = make_parser().parse_args(["demo"])
    readme_series = load_spec(REPO / "cube.geojson").at_resolution(demo.resolution).series
    spec = SPEC
    assert built.url == f"s3://polar-test/open/{spec.data_id}"
    assert (demo.bucket, demo.s3_port, demo.bucket_block) == (
        "polar-cube",
        8333,
        "polar-cube-bucket",
    )
    # the demo's defaults, as the README names them -> this test's server, bucket and cube
    # (its series: in the catalog's name and in any version's)
    endpoint = {"http://127.0.0.1:8333": s3_server.endpoint_url}
    cube = {readme_series: spec.series}
    in_bucket = {"s3://polar-cube/": "s3://polar-test/open/"}
    in_root = {'root="polar-cube"': 'root="polar-test/open"'}
    in_vsis3 = {"/vsis3/polar-cube/": "/vsis3/polar-test/open/"}

    keys_line = snippet("README.md", "open-keys")
    assert keys_line == 'eval "$(.venv/bin/polar-cube s3 credentials)"'
    python = {
        XARRAY: ours(snippet("README.md", "open-xarray"), endpoint | in_bucket | cube),
        XCUBE: ours(snippet("README.md", "open-xcube"), endpoint | in_root | cube),
    }
    env = no_prefect_environment(tmp_path, bare_environment(tmp_path))
    check_opened(  # (that they print the name first: the test below)
        python,
        lambda code, show: run_snippet(
            code, show, env, cwd=sandbox, isolated=True, shell_first=keys_line
        ),
        name=None,
    )

    gdal = ours(snippet("README.md", "open-gdal"), in_vsis3 | cube)
    output = run_gdal_snippet(gdal, bare_environment(tmp_path), sandbox)
    grid = TargetGrid.from_spec(spec)
    assert f"Size is {grid.width}, {grid.height}" in output  # magnetic_anomaly's grid
    assert "Antarctic Polar Stereographic" in output
    assert re.search(r"Computed Min/Max=-?\d", output)
    assert not aws_files.exists()

    operators = ours(
        snippet("README.md", "open-blocks"),
        in_bucket | {'"polar-cube-bucket"': f'"{BUCKET_BLOCK}"'} | cube,
    )
    show = '\nimport json\nprint("VARIABLES", json.dumps(sorted(cube.data_vars)))'
    result = subprocess.run(  # the session's Prefect home, where the blocks are
        [sys.executable, "-c", operators + show],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(spec_variables()) <= set(found(result.stdout, "VARIABLES"))


@pytest.mark.slow
def test_a_pasted_snippet_opens_the_newest_version_and_the_one_rolled_back_to(
    built,
    blocks,
    work,
    mirror,
    s3_server,
    tmp_path,
    capsys,
    aws_files,
):
    """Last (it publishes a second version): the snippets printed after the first build, run
    again as pasted then, open 1.1.1 once a rebuild with a changed patch has published it, and
    1.1.0 again after `polar-cube rollback 1.1.0`; the build prints the same Python snippets
    (GDAL's names the new version)."""
    from polar_cube.flows.build_cube import build_cube

    _, snippets = printed(capsys, built.url)
    env = no_prefect_environment(tmp_path, bare_environment(tmp_path) | exported(s3_server))
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    def run(code, show):
        return run_snippet(code, show, env, cwd=workdir, isolated=True)

    original = "Polar Data Cube v1.1.0"
    check_opened(snippets, run, name=SPEC.data_id, title=original)

    patch = tmp_path / "patch.yaml"
    text = (REPO / "patch.yaml").read_text()
    assert f"    title: {original}\n" in text
    patch.write_text(text.replace(f"    title: {original}\n", f"    title: {original}, again\n"))
    rebuilt = build_cube(**build_options(work, mirror, patch_path=str(patch)))
    newer = SPEC.at_version("1.1.1").data_id
    assert (rebuilt.url, rebuilt.version, rebuilt.reused) == (
        f"s3://polar-test/open/{newer}",
        "1.1.1",
        False,
    )
    output, again = printed(capsys, rebuilt.url)
    assert_no_keys(output, s3_server)
    assert (again[XARRAY], again[XCUBE]) == (snippets[XARRAY], snippets[XCUBE])
    assert gdal_path_of(rebuilt.url) in again[GDAL]
    check_opened(snippets, run, name=newer, title=f"{original}, again")

    rolled = subprocess.run(
        [str(REPO / ".venv" / "bin" / "polar-cube"), "rollback", "1.1.0"]
        + ["--bucket-block", BUCKET_BLOCK, "--resolution", str(int(RESOLUTION))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=os.environ | {"PREFECT_API_URL": session_api_url()},  # where the block is
    )
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    assert rolled.stdout == f"latest of {SPEC.series} is now 1.1.0: {built.url}\n"
    assert_no_keys(rolled.stdout + rolled.stderr, s3_server)
    check_opened(snippets, run, name=SPEC.data_id, title=original)
    assert not aws_files.exists()
