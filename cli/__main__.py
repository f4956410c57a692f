import sys

from polar_cube.cli.app import main

sys.exit(main())
