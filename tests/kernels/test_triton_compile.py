"""The Triton kernels compile ahead of time for real GPUs (sm_80, sm_90), no GPU needed.

The interpreter tests check the arithmetic; this checks what only the compiler sees (constexpr
branches, tl.dot operand shapes, register/shared-memory fit) through Triton's own bundled ptxas.
It runs in a subprocess because this test process decorated the kernels for the interpreter.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_MEMORY_BYTES = {80: 163 * 1024, 90: 227 * 1024}  # per-block maximum, A100 / H100

# (kernel, dtype, head dim, BLOCK_M, BLOCK_N, num_warps, num_stages, EVEN_N, sm): the SD1.5 head dims
# with the autotune configs that prune_configs keeps for them, plus the toy model's small dims.
CASES = [
    ("attn", "fp16", 40, 128, 64, 8, 3, False, 90),
    ("attn", "fp16", 160, 64, 64, 8, 2, True, 90),
    ("attn", "bf16", 80, 64, 32, 4, 4, False, 80),
    ("attn", "fp32", 8, 32, 64, 4, 3, False, 90),
    ("nasa", "fp16", 40, 128, 64, 8, 3, True, 90),
    ("nasa", "bf16", 160, 64, 64, 8, 2, False, 80),
]

COMPILE_SCRIPT = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashstep.kernels import triton_attention, triton_nasa

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
POINTERS = {"Q", "K", "V", "Out", "KP", "VP", "KN", "VN"}
results = []
for kernel, dtype, head_dim, bm, bn, warps, stages, even_n, sm in json.loads(sys.argv[1]):
    fn = triton_nasa._nasa_fwd if kernel == "nasa" else triton_attention._attn_fwd
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap autotune and heuristics
        fn = fn.fn
    signature = {}
    for name in fn.arg_names:
        if name in POINTERS:
            signature[name] = "*" + dtype
        elif name in ("qk_scale", "alpha"):
            signature[name] = "fp32"
        elif name.isupper() and name not in ("H", "LQ", "LK", "LK_POS", "LK_NEG", "LQ_BUCKET", "LK_BUCKET"):
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
    constexprs = {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": triton_attention.padded_head_dim(head_dim),
        "INPUT_PRECISION": triton_attention.dot_precision(DTYPES[dtype]),
        "BLOCK_M": bm,
        "BLOCK_N": bn,
    }
    constexprs |= {"EVEN_N_POS": even_n, "EVEN_N_NEG": not even_n} if kernel == "nasa" else {"EVEN_N": even_n}
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", sm, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    estimate = triton_attention.shared_memory_estimate(config, constexprs["HEAD_DIM_PAD"], DTYPES[dtype].itemsize)
    results.append({"shared": compiled.metadata.shared, "estimate": estimate, "has_cubin": bool(compiled.asm.get("cubin"))})
print(json.dumps(results))
"""


needs_nvidia_backend = pytest.mark.skipif(
    importlib.util.find_spec("triton.backends.nvidia") is None, reason="this triton has no NVIDIA backend"
)


def compile_cases(cases: list[tuple]) -> list[dict]:
    """Compile each case in a fresh interpreter (this one decorated the kernels for the interpreter)."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "TRITON_DEFAULT_FP_FUSION": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, json.dumps(cases)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@needs_nvidia_backend
def test_kernels_compile_for_sm80_and_sm90_within_shared_memory():
    for case, result in zip(CASES, compile_cases(CASES), strict=True):
        assert result["has_cubin"], case
        assert 0 < result["shared"] <= SHARED_MEMORY_BYTES[case[-1]], (case, result)


def kept_configs(dtype: str, head_dim_pad: int, lq_bucket: int, lk_bucket: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of every config the autotuner may launch for a shape."""
    import torch

    from flashstep.kernels import triton_attention

    element_size = {"fp16": 2, "bf16": 2, "fp32": 4}[dtype]
    q = torch.empty(0, dtype={"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    assert q.element_size() == element_size
    configs = triton_attention.prune_configs(
        triton_attention.autotune_configs_for_gpu(),
        {"Q": q, "LQ_BUCKET": lq_bucket, "LK_BUCKET": lk_bucket},
        HEAD_DIM_PAD=head_dim_pad,
    )
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs]


@pytest.mark.slow
@needs_nvidia_backend
def test_every_float32_config_the_autotuner_may_launch_fits_shared_memory():
    """float32 tiles are the widest: an H200 refused a float32 config at head dim 160 (303,232 bytes of
    shared memory against 232,448). Pruning now drops configs whose estimate exceeds the budget; the
    compiler must agree with the estimate for every float32 config left (head dims 80 and 160, both
    kernels, sm90 and sm80) and for the largest half-precision one. (A sweep of every kept config,
    all dtypes, took under three minutes and found no half-precision config above its estimate.)"""
    from flashstep.kernels.triton_attention import SHARED_MEMORY_BUDGET

    cases = [("attn", "fp32", hd, *c, False, 90) for hd, pad in ((80, 128), (160, 256)) for c in kept_configs("fp32", pad, 4096, 4096)]
    cases += [("nasa", "fp32", 160, *c, True, 90) for c in kept_configs("fp32", 256, 4096, 128)]
    cases += [("attn", "fp32", 160, *c, False, 80) for c in kept_configs("fp32", 256, 4096, 128)]
    cases += [("attn", "fp16", 160, *kept_configs("fp16", 256, 4096, 4096)[0], True, 90)]
    for case, result in zip(cases, compile_cases(cases), strict=True):
        assert result["has_cubin"], case
        assert result["estimate"] <= SHARED_MEMORY_BUDGET <= SHARED_MEMORY_BYTES[80], (case, result)
        assert 0 < result["shared"] <= result["estimate"], (case, result)
