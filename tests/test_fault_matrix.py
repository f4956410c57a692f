"""The fault matrix: every fault the project is proven to survive, with its expected outcome
and the test that injects it against real servers and real files. The README's table "What
happens when …" is this matrix, case for case, in this order and these words.

Each case runs where its fixtures are (a build per case costs seconds; grouping them by
fixture keeps the suite's workers busy): `test_faults.py` (bad input, bad sources, full and
read-only disks, a second build), `test_kill_matrix.py` (SIGKILLs at every phase), and the
modules named below. This module checks that the README and the matrix agree, and that
every case's test exists with that case among its parameters, so no case is dropped from
either without the other.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass

import pytest

from tests.conftest import REPO


@dataclass(frozen=True)
class Fault:
    when: str  # the README's first column
    outcome: str  # its second: the one error line, or what happens instead
    tests: tuple[str, ...]  # `module::function` or `module::function[case]`, each injecting it


def _faults(*cases: str) -> tuple[str, ...]:
    return tuple(f"test_faults::{case}" for case in cases)


PREFLIGHT = "test_faults::test_bad_input_is_refused_before_anything_starts"
BAD_SOURCE = (
    "test_faults::"
    "test_a_bad_source_is_refused_never_cached_and_a_rerun_after_the_fix_equals_a_clean_build"
)
READER = (
    "test_faults::test_a_source_its_reader_refuses_publishes_nothing_and_the_fixed_source_"
    "equals_a_clean_build"
)
KILL = "test_kill_matrix::test_a_kill_publishes_nothing_partial_and_a_rerun_equals_a_clean_build"
KILLED_RERUN = (
    "the build dies; nothing partial is published; a rerun resumes and equals a clean build"
)

MATRIX = (
    # --- bad input, refused before anything starts ----------------------------------------
    Fault(
        "the spec is not JSON",
        "`cube.geojson: not valid JSON: Expecting ',' delimiter: line 297 column 5 (char 15104)`",
        (f"{PREFLIGHT}[spec is not JSON]",),
    ),
    Fault(
        "a spec field is wrong",
        "`cube.geojson: invalid spec: properties.variables[2:geothermal_heat_flow_200km].units: "
        "Input should be a valid string`",
        (f"{PREFLIGHT}[spec field of the wrong type]",),
    ),
    Fault(
        "the spec's resolution does not divide its bbox",
        "`cube.geojson: invalid spec: properties.spatial_res: 2000 m does not divide the bbox x "
        "extent 1953000 m into whole cells (these fit: 50, 100, 150, 200, 250, 300, 350, 500, "
        "600, 700, 750, 1000 m)`",
        (f"{PREFLIGHT}[spec resolution that does not divide the bbox]",),
    ),
    Fault(
        "`--resolution 0` or negative",
        "`--resolution 0: must be a positive number of metres; the bbox is "
        "properties.spatial_bbox of cube.geojson`",
        (f"{PREFLIGHT}[--resolution 0]", f"{PREFLIGHT}[--resolution negative]"),
    ),
    Fault(
        "`--resolution 2000`",
        "`--resolution 2000: 2000 m does not divide the bbox x extent 1953000 m into whole cells "
        "(these fit: …); the bbox is properties.spatial_bbox of cube.geojson`",
        (f"{PREFLIGHT}[--resolution not dividing]",),
    ),
    Fault(
        "the patch file is not YAML",
        "`patch.yaml: not valid YAML at line 2, column 3: expected ',' or '}', but got "
        "'<stream end>'`",
        (f"{PREFLIGHT}[patch is not YAML]",),
    ),
    Fault(
        "the patch names an unknown variable",
        "`patch.yaml: entries for variables the cube does not have: ice_thicknes (it has: crs, …)`",
        (f"{PREFLIGHT}[patch for an unknown variable]",),
    ),
    Fault(
        "the target is read-only",
        "`--output /ro/out: cannot write into /ro: read-only file system`",
        _faults("test_a_read_only_target_is_refused_before_anything_starts"),
    ),
    Fault(
        "the download cache is read-only",
        "`--cache /ro/cache: cannot write into /ro: read-only file system`",
        _faults("test_an_unwritable_cache_is_refused_before_anything_starts"),
    ),
    Fault(
        "the target has no room for the grid",
        "`--output /small/out: the 500m cube needs at least 140.8 MB (17 layers of 3,906 x "
        "4,242 cells; up to 1.5 GB uncompressed), /small has 6.3 MB free`",
        _faults("test_a_target_too_small_for_the_grid_is_refused_with_an_estimate"),
    ),
    # --- bad sources: refused, nothing cached or published -----------------------------------
    Fault(
        "a source is truncated (GMT netCDF)",
        "`geothermal_heat_flow_200km: http://…/200km_GHF_windowCenters.nc: "
        "200km_GHF_windowCenters.nc is truncated: its header declares 32268 bytes of data, the "
        "file has 16134`",
        (f"{BAD_SOURCE}[truncated GMT netCDF]",),
    ),
    Fault(
        "… a netCDF-4, GeoTIFF, tar or zip",
        "the same pattern: `<source>: <URL>: <file> is truncated: …`, `… cannot list as a tar "
        "archive (truncated?): …`, `… cannot read as a zip archive (truncated or damaged?): …`",
        (
            f"{BAD_SOURCE}[truncated netCDF-4]",
            f"{BAD_SOURCE}[truncated GeoTIFF]",
            f"{BAD_SOURCE}[truncated tar]",
            f"{BAD_SOURCE}[truncated zip]",
        ),
    ),
    Fault(
        "a zip bomb (a few kB expanding to 1 GB)",
        "`supraglacial_lakes_wais: http://…/WAIS_Max_Extent.zip: WAIS_Max_Extent.zip: member "
        "'WAIS_Max_Extent/WAIS_Jan_2017_Polygons.shp' expands 1,367,824 times (785 bytes to 1.1 "
        "GB; at most 1,000 allowed): a bomb?` (refused as it is downloaded: nothing is "
        "extracted)",
        (f"{BAD_SOURCE}[zip bomb]", "test_archives::test_a_tar_bomb_is_refused_by_its_ratio"),
    ),
    Fault(
        "an archive inside the archive",
        "`subglacial_lakes_thwaites: http://…/Malczyk_etal_2020_data_v2.tar: "
        "Malczyk_etal_2020_data_v2.tar: unsafe member 'more_masks.zip' (a nested zip archive: "
        "archives inside archives are not extracted)`",
        (f"{BAD_SOURCE}[nested archive]",),
    ),
    Fault(
        "an archive member is a link, a device, or lands outside its folder",
        "`…/x.tar: unsafe member '../evil' (…)` (nothing is extracted)",
        (
            "test_archives::test_unsafe_tar_member_rejected_before_extracting",
            "test_archives::test_unsafe_zip_member_rejected",
            "test_archives::test_absolute_zip_member_rejected",
            "test_archives::test_zip_symlinks_are_refused",
        ),
    ),
    Fault(
        "a login page comes back with status 200",
        "`curie_depth_200km: http://…/200km_Dziadek_etal_CurieDepth_Results.nc returned an HTML "
        "page (a login or error page?) instead of data`",
        (f"{BAD_SOURCE}[HTML page with status 200]",),
    ),
    Fault(
        "the server answers 404",
        "`curie_depth_300km: http://…/300km_Dziadek_etal_CurieDepth_Results.nc: HTTP 404 Not "
        "Found (not retried)`",
        (f"{BAD_SOURCE}[404]",),
    ),
    Fault(
        "a GeoTIFF has no CRS",
        "`magnetic_anomaly (http://…/ASE_MagneticCompilation_Dziadeketal_250m.tif): "
        "…/ASE_MagneticCompilation_Dziadeketal_250m.tif: has no CRS (the spec says EPSG:3031): "
        "not georeferenced, refusing to guess`",
        (f"{READER}[GeoTIFF without CRS]",),
    ),
    Fault(
        "a source lies outside the cube's region",
        "`magnetic_anomaly (http://…/ASE_MagneticCompilation_Dziadeketal_250m.tif): "
        "ASE_MagneticCompilation_Dziadeketal_250m.tif: its bounds x 7.3975e+06…9.3505e+06, y "
        "-1.626e+06…495000 (EPSG:3031) lie outside the cube's region x -2.6025e+06…-649500, y "
        "-1.626e+06…495000 (properties.spatial_bbox): the wrong file, or not in the spec's "
        "source_crs?`",
        (f"{READER}[GeoTIFF outside the cube's region]",),
    ),
    Fault(
        "a grid read whole would not fit in memory",
        "`…/grid.nc: z (100000x100000 values) would need 80.0 GB of memory to read, more than "
        "the 6.0 GB allowed (POLAR_CUBE_MAX_SOURCE_MEMORY_BYTES)`",
        ("test_readers::test_a_gmt_grid_too_large_for_memory_is_refused_with_its_need",),
    ),
    # --- upstreams and networks ------------------------------------------------------------
    Fault(
        "a source gets new bytes at the same URL",
        "no error: that source is downloaded again (the others answer 304), its variables alone "
        "are recomputed, a new version is published, and the summary says `Changed upstream: "
        "magnetic_anomaly, new bytes at the same URL: sha256 … → …`",
        _faults(
            "test_a_source_changed_at_the_same_url_is_fetched_and_recomputed_alone",
        ),
    ),
    Fault(
        "the server answers 503 (with `Retry-After`) twice, then serves",
        "no error: it waits as asked and the build completes",
        _faults("test_a_source_answering_503_twice_then_serving_builds"),
    ),
    Fault(
        "the connection is reset mid-body",
        "no error: the download resumes where it broke (HTTP Range)",
        ("test_download::test_a_connection_reset_mid_body_is_resumed_with_range",),
    ),
    Fault(
        "the server refuses connections",
        "`magnetic_anomaly: http://127.0.0.1:9/ASE_…_250m.tif: gave up after 3 attempts: cannot "
        "connect: [Errno 111] Connection refused` (about 3 s)",
        _faults("test_a_refused_connection_gives_up_in_bounded_time_naming_the_url"),
    ),
    Fault(
        "the server stalls mid-body",
        "`geothermal_heat_flow_300km: http://…/300km_GHF_windowCenters.nc: gave up after 3 "
        "attempts: the server sent no data for 30 s`",
        (f"{BAD_SOURCE}[server stalls mid-body]",),
    ),
    Fault(
        "the server trickles bytes",
        "`…: gave up after 3600 s, the deadline of 3600 s (POLAR_CUBE_DOWNLOAD_DEADLINE_SECONDS): "
        "still receiving, 12000 bytes in 3600 s (a trickle)`",
        ("test_download::test_a_trickling_server_is_given_up_at_the_deadline_naming_url_and_time",),
    ),
    # --- the environment -------------------------------------------------------------------
    Fault(
        "the disk fills up",
        "`/data/out/polar-100m-1x2048x2048-v1.1.0.zarr: cannot write: no space left on device "
        "(the disk is full)`",
        _faults("test_a_full_disk_names_the_target_and_a_rerun_with_space_completes"),
    ),
    Fault(
        "the S3 keys are wrong",
        "`s3://polar-cube: access denied: the AwsCredentials block's keys were refused by "
        "http://127.0.0.1:8333`",
        ("test_cube_flow::test_wrong_credentials_are_refused_clearly",),
    ),
    Fault(
        "a byte of a published chunk flips (at rest)",
        "`polar-cube verify --deep` (exit 2) names it: `magnetic_anomaly: chunk 0.0 damaged "
        "(sha256 54679c1e605a ≠ manifest 1d84b7fff061): "
        "s3://polar-cube/polar-3km-1x2048x2048-v1.1.0.zarr/magnetic_anomaly/0.0`; `polar-cube "
        "repair` recomputes that chunk from its source and the version is again what the clean "
        "build wrote",
        (
            "test_repair::test_a_flipped_byte_in_a_folder_is_named_and_repaired_from_the_cache",
            "test_repair::test_a_flipped_byte_in_seaweedfs_is_named_and_repaired_downloading_again",
        ),
    ),
    Fault(
        "a chunk of the new version is damaged before it is published",
        "deep verification (scheduled runs; `build --deep-verify`) names each chunk, nothing is "
        "published, and the next run rebuilds that source",
        (
            "test_integrity::"
            "test_a_draft_failing_deep_verification_names_each_chunk_and_is_rebuilt_next",
        ),
    ),
    Fault(
        "another build is writing the same target",
        "`/data/cube is being built by pid 4242 on HOST (\\`polar-cube build …\\`, since "
        "2026-11-26T01:02:03Z); wait for it to finish (its lock /data/cube/.polar-cube-lock is "
        "released at its end, or expires 120 s after that build stops)`",
        _faults("test_two_builds_into_one_target_one_refuses_naming_the_holder"),
    ),
    Fault(
        "a spec or patch attribute makes the metadata worse than the published version's",
        "`/data/cube/polar-100m-1x2048x2048-v1.1.1.zarr: its metadata is worse than "
        "/data/cube/polar-100m-1x2048x2048-v1.1.0.zarr: 1 finding(s): cf:1.10 error: §3.3 "
        "Standard Name: standard_name land_ice_thicknes is not defined in Standard Name Table "
        "v93. Possible close match(es): ['land_ice_thickness', 'sea_ice_thickness', "
        "'floating_ice_thickness']; fix the spec or patch.yaml; nothing was published` (at the "
        "`metadata` phase: the staged version is unmarked, `latest` unchanged)",
        ("test_metadata::test_a_broken_spec_attribute_fails_the_gate_and_nothing_is_published",),
    ),
    # --- kills -----------------------------------------------------------------------------
    Fault(
        "SIGKILL of the build, downloading",
        f"{KILLED_RERUN} (the download resumes with Range)",
        (f"{KILL}[the flow process, downloading]",),
    ),
    Fault(
        "SIGKILL of the build, resampling and uploading chunks",
        KILLED_RERUN,
        (f"{KILL}[the flow process, resampling and uploading]",),
    ),
    Fault("SIGKILL of the build, merging", KILLED_RERUN, (f"{KILL}[the flow process, merging]",)),
    Fault(
        "SIGKILL of the build, publishing",
        f"{KILLED_RERUN}; `latest` names the old version or the new one, whole",
        (
            f"{KILL}[the flow process, publishing]",
            "test_publish_kill::"
            "test_a_publish_killed_at_any_moment_leaves_latest_at_the_old_or_the_new_version",
        ),
    ),
    Fault(
        "the S3 server dies, chunks being uploaded",
        "`s3://polar-cube/polar-100m-1x2048x2048-v1.1.0.zarr: cannot reach S3 endpoint "
        "http://127.0.0.1:8333 (is the server running? \\`polar-cube s3 start\\`)`; once it is "
        "back, a rerun resumes and equals a clean build",
        (f"{KILL}[the S3 server, resampling and uploading]",),
    ),
    Fault(
        "the S3 server dies, merging or publishing",
        "the same line; nothing partial is published; once it is back, a rerun equals a clean "
        "build",
        (f"{KILL}[the S3 server, merging]", f"{KILL}[the S3 server, publishing]"),
    ),
    Fault(
        "a dask worker is killed (`--dask local` or a cluster)",
        "no error: its tasks go to another worker (a new one is started) and the build completes",
        (f"{KILL}[a dask worker, resampling and uploading]",),
    ),
    Fault(
        "SIGKILL of the Prefect worker, its run uploading chunks",
        "the flow run ends with it, Crashed in the Prefect UI, nothing published; with the "
        "worker started again, the next run resumes the draft and equals a clean build",
        (
            "test_kill_matrix::"
            "test_a_prefect_worker_killed_while_its_run_uploads_crashes_the_run_and_a_new_run_"
            "resumes",
        ),
    ),
    Fault(
        "SIGKILL of an Icechunk commit",
        "the repository's `main` is the old version or the new one, whole; earlier tags are "
        "untouched",
        ("test_icechunk_build::test_a_commit_killed_at_any_moment_leaves_a_whole_version",),
    ),
    Fault(
        "SIGTERM or Ctrl-C",
        "`polar-cube: stopped by SIGTERM; rerun the same command to resume` (exit 143, 130 for "
        "Ctrl-C), no process of the build left running",
        (
            "test_stops::test_stop_signal_ends_the_build_within_5_s_leaving_nothing_running",
            "test_stops::test_sigkill_leaves_no_temporary_server_and_a_rerun_completes",
        ),
    ),
    # --- secrets ---------------------------------------------------------------------------
    Fault(
        "a build runs with S3 keys",
        "the secret is in no command line, output, log, artifact, flow-run parameter, cube "
        "attribute or STAC item, nor in the Prefect API's JSON; every server listens on "
        "127.0.0.1",
        (
            "test_secrets::test_the_secret_is_in_no_command_line_and_no_output",
            "test_secrets::test_every_server_listens_on_localhost_only",
            "test_secrets::test_the_secret_is_nowhere_in_the_prefect_api",
            "test_secrets::test_the_secret_is_in_no_metadata_of_the_bucket",
        ),
    ),
)


def readme_table() -> list[tuple[str, str]]:
    """The rows of the README's "What happens when …" table: (when, outcome)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## What happens when …", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].startswith("| when …") and set(rows[1]) <= set("|- ")
    cells = [re.split(r"(?<!\\)\|", row.strip().strip("|")) for row in rows[2:]]
    return [(when.strip(), outcome.strip()) for when, outcome in cells]


def test_the_readme_table_is_the_matrix_case_for_case():
    assert readme_table() == [(fault.when, fault.outcome) for fault in MATRIX]


def test_the_readme_counts_the_cases():
    cases = sum(len(fault.tests) for fault in MATRIX)
    text = (REPO / "README.md").read_text()
    assert f"{len(MATRIX)} faults, {cases} injected cases" in text


@pytest.mark.parametrize("fault", MATRIX, ids=[fault.when for fault in MATRIX])
def test_every_case_is_injected_by_a_test_that_exists(fault):
    for test in fault.tests:
        module_name, function_name = test.split("::")
        function_name, _, case = function_name.partition("[")
        module = importlib.import_module(f"tests.{module_name}")
        function = getattr(module, function_name, None)
        assert callable(function), f"{test}: no such test"
        if case:
            cases = [
                value
                for mark in getattr(function, "pytestmark", [])
                if mark.name == "parametrize"
                for value in mark.args[1]
            ]
            assert case.removesuffix("]") in cases, f"{test}: no such case (has: {cases})"
