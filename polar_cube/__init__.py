"""polar-datacube: builds the DeepESDL Polar Data Cube. Plain functions; Prefect lives in
`tasks/` and `flows/`. Importing it changes nothing in the environment."""
