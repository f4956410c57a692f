"""polar_cube.cube.icechunk_repo against the real SeaweedFS server (fixture `s3_server`) and a
local folder: versions written, tagged and read back, chunks shared between versions, a
tag written twice, concurrent commits, and a writer SIGKILLed at several moments of a commit.
"""

from __future__ import annotations

import inspect
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from polar_cube.cube.icechunk_repo import (
    IcechunkError,
    commit_version,
    list_versions,
    open_repository,
    open_version,
)
from polar_cube.errors import PolarCubeError
from polar_cube.location import StoreLocation, remote_files

REPO = Path(__file__).resolve().parents[1]
BUCKET = "polar-test"  # the bucket of conftest's s3_server


def dataset(seed: int, size: int, names: tuple[str, ...] = ("a", "b")) -> xr.Dataset:
    """Random float32 (y, x) variables (incompressible: no chunk is small enough to be
    inlined into a manifest) on 100 m x/y coordinates."""
    import numpy as np
    import xarray as xr

    rng = np.random.default_rng(seed)
    return xr.Dataset(
        {name: (("y", "x"), rng.random((size, size + 32), dtype="float32")) for name in names},
        coords={"x": np.arange(size + 32) * 100.0 + 50, "y": np.arange(size) * 100.0 + 50},
    )


def writer(ds: xr.Dataset, chunk: int, mode: str = "w"):
    """A `write` for commit_version: `ds` into the session's store, (chunk, chunk) chunks."""

    def write(store) -> None:
        # arrays that exist keep their chunks (xarray refuses an encoding for them)
        encoding = {name: {"chunks": (chunk, chunk)} for name in ds.data_vars}
        encoding = encoding if mode == "w" else None
        ds.to_zarr(store, zarr_format=3, consolidated=False, mode=mode, encoding=encoding)

    return write


