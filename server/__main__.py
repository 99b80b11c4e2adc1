"""`python -m server`: the same as `flashstep serve`."""

import sys

from server.serve import serve_main

sys.exit(serve_main())
