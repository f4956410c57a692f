"""The benchmark: `python -m bench --runs N --out FILE` (see bench/README.md)."""
