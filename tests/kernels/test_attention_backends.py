"""Backend registry: every backend agrees with the reference, the setting picks one, fallbacks warn."""

import logging
import subprocess
import sys

import pytest
import torch
from kernel_testing import INTERPRETED, needs_triton_device, random_qkv

import flashstep.kernels.backends as backends
import flashstep.kernels.dispatch as dispatch
from flashstep.kernels.backends import AttentionBackend, attention_backend, resolve_backend
from flashstep.kernels.dispatch import attention

LOGGER = "flashstep.kernels"


@pytest.fixture(autouse=True)
def no_env_choice(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def warnings_from(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def counting_impl(monkeypatch, backend: AttentionBackend) -> list[int]:
    """Wrap (not replace) `backend`'s implementation so a test can see that it really ran."""
    calls: list[int] = []
    real = dispatch.ATTENTION_IMPLS[backend]

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setitem(dispatch.ATTENTION_IMPLS, backend, counted)
    return calls


def test_every_backend_has_requirements_input_checks_and_an_implementation():
    for backend in AttentionBackend:
        assert backend in backends.REQUIREMENTS
        assert backend in backends.INPUT_CHECKS
        assert backend in dispatch.ATTENTION_IMPLS


def test_importing_kernels_loads_neither_triton_xformers_nor_diffusers():
    code = "import sys, kernels; print(sorted(m for m in ('triton', 'xformers', 'diffusers') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("backend", ["sdpa", "math", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_available_backends_agree_with_float64_reference(backend, dtype, monkeypatch):
    if resolve_backend(backend) is not AttentionBackend(backend):
        pytest.skip(f"{backend} unavailable here: {backends.unmet_requirements(AttentionBackend(backend))}")
    q, k, v = random_qkv(2, 3, 21, 13, 16, dtype=dtype)
    ref = attention(q.double(), k.double(), v.double(), backend="math")
    calls = counting_impl(monkeypatch, AttentionBackend(backend))
    out = attention(q, k, v, backend=backend)
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    assert calls == [1] and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_default_backend_is_sdpa():
    assert resolve_backend() is AttentionBackend.SDPA


def test_env_var_picks_backend_and_explicit_argument_wins(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "MATH")
    assert resolve_backend() is AttentionBackend.MATH
    assert resolve_backend("sdpa") is AttentionBackend.SDPA
    calls = counting_impl(monkeypatch, AttentionBackend.MATH)
    q, k, v = random_qkv(1, 1, 3, 3, 8, dtype=torch.float32)
    attention(q, k, v)
    assert calls == [1]


def test_context_manager_picks_backend_and_restores(monkeypatch):
    calls = counting_impl(monkeypatch, AttentionBackend.MATH)
    q, k, v = random_qkv(1, 1, 3, 3, 8, dtype=torch.float32)
    with attention_backend("math") as active:
        assert active is AttentionBackend.MATH
        assert resolve_backend() is AttentionBackend.MATH
        attention(q, k, v)
    assert calls == [1]
    assert resolve_backend() is AttentionBackend.SDPA
    attention(q, k, v)
    assert calls == [1]


def test_unknown_backend_names_are_errors_not_fallbacks(monkeypatch):
    with pytest.raises(
        ValueError, match=r"`backend` must be one of 'sdpa', 'triton', 'xformers', 'math' but is 'flash'"
    ):
        resolve_backend("flash")
    monkeypatch.setenv(backends.ENV_VAR, "tritn")
    with pytest.raises(ValueError, match=r"`FLASHSTEP_ATTN_BACKEND` must be one of .* but is 'tritn'"):
        resolve_backend()


@pytest.mark.skipif(
    backends.xformers_importable() and torch.cuda.is_available(), reason="xformers is usable here"
)
def test_unavailable_xformers_falls_back_to_sdpa_with_one_warning(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert resolve_backend("xformers") is AttentionBackend.SDPA
    (record,) = warnings_from(caplog)
    message = record.getMessage()
    assert "requested=xformers" in message and "falling back to sdpa" in message
    assert "xformers_importable" in message or "cuda_available" in message


@pytest.mark.skipif(
    backends.xformers_importable() and torch.cuda.is_available(), reason="xformers is usable here"
)
def test_unavailable_backend_from_env_var_says_where_it_came_from(caplog, monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "xformers")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_backend() is AttentionBackend.SDPA
    (record,) = warnings_from(caplog)
    assert "source=FLASHSTEP_ATTN_BACKEND" in record.getMessage()


@pytest.mark.skipif(not INTERPRETED, reason="checks the CPU interpreter path")
def test_triton_resolves_on_cpu_under_the_interpreter(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_backend("triton") is AttentionBackend.TRITON
    assert warnings_from(caplog) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA makes triton runnable without the interpreter")
def test_triton_without_cuda_or_interpreter_falls_back(caplog, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_backend("triton") is AttentionBackend.SDPA
    (record,) = warnings_from(caplog)
    assert "failed_checks=cuda_or_triton_interpreter" in record.getMessage()


def test_triton_import_failure_is_a_failed_check_not_a_crash(caplog, monkeypatch):
    backends.triton_importable.cache_clear()
    for module in ("triton", "flashstep.kernels.triton_attention", "flashstep.kernels.triton_nasa"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert resolve_backend("triton") is AttentionBackend.SDPA
    finally:
        backends.triton_importable.cache_clear()
    (record,) = warnings_from(caplog)
    assert "triton_importable" in record.getMessage()


@needs_triton_device
def test_inputs_a_backend_cannot_take_fall_back_to_sdpa_with_one_warning(caplog, monkeypatch):
    monkeypatch.setattr(backends, "_warned_inputs", set())
    sdpa_calls = counting_impl(monkeypatch, AttentionBackend.SDPA)
    q, k, v = random_qkv(1, 2, 5, 6, 8, dtype=torch.float64)  # no Triton kernel takes float64
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = attention(q, k, v, backend="triton")
        attention(q, k, v, backend="triton")
    assert sdpa_calls == [1, 1]
    torch.testing.assert_close(first, attention(q, k, v, backend="math"))
    (record,) = warnings_from(caplog)
    assert (
        "backend=triton" in record.getMessage()
        and "dtype_in(float16, bfloat16, float32)" in record.getMessage()
    )


def test_attention_rejects_mismatched_layouts_naming_the_argument():
    q, k, v = random_qkv(1, 2, 5, 6, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"`v` has dtype torch.float64 but `q` has torch.float32"):
        attention(q, k, v.double())
    with pytest.raises(ValueError, match=r"`k` must be 4-D \(B, H, L, D\) but has shape \(2, 6, 8\)"):
        attention(q, k[0], v)
