"""The order in which `--dist loadfile` hands the test modules to the workers: longest first.

pytest-xdist hands out whole modules in the order of their number of tests, most first, so
modules with one or two long tests (the fresh install, the demo, the publish kill) went
last and one worker idled while the other ran them (~1 min of a full run). Handed out
longest first, with the short modules last to fill the gaps, both workers stay busy to the
end. Only the order changes: every module still runs whole on one worker, each module's tests
in their own order.

SECONDS: a module's tests (their fixtures included) in a full run on two workers
(`--durations=0`, summed by file). A module not listed counts as UNLISTED_SECONDS: new
modules are mostly end-to-end ones, handed out mid-way rather than last.
"""

from __future__ import annotations

import pytest

SECONDS = {
    "test_faults.py": 420,
    "test_kill_matrix.py": 380,  # 9 SIGKILLs, each with its rerun
    "test_deployment.py": 215,  # with the README's scheduled-builds run (a session fixture)
    "test_cube_flow.py": 165,
    "test_install.py": 115,
    "test_view.py": 92,
    "test_open_without_prefect.py": 125,
    "test_stops.py": 90,
    "test_metadata.py": 33,  # a 3000 m build, and one with a broken spec stopped by its gate
    "test_versions_cli.py": 80,  # 13 commands loading a Prefect block each
    "test_zarr3_build.py": 28,
    "test_icechunk_build.py": 54,
    "test_home_untouched.py": 70,
    "test_cluster.py": 64,
    "test_icechunk.py": 50,
    "test_secrets.py": 57,
    "test_repair.py": 115,  # two 3 km builds (a folder, SeaweedFS), each damaged and repaired
    "test_publish_kill.py": 56,
    "test_s3.py": 40,
    "test_snippets.py": 38,
    "test_cli.py": 32,
    "test_build_flow.py": 28,
    "test_download.py": 26,
    "test_cf.py": 18,
    "test_fault_matrix.py": 8,
    "test_cube_core.py": 14,
    "test_quicklook.py": 13,
    "test_levels.py": 13,
    "test_merge.py": 7,
    "test_integrity.py": 5,
    "test_archives.py": 7,
    "test_style.py": 6,
    "test_verify.py": 5,
    "test_writing_pass.py": 5,
    "test_target_lock.py": 3,
    "test_reprojection.py": 3,
    "test_resample.py": 3,
    "test_rasterize.py": 2,
    "test_stac.py": 2,
    "test_source_bucket.py": 2,
    "test_add_source.py": 2,
    "test_standins.py": 2,
    "test_zarr3_shards.py": 1,
    "test_mirror.py": 1,
    "test_dependencies.py": 1,
    "test_zarr_store.py": 1,
    "test_readers.py": 1,
    "test_architecture.py": 1,
    "test_versions.py": 0.5,
    "test_stac_schemas.py": 0.5,
    "test_source_checks.py": 0.5,
    "test_spec.py": 0.5,
    "test_summary.py": 0.5,
    "test_s3server.py": 0.5,
}
UNLISTED_SECONDS = 30


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's: by count of tests
        config.option.loadscopereorder = False  # the collection's order, set below


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules longest first; the order of the tests in a module as collected."""
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], index)

    def key(item: pytest.Item) -> tuple[float, int]:
        module = item.nodeid.split("::")[0]
        return -SECONDS.get(module.rsplit("/", 1)[-1], UNLISTED_SECONDS), first[module]

    items.sort(key=key)
