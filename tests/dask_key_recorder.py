"""A dask scheduler preload (`dask scheduler --preload <this file>`) for the cluster test:
appends every task key the scheduler sees, once, one per line, to the file named by the
environment variable KEYS_FILE_VARIABLE (so the test can look for secrets in task keys)."""

import os

from distributed.diagnostics.plugin import SchedulerPlugin

KEYS_FILE_VARIABLE = "POLAR_CUBE_TEST_DASK_KEYS_FILE"


class KeyRecorder(SchedulerPlugin):
    name = "polar-cube-key-recorder"

    def __init__(self, path: str):
        self.path = path
        self.seen: set = set()

    def _record(self, keys) -> None:
        new = [key for key in keys if key not in self.seen]
        if new:
            self.seen.update(new)
            with open(self.path, "a", encoding="utf-8") as file:
                file.writelines(f"{key}\n" for key in new)

    def update_graph(self, scheduler, *, keys, tasks, **kwargs) -> None:
        self._record([*tasks, *keys])

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        self._record([key])


def dask_setup(scheduler) -> None:
    scheduler.add_plugin(KeyRecorder(os.environ[KEYS_FILE_VARIABLE]))
