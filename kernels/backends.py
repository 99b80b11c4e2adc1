"""Attention backends: an enum, the named capability checks each needs, and setting -> backend.

In the spirit of diffusers' `attention_dispatch.py`: backends are enum members; each has
environment requirements (checked once when a backend is resolved) and input checks (checked per
call on the query tensor). A backend is chosen, strongest first, by an explicit `backend=` argument,
the `attention_backend(...)` context manager, the `FLASHSTEP_ATTN_BACKEND` environment variable, or
the default `sdpa`. A choice whose requirements fail falls back to `sdpa` with one WARNING line on
the `flashstep.kernels` logger naming the failed checks; an unknown name is an error.

Nothing here imports triton or xformers at module import: the checks import them on first use.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from enum import StrEnum

import torch
import torch.nn.functional as F

logger = logging.getLogger("flashstep.kernels")

ENV_VAR = "FLASHSTEP_ATTN_BACKEND"


class AttentionBackend(StrEnum):
    """Attention implementations that `dispatch.attention` can dispatch to."""

    SDPA = "sdpa"  # torch.nn.functional.scaled_dot_product_attention (default)
    TRITON = "triton"  # kernels.triton_attention / kernels.triton_nasa
    XFORMERS = "xformers"  # xformers.ops.memory_efficient_attention
    MATH = "math"  # plain fp32 matmul-softmax-matmul reference


DEFAULT_BACKEND = AttentionBackend.SDPA

# ----- environment requirements: () -> bool, checked when a backend is resolved -----


def cuda_available() -> bool:
    """A CUDA device is visible to torch."""
    return torch.cuda.is_available()


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET is set (Triton's own truthy spellings), so kernels run on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes", "y"}


def cuda_or_triton_interpreter() -> bool:
    """Triton kernels have somewhere to run: a CUDA device or the CPU interpreter."""
    return cuda_available() or triton_interpreter_enabled()


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except (ImportError, OSError, RuntimeError, AttributeError) as exc:
        # A broken install (missing shared library, version skew) counts as absent; say why at DEBUG.
        logger.debug("capability probe: import %s failed: %s: %s", module, type(exc).__name__, exc)
        return False
    return True


@functools.cache
def triton_importable() -> bool:
    """triton imports and flashstep's Triton kernel modules load against it."""
    return (
        _importable("triton")
        and _importable("flashstep.kernels.triton_attention")
        and _importable("flashstep.kernels.triton_nasa")
    )


@functools.cache
def xformers_importable() -> bool:
    """xformers.ops imports."""
    return _importable("xformers.ops")


@functools.cache
def xformers_kernels_run() -> bool:
    """xformers' attention runs one tiny float16 call on this CUDA device.

    A wheel built for another torch/CUDA imports cleanly but ships no kernels ("xFormers wasn't
    built with CUDA support"); seen on an H200 with xformers 0.0.35 under torch 2.11+cu130. Only a
    call tells the two apart, so the probe makes one (once per process) instead of failing mid-request.
    """
    if not (cuda_available() and xformers_importable()):
        return False
    import xformers.ops as xops

    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)  # (B, L, H, D): xformers' layout
    try:
        xops.memory_efficient_attention(q, q, q)
    except (NotImplementedError, RuntimeError, ValueError) as exc:
        logger.debug("capability probe: xformers attention failed: %s: %s", type(exc).__name__, exc)
        return False
    return True


def sdpa_available() -> bool:
    """torch has scaled_dot_product_attention (torch >= 2.0)."""
    return hasattr(F, "scaled_dot_product_attention")


REQUIREMENTS: dict[AttentionBackend, tuple[Callable[[], bool], ...]] = {
    AttentionBackend.SDPA: (sdpa_available,),
    AttentionBackend.MATH: (),
    AttentionBackend.TRITON: (triton_importable, cuda_or_triton_interpreter),
    AttentionBackend.XFORMERS: (xformers_importable, cuda_available, xformers_kernels_run),
}

# ----- input checks: (q) -> bool, checked per call -----

InputCheck = Callable[[torch.Tensor], bool]


def dtype_in(*dtypes: torch.dtype) -> InputCheck:
    """Input check: the query dtype is one of `dtypes`."""

    def check(q: torch.Tensor) -> bool:
        return q.dtype in dtypes

    check.__name__ = "dtype_in(" + ", ".join(str(d).removeprefix("torch.") for d in dtypes) + ")"
    return check


def head_dim_at_most(limit: int) -> InputCheck:
    """Input check: the head dim (last axis) is at most `limit`."""

    def check(q: torch.Tensor) -> bool:
        return q.shape[-1] <= limit

    check.__name__ = f"head_dim_at_most({limit})"
    return check


def dtype_floating(q: torch.Tensor) -> bool:
    """The query is a floating-point tensor."""
    return q.is_floating_point()


def on_cuda(q: torch.Tensor) -> bool:
    """The query lives on a CUDA device."""
    return q.device.type == "cuda"


def on_triton_device(q: torch.Tensor) -> bool:
    """The query is where Triton can run it: CUDA, or CPU with the interpreter on."""
    return q.device.type == "cuda" or (q.device.type == "cpu" and triton_interpreter_enabled())


