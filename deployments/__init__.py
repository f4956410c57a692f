"""Scheduled builds on a Prefect server: the server, a worker, the work pool, the
deployment and its runs (`operate`). `prefect.yaml` next to it is the same deployment for
`prefect deploy`. Lives in the top-level `deployments/` folder, installed as
`polar_cube.deployments`."""
