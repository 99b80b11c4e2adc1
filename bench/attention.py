"""Attention kernel benchmark: TFLOP/s of flashstep's Triton kernels vs SDPA vs xformers, SD1.5 shapes.

    python -m flashstep.bench.attention          # table, bench/results/attention.json, bench/results/attention.png
    python -m flashstep.bench.attention --all    # first the kernel tests compiled on the GPU, then the benchmark
    bash bench/gpu_attention.sh        # the same as --all, under a time limit

Shapes are SD1.5's UNet at 512x512 (64x64 latents), 8 heads, float16, batch 1 and 8:
self-attention over 4096 / 1024 / 256 tokens with head dims 40 / 80 / 160, cross-attention from
the same queries to 77 text tokens, and NASA (positive and negative prompt, 77 tokens each): the
fused Triton kernel against two SDPA (and two xformers) calls and a subtraction.
Each contender's output is checked against SDPA (max abs error) before it is timed.
Without CUDA it says so and exits 0. The PNG needs matplotlib, which flashstep does not depend
on: without it the plot is skipped with a note and the JSON/table are still written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flashstep.bench.report import REPO_ROOT, RESULTS_DIR, git_info

HEADS = 8
TEXT_TOKENS = 77
# SD1.5 UNet levels at 64x64 latents: (tokens, head dim) = (64*64, 320/8), (32*32, 640/8), (16*16, 1280/8).
SD15_LEVELS = [(4096, 40), (1024, 80), (256, 160)]
BATCH_SIZES = (1, 8)
NASA_ALPHA = 0.1
KERNEL_TESTS_TIMEOUT_S = 300  # leaves the benchmark >= 3 of the 8 minutes a GPU check may take


@dataclass(frozen=True)
class Case:
    """One benchmarked shape; `len_k` is the key length of each branch (NASA has two of them)."""

    kind: str  # "self" | "cross" | "nasa"
    batch: int
    heads: int
    len_q: int
    len_k: int
    head_dim: int

    @property
    def name(self) -> str:
        return f"{self.kind} B{self.batch} Lq{self.len_q} Lk{self.len_k} D{self.head_dim}"

    def flops(self) -> float:
        """Useful FLOPs, head dim unpadded, softmax not counted (as FlashAttention papers report).

        Forward attention per (batch, head): S = Q K^T is Lq*Lk dot products of length D, 2*Lq*Lk*D
        FLOPs (a multiply and an add each); O = P V is another 2*Lq*Lk*D. In all:
            FLOPs = 4 * B * H * Lq * Lk * D
        NASA attends to Lk+ and Lk- keys: 4 * B * H * Lq * (Lk+ + Lk-) * D (the subtraction is noise).
        """
        branches = 2 if self.kind == "nasa" else 1
        return 4.0 * self.batch * self.heads * self.len_q * self.len_k * branches * self.head_dim


def sd15_cases() -> list[Case]:
    cases = []
    for batch in BATCH_SIZES:
        for tokens, head_dim in SD15_LEVELS:
            cases.append(Case("self", batch, HEADS, tokens, tokens, head_dim))
            cases.append(Case("cross", batch, HEADS, tokens, TEXT_TOKENS, head_dim))
            cases.append(Case("nasa", batch, HEADS, tokens, TEXT_TOKENS, head_dim))
    return cases


def xformers_or_none():
    """xformers.ops when its kernels run on this GPU (a wheel for another torch imports but has none)."""
    from flashstep.kernels.backends import xformers_kernels_run

    if not xformers_kernels_run():
        return None
    import xformers.ops as xops

    return xops


def contenders(case: Case, tensors: dict[str, torch.Tensor]) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> zero-argument callable producing the (B, H, Lq, D) output for this case."""
    from flashstep.kernels.triton_attention import flash_attention
    from flashstep.kernels.triton_nasa import nasa_flash_attention

    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    xops = xformers_or_none()

    def xformers_attention(k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        # xformers takes (B, L, H, D)
        return xops.memory_efficient_attention(
            q.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)
        ).transpose(1, 2)

    if case.kind != "nasa":
        runs = {
            "triton": lambda: flash_attention(q, k, v),
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        }
        if xops is not None:
            runs["xformers"] = lambda: xformers_attention(k, v)
        return runs
    kn, vn = tensors["k_neg"], tensors["v_neg"]
    runs = {
        "triton": lambda: nasa_flash_attention(q, k, v, kn, vn, NASA_ALPHA),
        "sdpa": lambda: (
            F.scaled_dot_product_attention(q, k, v) - NASA_ALPHA * F.scaled_dot_product_attention(q, kn, vn)
        ),
    }
    if xops is not None:
        runs["xformers"] = lambda: xformers_attention(k, v) - NASA_ALPHA * xformers_attention(kn, vn)
    return runs