def interpreter_dtype_ok(q: torch.Tensor) -> bool:
    """Not bfloat16 under the interpreter, whose tl.dot mistreats bf16 (see triton_attention)."""
    return not (q.dtype == torch.bfloat16 and triton_interpreter_enabled())


INPUT_CHECKS: dict[AttentionBackend, tuple[InputCheck, ...]] = {
    AttentionBackend.SDPA: (dtype_floating,),
    AttentionBackend.MATH: (dtype_floating,),
    AttentionBackend.TRITON: (
        dtype_in(torch.float16, torch.bfloat16, torch.float32),
        on_triton_device,
        interpreter_dtype_ok,
        head_dim_at_most(256),
    ),
    AttentionBackend.XFORMERS: (dtype_in(torch.float16, torch.bfloat16, torch.float32), on_cuda),
}


def unmet_requirements(backend: AttentionBackend) -> list[str]:
    """Names of the environment requirements `backend` fails here (empty when it can run)."""
    return [check.__name__ for check in REQUIREMENTS[backend] if not check()]


def unmet_input_checks(backend: AttentionBackend, q: torch.Tensor) -> list[str]:
    """Names of the input checks the query `q` fails for `backend` (empty when it can take it)."""
    return [check.__name__ for check in INPUT_CHECKS[backend] if not check(q)]


# ----- choosing a backend -----

_ACTIVE: contextvars.ContextVar[AttentionBackend | None] = contextvars.ContextVar(
    "flashstep_attention_backend", default=None
)


def parse_backend(name: str | AttentionBackend, *, source: str = "backend") -> AttentionBackend:
    """The enum member for `name` (case-insensitive); a ValueError naming `source` if unknown."""
    if isinstance(name, AttentionBackend):
        return name
    try:
        return AttentionBackend(str(name).strip().lower())
    except ValueError:
        allowed = ", ".join(repr(b.value) for b in AttentionBackend)
        raise ValueError(f"`{source}` must be one of {allowed} but is {name!r}") from None


def requested_backend(name: str | AttentionBackend | None = None) -> tuple[AttentionBackend, str]:
    """The backend asked for before capability checks, and where the request came from."""
    if name is not None:
        return parse_backend(name), "argument"
    active = _ACTIVE.get()
    if active is not None:
        return active, "context"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return parse_backend(env, source=ENV_VAR), ENV_VAR
    return DEFAULT_BACKEND, "default"


def resolve_backend(name: str | AttentionBackend | None = None) -> AttentionBackend:
    """The backend to use: `name`, else the active context, else $FLASHSTEP_ATTN_BACKEND, else sdpa.

    Applies the backend's requirement checks; when one fails, logs exactly one WARNING on
    `flashstep.kernels` naming the failed checks and returns `AttentionBackend.SDPA`.
    Raises ValueError for a name that is not a backend.
    """
    return _check_requirements(*requested_backend(name))


def _check_requirements(backend: AttentionBackend, source: str) -> AttentionBackend:
    failed = unmet_requirements(backend)
    if not failed:
        return backend
    logger.warning(
        "attention backend unavailable: requested=%s source=%s failed_checks=%s; falling back to %s",
        backend.value,
        source,
        ",".join(failed),
        DEFAULT_BACKEND.value,
    )
    return DEFAULT_BACKEND


_check_requirements_once = functools.cache(_check_requirements)


def backend_for_call(name: str | AttentionBackend | None = None) -> AttentionBackend:
    """`resolve_backend` for the hot path: each (backend, source) is checked and warned about once."""
    backend, source = requested_backend(name)
    if source == "context":
        return backend  # resolved when the context was entered
    return _check_requirements_once(backend, source)


_warned_inputs: set[tuple[AttentionBackend, str, torch.dtype, str]] = set()


def backend_for_inputs(backend: AttentionBackend, q: torch.Tensor) -> AttentionBackend:
    """`backend` if it takes `q`, else sdpa with one WARNING per (backend, failed checks, dtype, device)."""
    failed = unmet_input_checks(backend, q)
    if not failed:
        return backend
    key = (backend, ",".join(failed), q.dtype, q.device.type)
    if key not in _warned_inputs:
        _warned_inputs.add(key)
        logger.warning(
            "attention backend cannot take these inputs: backend=%s failed_checks=%s dtype=%s device=%s; "
            "falling back to %s",
            backend.value,
            key[1],
            str(q.dtype).removeprefix("torch."),
            q.device.type,
            DEFAULT_BACKEND.value,
        )
    return DEFAULT_BACKEND


@contextlib.contextmanager
def attention_backend(name: str | AttentionBackend) -> Iterator[AttentionBackend]:
    """Use backend `name` for `dispatch.attention` calls without `backend=` inside this block.

    Resolved (and warned about) once on entry; yields the backend in effect. Scoped with a
    ContextVar, so it holds for this thread/task only.
    """
    token = _ACTIVE.set(resolve_backend(name))
    try:
        yield _ACTIVE.get()
    finally:
        _ACTIVE.reset(token)
