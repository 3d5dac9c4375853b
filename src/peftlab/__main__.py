"""`python -m peftlab ...` runs the command line, as `peftlab ...` does."""

import sys

from peftlab.cli import main

sys.exit(main())
