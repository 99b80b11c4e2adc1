"""flashstep kernels: attention on a chosen backend, fused NASA attention, and a UNet installer.

    from kernels import attention, nasa_attention, install_attention_backend, resolve_backend

Backends (`AttentionBackend`): `sdpa` (default), `triton` (kernels/triton_attention.py and
kernels/triton_nasa.py; on the CPU with TRITON_INTERPRET=1), `xformers`, `math` (reference).
Choose with `backend=`, the `attention_backend(...)` context manager, or $FLASHSTEP_ATTN_BACKEND;
an unavailable choice falls back to sdpa with one WARNING on the `flashstep.kernels` logger.

Importing this package loads neither triton, xformers nor diffusers; they load on first use.
"""

from kernels.backends import AttentionBackend, attention_backend, resolve_backend
from kernels.dispatch import attention, nasa_attention
from kernels.processors import FlashstepAttnProcessor, install_attention_backend

__all__ = [
    "AttentionBackend",
    "FlashstepAttnProcessor",
    "attention",
    "attention_backend",
    "install_attention_backend",
    "nasa_attention",
    "resolve_backend",
]