def make_tensors(case: Case, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(length: int) -> torch.Tensor:
        return torch.randn(
            case.batch, case.heads, length, case.head_dim, generator=gen, device="cuda", dtype=dtype
        )

    tensors = {"q": randn(case.len_q), "k": randn(case.len_k), "v": randn(case.len_k)}
    if case.kind == "nasa":
        tensors |= {"k_neg": randn(case.len_k), "v_neg": randn(case.len_k)}
    return tensors


def run_case(case: Case, dtype: torch.dtype, warmup_ms: int, rep_ms: int) -> dict:
    """Check every contender against SDPA, then time it (median ms) and turn that into TFLOP/s."""
    from triton.testing import do_bench

    runs = contenders(case, make_tensors(case, dtype))
    reference = runs["sdpa"]().float()
    figures = {}
    for name, fn in runs.items():
        try:
            max_abs_err = (fn().float() - reference).abs().max().item()
        except Exception as exc:  # one contender's failure must not cost the others' figures
            figures[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"  {name} failed: {figures[name]['error']}", flush=True)
            continue
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        figures[name] = {
            "ms": ms,
            "tflops": case.flops() / (ms * 1e-3) / 1e12,
            "max_abs_err_vs_sdpa": max_abs_err,
        }
    return {"case": case.name, **asdict(case), "flops": case.flops(), "figures": figures}


def print_table(results: list[dict], names: list[str]) -> None:
    header = (
        f"{'case':<34}"
        + "".join(f"{n + ' TFLOP/s':>18}{n + ' ms':>12}" for n in names)
        + f"{'triton err':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in results:
        line = f"{row['case']:<34}"
        for n in names:
            fig = row["figures"].get(n)
            line += f"{fig['tflops']:>18.1f}{fig['ms']:>12.4f}" if fig and "ms" in fig else f"{'-':>18}{'-':>12}"
        err = row["figures"].get("triton", {}).get("max_abs_err_vs_sdpa")
        line += f"{err:>12.2e}" if err is not None else f"{'failed':>12}"
        print(line)


def machine() -> dict:
    import triton

    try:
        import xformers

        xformers_version = xformers.__version__
    except ImportError:
        xformers_version = None
    return {
        "gpu": torch.cuda.get_device_name(0),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "xformers": xformers_version,
    }


def plot(results: list[dict], names: list[str], path: Path) -> bool:
    """Grouped bars of TFLOP/s per case, one panel per batch size; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(len(BATCH_SIZES), 1, figsize=(12, 4 * len(BATCH_SIZES)), squeeze=False)
    width = 0.8 / len(names)
    for ax, batch in zip(axes[:, 0], BATCH_SIZES, strict=True):
        rows = [r for r in results if r["batch"] == batch]
        for i, name in enumerate(names):
            heights = [r["figures"].get(name, {}).get("tflops", 0.0) for r in rows]
            ax.bar([j + i * width for j in range(len(rows))], heights, width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
        ax.set_xticklabels(
            [r["case"].replace(f" B{batch}", "") for r in rows], rotation=30, ha="right", fontsize=8
        )
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"attention forward, float16, batch {batch}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_kernel_tests() -> int:
    """The kernel test suite with Triton compiled for the GPU (not the interpreter); returns pytest's rc."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", str(REPO_ROOT / "tests" / "kernels")]
    print("$ TRITON_INTERPRET=0 " + " ".join(cmd), flush=True)
    try:
        return subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=KERNEL_TESTS_TIMEOUT_S).returncode
    except subprocess.TimeoutExpired:
        print(f"kernel tests exceeded {KERNEL_TESTS_TIMEOUT_S} s and were stopped", flush=True)
        return 124


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="run the GPU kernel tests before the benchmark")
    parser.add_argument("--warmup-ms", type=int, default=25, help="milliseconds of untimed calls per shape (triton.testing.do_bench)")
    parser.add_argument("--rep-ms", type=int, default=100, help="milliseconds of timed calls per shape (triton.testing.do_bench)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "attention.json", help="JSON results file")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench.attention: no CUDA device here; the attention benchmark needs a GPU. Nothing measured.")
        return 0
    if os.environ.get("TRITON_INTERPRET", "").strip().lower() in {"1", "true", "on", "yes", "y"}:
        print(
            "bench.attention: TRITON_INTERPRET is set; unset it to benchmark compiled kernels.",
            file=sys.stderr,
        )
        return 2

    tests_rc = run_kernel_tests() if args.all else None
    dtype = torch.float16
    results = []
    for case in sd15_cases():
        print(f"running {case.name} ...", flush=True)
        results.append(run_case(case, dtype, args.warmup_ms, args.rep_ms))
    names = [n for n in ("triton", "sdpa", "xformers") if any(n in r["figures"] for r in results)]
    print_table(results, names)

    report = {
        "benchmark": "attention",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git": git_info(),
        "machine": machine(),
        "settings": {
            "dtype": str(dtype).removeprefix("torch."),
            "heads": HEADS,
            "batch_sizes": list(BATCH_SIZES),
            "nasa_alpha": NASA_ALPHA,
            "warmup_ms": args.warmup_ms,
            "rep_ms": args.rep_ms,
            "timing": "triton.testing.do_bench median",
            "flops": "4*B*H*Lq*Lk*D (NASA: Lk+ + Lk-)",
            "kernel_tests_rc": tests_rc,
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    png = args.out.with_suffix(".png")
    print(f"wrote {png}" if plot(results, names, png) else "matplotlib not installed: no PNG plot")
    return 1 if tests_rc else 0


if __name__ == "__main__":
    sys.exit(main())
