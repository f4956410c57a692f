"""polar-datacube: builds the DeepESDL Polar Data Cube. Plain functions; Prefect lives in
`tasks/` and `flows/`."""

import os

# Prefect reads these when first used: its ephemeral API needs longer than its 20 s default
# on a first start (database migrations), and must not phone home.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
