"""Where the chunked array work runs: in-process threads (default), a LocalCluster sized
for this machine (`local`), or a dask.distributed cluster given by its address."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import dask

LOCAL = "local"
# glibc malloc: blocks up to this size come from the heap, freed memory up to this much is
# kept (instead of an mmap, page faults and an munmap for every chunk-sized buffer)
MMAP_THRESHOLD_BYTES = 64 * 2**20
TRIM_THRESHOLD_BYTES = 256 * 2**20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


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


@functools.cache
def keep_freed_buffers() -> bool:
    """Let glibc's malloc reuse freed chunk-sized buffers (16 MB per 2048² float32 chunk)
    instead of returning each to the kernel and faulting a new one in: about a quarter less
    system time (on 2 cores 4.1 → 2.95 s on the 100 m magnetic layer, peak RSS within 10 %).
    Process-wide, once; False where there is no glibc (nothing changes then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def freeze_long_lived_objects() -> None:
    """Collect garbage once, then leave every object alive now (the modules and the Prefect,
    dask and xarray machinery: most of the heap) out of later collections. Else the cyclic
    GC rescans them at every full collection while the writing pass makes its many small
    task objects: about 3 s of one thread holding the GIL in a 100 m build. Objects frozen
    are still freed when no longer referenced; only cycles among them are kept."""
    gc.collect()
    gc.freeze()


@contextmanager
def dask_compute(address: str | None) -> Iterator[None]:
    """Run the dask computations inside on the cluster at `address`, else on local threads."""
    if not address:
        keep_freed_buffers()
        freeze_long_lived_objects()
        with dask.config.set(scheduler="threads"):
            yield
        return
    from distributed import Client

    with Client(address, set_as_default=False) as client, dask.config.set(scheduler=client):
        yield