def n_chunks(ds: xr.Dataset, chunk: int) -> int:
    """Chunk objects of one data variable of `ds`."""
    ny, nx = ds.sizes["y"], ds.sizes["x"]
    return -(-ny // chunk) * -(-nx // chunk)


def chunk_objects(location: StoreLocation, key: str) -> set[str]:
    return {name for name in remote_files(location, key) if name.startswith("chunks/")}


def metadata_objects(location: StoreLocation, key: str) -> set[str]:
    """Every object of the repository but its chunks and references."""
    return {
        name for name in remote_files(location, key) if not name.startswith(("chunks/", "refs/"))
    }


def assert_holds(opened: xr.Dataset, expected: xr.Dataset) -> None:
    """`opened` holds exactly `expected`'s variables, values and coordinates."""
    assert set(opened.data_vars) == set(expected.data_vars)
    for name in expected.variables:
        assert opened[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(opened[name].values, expected[name].values, err_msg=name)


@pytest.fixture(params=["s3", "local"])
def location(request, tmp_path) -> StoreLocation:
    """A fresh place for repositories: a prefix in the SeaweedFS bucket, or a local folder."""
    if request.param == "local":
        return StoreLocation.local(tmp_path / "cubes")
    server = request.getfixturevalue("s3_server")
    options = {
        "key": server.access_key,
        "secret": server.secret_key,
        "client_kwargs": {"endpoint_url": server.endpoint_url},
    }
    return StoreLocation(f"s3://{BUCKET}/icechunk-{uuid.uuid4().hex[:8]}", options)


def test_two_versions_share_the_unchanged_chunks(location):
    key, chunk = "cube.icechunk", 32
    v1 = dataset(seed=1, size=64)  # (64, 96): 2 x 3 chunks per variable
    v2 = v1.assign(b=(("y", "x"), dataset(seed=2, size=64)["b"].values))
    repo = open_repository(location, key)

    first = commit_version(repo, writer(v1, chunk), "build 1", "v1.0.0")
    after_first = chunk_objects(location, key)
    # the next build rewrites only what changed: b (appending mode keeps a as it is)
    second = commit_version(repo, writer(v2[["b"]], chunk, mode="a"), "build 2", "v1.0.1")
    after_second = chunk_objects(location, key)

    assert first != second
    assert list_versions(repo) == [("v1.0.0", first), ("v1.0.1", second)]
    assert_holds(open_version(location, key, "v1.0.0"), v1)
    assert_holds(open_version(location, key, "v1.0.1"), v2)
    assert_holds(open_version(location, key), v2)  # main: the newest commit
    assert not np.array_equal(v1["b"].values, v2["b"].values)  # the two differ at all
    # every chunk of v1.0.0 is still there, and v1.0.1 added exactly b's chunks: a's chunks
    # are shared by reference, not copied
    assert len(after_first) == 2 * n_chunks(v1, chunk)
    assert after_first <= after_second
    assert len(after_second - after_first) == n_chunks(v2, chunk)
    # a second handle on the repository (as a reader elsewhere) sees both versions
    assert [tag for tag, _ in list_versions(open_repository(location, key, create=False))] == [
        "v1.0.0",
        "v1.0.1",
    ]


def test_a_tag_that_exists_already_is_refused(location):
    key = "cube.icechunk"
    v1 = dataset(seed=3, size=32)
    repo = open_repository(location, key)
    first = commit_version(repo, writer(v1, 32), "build 1", "v1.0.0")
    called = []

    def write(store) -> None:
        called.append(store)
        writer(dataset(seed=4, size=32), 32)(store)

    with pytest.raises(IcechunkError) as raised:
        commit_version(repo, write, "build 2", "v1.0.0")
    message = str(raised.value)
    assert "'v1.0.0'" in message and "exists already" in message
    assert location.url(key).removeprefix("file://") in message  # names the repository
    assert isinstance(raised.value, PolarCubeError) and not raised.value.retryable
    # refused before anything was written: no write, main and the tag unchanged
    assert called == []
    assert repo.lookup_branch("main") == first
    assert list_versions(repo) == [("v1.0.0", first)]
    assert_holds(open_version(location, key), v1)


def test_missing_repositories_and_versions_are_named(location):
    with pytest.raises(IcechunkError, match="no Icechunk repository here") as raised:
        open_version(location, "nothing.icechunk")
    assert "nothing.icechunk" in str(raised.value)
    repo = open_repository(location, "cube.icechunk")
    commit_version(repo, writer(dataset(seed=5, size=32), 32), "build 1", "v1.0.0")
    with pytest.raises(IcechunkError, match=r"no version v2\.0\.0 \(versions: v1\.0\.0\)"):
        open_version(location, "cube.icechunk", "v2.0.0")


def test_wrong_keys_are_refused_clearly(s3_server):
    location = StoreLocation(
        f"s3://{BUCKET}/icechunk-keys",
        {
            "key": s3_server.access_key,
            "secret": "not-the-secret",
            "client_kwargs": {"endpoint_url": s3_server.endpoint_url},
        },
    )
    with pytest.raises(IcechunkError) as raised:
        open_repository(location, "cube.icechunk")
    message = str(raised.value)
    assert message.startswith(f"s3://{BUCKET}/icechunk-keys/cube.icechunk: ")
    assert "SignatureDoesNotMatch" in message and "not-the-secret" not in message
    assert "\n" not in message


def test_concurrent_commits_on_seaweedfs_lose_nothing(s3_server):
    """Eight builds commit at the same moment on one parent: SeaweedFS's conditional writes
    let exactly one through; the others fail (retryable) and leave no trace. With
    Icechunk's unsafe settings several would "succeed" and all but one be lost."""
    location = StoreLocation(
        f"s3://{BUCKET}/icechunk-{uuid.uuid4().hex[:8]}",
        {
            "key": s3_server.access_key,
            "secret": s3_server.secret_key,
            "client_kwargs": {"endpoint_url": s3_server.endpoint_url},
        },
    )
    repo = open_repository(location, "cube.icechunk")
    base = commit_version(repo, writer(dataset(seed=6, size=32), 32), "base", "v1.0.0")
    builds = 8
    everyone_written = threading.Barrier(builds)
    results: dict[int, str | Exception] = {}

    def build(index: int) -> None:
        def write(store) -> None:
            writer(dataset(seed=100 + index, size=32), 32)(store)
            everyone_written.wait(timeout=60)  # all sessions open on the same parent

        try:
            results[index] = commit_version(repo, write, f"build {index}", f"v2.0.{index}")
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=build, args=(i,)) for i in range(builds)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    won = {i: r for i, r in results.items() if isinstance(r, str)}
    lost = {i: r for i, r in results.items() if not isinstance(r, str)}
    assert len(results) == builds
    assert len(won) == 1, results
    for error in lost.values():
        assert isinstance(error, IcechunkError) and error.retryable, repr(error)
        assert "another commit reached `main` first" in str(error)
    (winner, snapshot), *_ = won.items()
    history = [s.id for s in repo.ancestry(branch="main")]
    assert history[:2] == [snapshot, base]
    assert list_versions(repo) == [("v1.0.0", base), (f"v2.0.{winner}", snapshot)]
    assert_holds(open_version(location, "cube.icechunk"), dataset(seed=100 + winner, size=32))


# --- a writer SIGKILLed mid-commit ------------------------------------------------------------

# The child: reads its job (JSON) from stdin, reports each stage on stdout, commits one version.
CHILD = """
import json
import sys

import numpy as np
import xarray as xr

from polar_cube.cube.icechunk_repo import commit_version, open_repository
from polar_cube.location import StoreLocation

{dataset}

job = json.load(sys.stdin)
location = StoreLocation(job["root"], job["storage_options"])
repo = open_repository(location, job["key"], create=False)
ds = dataset(job["seed"], job["size"], tuple(job["names"]))

def say(stage):
    print(stage, flush=True)

def write(store):
    encoding = {{name: {{"chunks": (job["chunk"], job["chunk"])}} for name in ds.data_vars}}
    say("writing")
    ds.to_zarr(store, zarr_format=3, consolidated=False, mode="w", encoding=encoding)
    say("written")

say("ready")
commit_version(repo, write, f"build {{job['seed']}}", job["tag"])
say("tagged")
"""

# When each attempt is killed: (stage reported or observed, then seconds)
KILL_MOMENTS = [
    ("writing", 0.0),  # before the first chunk
    ("writing", 0.1),  # among the chunks (or later: local folders are fast)
    ("written", 0.0),  # committing: manifests, then the snapshot, then main moves
    ("written", 0.005),
    ("written", 0.01),
    ("written", 0.02),
    ("written", 0.04),
    ("snapshot", 0.0),  # the new snapshot object exists, main not yet moved (if we are fast)
    ("main moved", 0.0),  # committed, maybe not yet tagged
]
# more moments inside the commit, tried one by one until one kill lands there
SPARE_MOMENTS = [("written", d) for d in (0.0025, 0.0075, 0.015, 0.003, 0.006, 0.012, 0.025)]
BIG = {"size": 1536, "chunk": 256, "names": ["a", "b", "c"]}  # 3 x 1536 x 1568 float32: 29 MB


class Child:
    """The child process; its stdout read unbuffered (every stage as soon as it is printed)."""

    def __init__(self, job: dict, log: Path) -> None:
        script = log.with_suffix(".py")
        source = textwrap.dedent(inspect.getsource(dataset))
        script.write_text(CHILD.format(dataset=source))
        self.stderr = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            cwd=REPO,
        )
        self.process.stdin.write(json.dumps(job).encode())  # the keys: not on the command line
        self.process.stdin.close()
        self.stages: list[str] = []
        self._partial = b""

    def _read(self, timeout: float) -> bool:
        """Read what the child printed within `timeout`; False at the end of its output."""
        fd = self.process.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return True
        data = os.read(fd, 4096)
        *lines, self._partial = (self._partial + data).split(b"\n")
        self.stages += [line.decode().strip() for line in lines]
        return bool(data)

    def wait_for(self, stage: str, timeout: float = 60) -> bool:
        """True once the child reported `stage`; False if it ended without."""
        deadline = time.monotonic() + timeout
        while stage not in self.stages:
            left = deadline - time.monotonic()
            assert left > 0, f"no {stage!r} from the child within {timeout} s: {self.stages}"
            if not self._read(left):
                return False
        return True

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        while self._read(0):
            pass
        self.process.stdout.close()
        self.stderr.close()


