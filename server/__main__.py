"""`python -m flashstep.server`: the same as `flashstep serve`."""

import sys

from flashstep.server.serve import serve_main

sys.exit(serve_main())
