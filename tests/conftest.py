"""Settings every test folder shares, applied before any test module is collected.

Triton picks interpreter or compiled mode when `triton.language` is first imported, and any test
folder may import it first (through torch or diffusers). On a CPU machine the kernels need the
interpreter; on a GPU machine run `TRITON_INTERPRET=0 pytest tests/kernels` to compile them for real.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