def wait_until(condition, child: Child, timeout: float = 60) -> None:
    """Poll `condition` as fast as possible until true or the child has exited."""
    deadline = time.monotonic() + timeout
    while not condition() and child.process.poll() is None:
        assert time.monotonic() < deadline, "the child neither got there nor exited"


def same_as(opened: xr.Dataset, candidates: dict[str, xr.Dataset]) -> str:
    """Which candidate `opened` holds exactly; fails on anything else (a mix)."""
    loaded = opened.load()
    matches = []
    for name, expected in candidates.items():
        if set(loaded.data_vars) == set(expected.data_vars) and all(
            np.array_equal(loaded[v].values, expected[v].values) for v in expected.variables
        ):
            matches.append(name)
    assert len(matches) == 1, f"holds neither version exactly (one of {list(candidates)})"
    return matches[0]


@pytest.mark.slow
def test_a_writer_killed_mid_commit_leaves_a_whole_version(location, tmp_path):
    key = "cube.icechunk"
    repo = open_repository(location, key)
    base = dataset(seed=1000, size=BIG["size"], names=tuple(BIG["names"]))
    base_snapshot = commit_version(repo, writer(base, BIG["chunk"]), "base", "v1.0.0")
    current = base  # what main holds
    outcomes: list[str] = []
    caught_committing = 0  # kills after the commit stored manifests, before main moved

    moments, spare = list(KILL_MOMENTS), list(SPARE_MOMENTS)
    for attempt, (moment, delay) in enumerate(moments):
        seed, tag = 1001 + attempt, f"v1.0.{attempt + 1}"
        job = {
            "root": location.root,
            "storage_options": location.storage_options,
            "key": key,
            "seed": seed,
            "tag": tag,
            **BIG,
        }
        metadata_before = metadata_objects(location, key)
        snapshots_before = {name for name in metadata_before if name.startswith("snapshots/")}
        main_before = open_repository(location, key).lookup_branch("main")
        child = Child(job, tmp_path / f"child-{attempt}.log")
        try:
            if moment in ("writing", "written"):
                child.wait_for(moment)
            else:
                child.wait_for("written")
                if moment == "snapshot":
                    wait_until(
                        lambda before=snapshots_before: any(
                            name.startswith("snapshots/") and name not in before
                            for name in remote_files(location, key)
                        ),
                        child,
                    )
                else:  # main moved
                    wait_until(
                        lambda before=main_before: (
                            open_repository(location, key, create=False).lookup_branch("main")
                            != before
                        ),
                        child,
                    )
            time.sleep(delay)
        finally:
            child.kill()
        log = (tmp_path / f"child-{attempt}.log").read_text()
        assert child.process.returncode in (-signal.SIGKILL, 0), f"attempt {attempt}: {log}"

        # the repository still opens; v1.0.0 is the base exactly; main is all old or all new
        new = dataset(seed=seed, size=BIG["size"], names=tuple(BIG["names"]))
        repo = open_repository(location, key, create=False)
        assert repo.lookup_tag("v1.0.0") == base_snapshot
        assert same_as(open_version(location, key, "v1.0.0"), {"base": base, "new": new}) == (
            "base"
        )
        main = same_as(open_version(location, key), {"old": current, "new": new})
        tags = dict(list_versions(repo))
        if tag in tags:  # tagged: the tag is main's commit and holds the new version
            assert main == "new" and tags[tag] == repo.lookup_branch("main")
            assert same_as(open_version(location, key, tag), {"new": new}) == "new"
        # what the killed commit had stored of its own metadata (chunks are written earlier)
        stored = sorted(
            {name.split("/")[0] for name in metadata_objects(location, key) - metadata_before}
        )
        outcomes.append(
            f"killed at {moment} + {delay} s: last stage "
            f"{child.stages[-1] if child.stages else '-'}, metadata stored {stored or 'none'}, "
            f"main {main}, {'tagged' if tag in tags else 'not tagged'}"
        )
        if main == "old" and "manifests" in stored:
            caught_committing += 1
        current = new if main == "new" else current
        if attempt == len(moments) - 1 and not caught_committing and spare:
            moments.append(spare.pop(0))  # not caught in the act yet: try other moments

    print("\n".join(outcomes))
    # killed before it wrote anything: the old version; killed after main moved: the new one
    assert " main old" in outcomes[0], outcomes
    assert " main new" in outcomes[KILL_MOMENTS.index(("main moved", 0.0))], outcomes
    # and at least once in the middle of the commit: manifests stored, main not yet moved
    assert caught_committing, outcomes

    # and the next build commits as usual
    final = dataset(seed=2000, size=BIG["size"], names=tuple(BIG["names"]))
    snapshot = commit_version(repo, writer(final, BIG["chunk"]), "after the kills", "v2.0.0")
    assert repo.lookup_branch("main") == snapshot
    assert same_as(open_version(location, key, "v2.0.0"), {"final": final}) == "final"
    assert same_as(open_version(location, key, "v1.0.0"), {"base": base}) == "base"
    assert list_versions(repo)[0] == ("v1.0.0", base_snapshot)
    assert list_versions(repo)[-1] == ("v2.0.0", snapshot)
