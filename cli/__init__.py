"""The `polar-cube` command: thin argparse commands over the flows (`polar_cube.flows`), the
Prefect operations (`polar_cube.deployments`) and the local servers (`polar_cube.servers`).

Lives in the repository's top-level `cli/` folder, installed as `polar_cube.cli`.
"""

from polar_cube.cli.app import main

__all__ = ["main"]
