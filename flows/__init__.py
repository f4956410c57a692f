"""Prefect flows composing the tasks in `tasks`."""

import os

# Prefect reads these when first used: its ephemeral API needs longer than its 20 s default
# on a first start (database migrations), and must not phone home. Set here, in the Prefect
# layer (and by the command line), never by importing the `polar_cube` library.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
