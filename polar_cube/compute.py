"""Where the chunked array work runs: in-process threads (default), a LocalCluster sized
for this machine (`local`), or a dask.distributed cluster given by its address."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask

LOCAL = "local"


def shares_nothing(address: str | None) -> bool:
    """A cluster given by address: its workers may share nothing with this machine but the
    bucket (no cache, no per-dataset folder)."""
    return bool(address) and address != LOCAL


def local_cluster_size() -> tuple[int, int]:
    """(workers, memory limit per worker in bytes): one worker per core, 3/4 of RAM shared."""
    import psutil

    workers = max(1, os.cpu_count() or 1)
    return workers, int(psutil.virtual_memory().total * 0.75 / workers)


@contextmanager
def dask_cluster(address: str | None) -> Iterator[str | None]:
    """Yield the scheduler address to use: None (threads), the given one, or a LocalCluster's."""
    if address != LOCAL:
        yield address
        return
    from distributed import LocalCluster

    workers, memory = local_cluster_size()
    with LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        memory_limit=memory,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        yield cluster.scheduler_address


@contextmanager
def dask_compute(address: str | None) -> Iterator[None]:
    """Run the dask computations inside on the cluster at `address`, else on local threads."""
    if not address:
        with dask.config.set(scheduler="threads"):
            yield
        return
    from distributed import Client

    with Client(address, set_as_default=False) as client, dask.config.set(scheduler=client):
        yield
