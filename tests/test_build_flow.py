"""End to end through Prefect: small stand-ins served over HTTP -> one zarr per dataset
(`--datasets-only`, into a local store), or each source's chunks straight into a new cube
version with its metadata in `<stem>.inputs/` (what `build-cube` asks for)."""

import json
import subprocess
import sys
from datetime import UTC, datetime

import numpy as np
import pytest
import xarray as xr

from polar_cube.grid import TargetGrid
from polar_cube.keys import VersionKeys, is_metadata
from polar_cube.location import StoreLocation
from polar_cube.sources.mirror import serving_mirror
from polar_cube.spec import load_spec
from polar_cube.zarr_store import sibling_levels, stored_fingerprint, stored_levels_fingerprint
from tests.prefect_api import session_api_env

pytestmark = pytest.mark.slow
RESOLUTION = 3000.0  # divides the bbox; small stand-ins are this coarse


@pytest.fixture(scope="module")
def built(small_standins, repo_spec_path, tmp_path_factory):
    from polar_cube.flows.build_datasets import build_datasets

    work = tmp_path_factory.mktemp("build")
    (work / "started").write_text(datetime.now(UTC).isoformat())  # to tell its artifacts apart
    spec = load_spec(repo_spec_path)
    options = dict(
        spec=spec,
        grid=TargetGrid.from_spec(spec, RESOLUTION),
        cache_dir=str(work / "cache"),
        store_dir=str(work / "datasets"),
    )
    with serving_mirror(small_standins) as mirror:
        first = build_datasets(source_mirror=mirror, **options)
        second = build_datasets(source_mirror=mirror, **options)
    (work / "ended").write_text(datetime.now(UTC).isoformat())
    return first, second, work


def version_name(spec, version):
    return spec.at_resolution(RESOLUTION).at_version(version).data_id


@pytest.fixture(scope="module")
def in_versions(built, small_standins, repo_spec_path, tmp_path_factory):
    """Into a version in a local folder (the cache of `built` already holds the sources):
    v1.1.0 with nothing published before, then v1.1.1 with v1.1.0 as `latest`."""
    from polar_cube.flows.build_datasets import build_datasets

    out = tmp_path_factory.mktemp("versions")
    spec = load_spec(repo_spec_path)
    options = dict(
        spec=spec,
        grid=TargetGrid.from_spec(spec, RESOLUTION),
        cache_dir=str(built[2] / "cache"),
        store_dir=str(out / "unused-store"),
        output_dir=str(out / "bucket"),
    )
    first_version, next_version = version_name(spec, "1.1.0"), version_name(spec, "1.1.1")
    with serving_mirror(small_standins) as mirror:
        first = build_datasets(source_mirror=mirror, version=first_version, **options)
        carried = build_datasets(
            source_mirror=mirror, version=next_version, latest=first_version, **options
        )
    return first, carried, out


def test_every_source_becomes_a_labelled_cube(built, repo_spec_path):
    first, _, work = built
    spec = load_spec(repo_spec_path)
    assert sorted(b.source_id for b in first) == sorted(s.id for s in spec.sources)
    assert not any(b.reused for b in first)
    for variable in spec.variables:
        path = work / "datasets" / f"{variable.source}.zarr"
        cube = xr.open_zarr(path, consolidated=True)
        data = cube[variable.name]
        assert data.dims == variable.dims
        assert data.dtype == np.float32
        assert data.attrs["units"] == variable.units
        assert data.attrs["long_name"] == variable.long_name
        assert data.attrs["grid_mapping"] == "crs"
        assert any("Resampled" in s or "Rasterized" in s for s in data.attrs["processing_steps"])
        assert data.encoding["chunks"][-2:] == (2048, 2048)[: data.ndim]
        assert cube.sizes["x"] == 651 and cube.sizes["y"] == 707
        values = data.values
        assert np.isfinite(values).any(), variable.name
    thw = xr.open_zarr(work / "datasets" / "subglacial_lakes_thwaites.zarr")
    assert thw.sizes["time"] == 2
    assert set(np.unique(thw.thw_70.values[np.isfinite(thw.thw_70.values)])) <= {0.0, 1.0}
    lakes = xr.open_zarr(work / "datasets" / "supraglacial_lakes_wais.zarr").supraglacial_lakes
    assert set(np.unique(lakes.values)) == {0.0, 1.0, 2.0}
    heat = xr.open_zarr(work / "datasets" / "geothermal_heat_flow_200km.zarr")
    assert float(heat.geothermal_heat_flow_200km.min()) > 0


def test_rerun_reuses_downloads_and_cubes(built):
    first, second, work = built
    assert all(b.reused for b in second)
    assert all(b.downloaded for b in first) and not any(b.downloaded for b in second)
    meta = json.loads(
        (
            work / "cache/magnetic_anomaly/ASE_MagneticCompilation_Dziadeketal_250m.tif.meta.json"
        ).read_text()
    )
    assert len(meta["sha256"]) == 64
    assert [b.path for b in first] == [b.path for b in second]


