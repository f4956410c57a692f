"""The merged cube: merge the per-dataset cubes, patch its metadata, verify, publish it (and
its levels, report, quicklooks and STAC) into the target, upload per-dataset cubes."""
