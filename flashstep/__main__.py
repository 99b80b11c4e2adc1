"""`python -m flashstep`: the same command line as the `flashstep` script."""

import sys

from flashstep.cli import main

sys.exit(main())
