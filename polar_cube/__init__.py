"""polar-datacube: builds the DeepESDL Polar Data Cube. This folder is the library: plain
functions, no Prefect. Importing it changes nothing in the environment.

- `polar_cube.sources`: download, archives, readers, checks, staging, stand-ins and mirror
- the core: `spec`, `grid`, `resample`, `rasterize`, `dataset`, `zarr_store`, `levels`, ...
- `polar_cube.cube`: merge, patch, verify, publish, report, STAC
- `polar_cube.servers`: the local SeaweedFS and xcube viewer

The Prefect layer installs under the same name from the repository's top-level folders:
`tasks/` (polar_cube.tasks), `flows/` (polar_cube.flows), `deployments/`
(polar_cube.deployments) and `cli/` (polar_cube.cli, the `polar-cube` command).
"""
