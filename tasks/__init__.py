"""Thin Prefect task wrappers around the plain functions in `polar_cube`."""