def test_flow_runs_are_recorded_by_the_prefect_api(built):
    from prefect import get_client

    async def flow_run_names():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            return {(r.name, r.state.type.value) for r in runs}

    import asyncio

    names = asyncio.run(flow_run_names())
    assert ("datasets-polar-3km-1x2048x2048-v1.1.0", "COMPLETED") in names


def test_cli_only_one_variable_and_a_missing_source(small_standins, repo_spec_path, tmp_path):
    """Against the session's Prefect API (no temporary server of its own: that one is
    tests/test_stops.py's subject)."""
    empty = tmp_path / "empty-mirror"
    empty.mkdir()
    with serving_mirror(empty) as mirror:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "polar_cube.cli",
                "build",
                "--spec",
                str(repo_spec_path),
                "--only",
                "thw_70",
                "--resolution",
                "3000",
                "--source-mirror",
                mirror,
                "--cache",
                str(tmp_path / "cache"),
                "--output",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            env=session_api_env(),
        )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("polar-cube: error")]
    assert errors == [
        f"polar-cube: error: subglacial_lakes_thwaites: {mirror}/Malczyk_etal_2020_data_v2.tar: "
        "HTTP 404 Not Found (not retried)"
    ]
    assert not (tmp_path / "out").exists()
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_the_datasets_progress_ends_at_100_with_its_percentage_in_words(built, repo_spec_path):
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def progress_artifacts():
        key = ArtifactFilterKey(any_=["polar-cube-datasets-progress"])
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=key))

    spec = load_spec(repo_spec_path).at_resolution(RESOLUTION)
    count = len(spec.sources)
    started = datetime.fromisoformat((built[2] / "started").read_text())
    ended = datetime.fromisoformat((built[2] / "ended").read_text())
    ours = [a for a in asyncio.run(progress_artifacts()) if started <= a.created <= ended]
    finished = [a for a in ours if float(a.data) == 100]
    assert len(finished) == 2  # both builds of the fixture (other tests' builds came before)
    for artifact in finished:
        assert artifact.type == "progress"
        assert artifact.description.startswith(
            f"100 % · {spec.data_id}: {count} of {count} per-dataset cubes (latest: "
        )


def test_into_a_version_the_chunks_go_into_its_cube_and_the_metadata_apart(
    in_versions, built, repo_spec_path
):
    first, _, out = in_versions
    spec = load_spec(repo_spec_path)
    keys = VersionKeys(version_name(spec, "1.1.0"))
    bucket = out / "bucket"
    assert sorted(b.source_id for b in first) == sorted(s.id for s in spec.sources)
    assert not any(b.reused or b.carried_from for b in first)
    assert {b.path for b in first} == {str(bucket / keys.cube)}
    assert not (out / "unused-store").exists()  # no per-dataset copy anywhere else
    assert {p.name for p in bucket.iterdir()} == {keys.cube, keys.levels, keys.inputs}
    local = {b.source_id: b for b in built[0]}
    for item in first:
        metadata = bucket / keys.input_key(item.source_id)
        assert stored_fingerprint(metadata) == item.fingerprint == local[item.source_id].fingerprint
        levels = sibling_levels(StoreLocation.local(metadata))
        assert stored_levels_fingerprint(levels) == item.fingerprint
        for name in item.variables:
            assert (metadata / name / ".zarray").is_file(), name
            assert not [p for p in (metadata / name).iterdir() if not is_metadata(p.name)], name
            written = {
                p.name: p.read_bytes() for p in (bucket / keys.cube / name).iterdir() if p.is_file()
            }
            store = built[2] / "datasets" / f"{item.source_id}.zarr" / name
            expected = {
                p.name: p.read_bytes()
                for p in store.iterdir()
                if p.is_file() and not is_metadata(p.name)
            }
            assert written and written == expected, name  # the same chunks, byte for byte
    assert not [p for p in (bucket / keys.cube).rglob("*") if is_metadata(p.name)]  # not merged


def test_into_the_next_version_unchanged_sources_are_carried_not_rebuilt(
    in_versions, repo_spec_path
):
    first, carried, out = in_versions
    spec = load_spec(repo_spec_path)
    earlier, draft = (
        VersionKeys(version_name(spec, "1.1.0")),
        VersionKeys(version_name(spec, "1.1.1")),
    )
    assert sorted(b.source_id for b in carried) == sorted(b.source_id for b in first)
    assert all(b.reused and b.carried_from == earlier.cube for b in carried)
    assert [b.fingerprint for b in carried] == [b.fingerprint for b in first]
    assert not any(b.downloaded for b in carried)  # the cache had every source
    # nothing was written into the new version: carrying it over is build-cube's (carry)
    assert not [p for p in (out / "bucket").iterdir() if p.name.startswith(draft.stem)]
