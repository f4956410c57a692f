"""Issue 21, item 5: the S3 secret stays secret. A real `polar-cube build --bucket-block …
--dask local` of the 3 km cube into SeaweedFS, watched while it runs; afterwards the secret
key is looked for, byte for byte, in:

- every process command line seen while the build ran (`ps`), the CLI's, its temporary
  Prefect server's, the dask workers' and the S3 server's;
- the build's own output (its log lines);
- the Prefect API's JSON: flow runs (their parameters), task runs, logs, artifacts, and the
  block documents (where it is stored, obfuscated);
- every object of the bucket that is not a chunk: catalog, cube and levels metadata (the
  attributes), STAC item, quicklooks' summary and statistics.

And every port the build's processes and the S3 server listen on is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from polar_cube.keys import is_metadata
from polar_cube.sources.mirror import serving_mirror
from polar_cube.tasks.blocks import load_bucket, save_blocks, storage_options_from_blocks
from tests.conftest import REPO

pytestmark = pytest.mark.slow
BUCKET_BLOCK = "polar-secrets-bucket"
FOLDER = "secrets"


def _listening(process: psutil.Process) -> set[tuple[str, str, int]]:
    try:
        return {
            (process.name(), c.laddr.ip, c.laddr.port)
            for c in process.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        }
    except psutil.Error:
        return set()


@pytest.fixture(scope="module")
def watched(s3_server, small_standins, repo_spec_path, tmp_path_factory):
    save_blocks(
        bucket_block=BUCKET_BLOCK,
        credentials_block="polar-secrets-credentials",
        bucket_name="polar-test",
        bucket_folder=FOLDER,
        endpoint_url=s3_server.endpoint_url,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    work = tmp_path_factory.mktemp("secrets")
    weed = psutil.Process(s3_server.pid)
    command_lines: set[str] = set()
    listening: set[tuple[str, str, int]] = set(_listening(weed))
    with serving_mirror(small_standins) as mirror:
        command = [
            sys.executable,
            "-m",
            "polar_cube.cli",
            "build",
            "--spec",
            str(repo_spec_path),
            "--patch",
            str(REPO / "patch.yaml"),
            "--resolution",
            "3000",
            "--source-mirror",
            mirror,
            "--cache",
            str(work / "cache"),
            "--bucket-block",
            BUCKET_BLOCK,
            "--dask",
            "local",
        ]
        log = work / "build.log"
        with open(log, "w") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, cwd=work, env=os.environ
            )
            deadline = time.monotonic() + 900
            while process.poll() is None and time.monotonic() < deadline:
                for other in psutil.process_iter(["cmdline"]):
                    command_lines.add(" ".join(other.info["cmdline"] or []))
                try:
                    tree = [psutil.Process(process.pid)]
                    tree += tree[0].children(recursive=True)
                except psutil.Error:
                    tree = []
                for member in tree:
                    listening |= _listening(member)
                time.sleep(0.2)
            process.wait(timeout=60)
    return SimpleNamespace(
        returncode=process.returncode,
        output=log.read_text(),
        command_lines=command_lines,
        listening=listening,
        secret=s3_server.secret_key,
    )


def test_the_build_ran_with_its_own_servers(watched):
    assert watched.returncode == 0, watched.output[-4000:]
    names = {name for name, _, _ in watched.listening}
    assert "weed" in names and any("python" in name for name in names), watched.listening
    assert any("prefect.server.api.server" in line for line in watched.command_lines)
    assert any("distributed" in line or "dask" in line for line in watched.command_lines)


def test_the_secret_is_in_no_command_line_and_no_output(watched):
    assert len(watched.secret) >= 16
    assert [line for line in watched.command_lines if watched.secret in line] == []
    assert watched.secret not in watched.output


def test_every_server_listens_on_localhost_only(watched):
    assert {ip for _, ip, _ in watched.listening} == {"127.0.0.1"}, watched.listening


def _prefect_json() -> dict[str, str]:
    """The raw JSON the Prefect API answers for runs, logs, artifacts and blocks."""
    from prefect import get_client

    async def read() -> dict[str, str]:
        found = {}
        async with get_client() as client:
            http = client._client
            for what in ("flow_runs", "task_runs", "artifacts", "block_documents"):
                response = await http.post(f"/{what}/filter", json={"limit": 200})
                response.raise_for_status()
                found[what] = response.text
            offset, pages = 0, []
            while True:  # every log line, a page at a time
                response = await http.post("/logs/filter", json={"limit": 200, "offset": offset})
                response.raise_for_status()
                page = response.json()
                pages.append(response.text)
                if len(page) < 200:
                    break
                offset += 200
            found["logs"] = "".join(pages)
        return found

    return asyncio.run(read())


def test_the_secret_is_nowhere_in_the_prefect_api(watched):
    found = _prefect_json()
    assert BUCKET_BLOCK in found["flow_runs"]  # the run's parameters name the block ...
    assert "polar-cube-summary" in found["artifacts"]
    assert "Finished in state Completed" in found["logs"]
    assert "polar-secrets-credentials" in found["block_documents"]
    for what, text in found.items():  # ... never the secret (blocks: stored obfuscated)
        assert watched.secret not in text, what


def test_the_secret_is_in_no_metadata_of_the_bucket(watched):
    import s3fs

    options = storage_options_from_blocks(load_bucket(BUCKET_BLOCK))
    fs = s3fs.S3FileSystem(**options)
    keys = [key for key in fs.find(f"polar-test/{FOLDER}") if "/.polar-cube-lock/" not in key]
    documents = [
        key for key in keys if is_metadata(key) or Path(key).suffix in (".json", ".md", ".txt")
    ]
    assert any(key.endswith(".stac-item.json") for key in documents)
    assert any(key.endswith(".versions.json") for key in documents)
    assert any(key.endswith("/.zmetadata") for key in documents)
    for key in documents:
        assert watched.secret.encode() not in fs.cat_file(key), key
