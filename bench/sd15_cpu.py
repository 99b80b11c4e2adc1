"""SD1.5 at full size on the CPU: one-step latency at 512 px, stage by stage, and the teacher's estimate.

    python -m flashstep.bench.sd15_cpu                      # table, bench/results/sd15_cpu.json, bench/results/sd15_cpu.png
    flashstep bench sd15 --repeats 1

Random-weight SD1.5 modules (bench/sd15_arch.py, public configs) in float32 on the CPU, timed one
stage at a time under `torch.inference_mode()`: the text encoder on one 77-token prompt, the UNet
on one 64x64x4 latent at t = 999, the VAE decoding it to 512x512, and the tiny decoder (TAESD) doing
the same. A one-step image is text + UNet + decode; with the tiny decoder, text + UNet + tiny decode.

The teacher at 25 steps with CFG is NOT run end to end here (25 two-image UNet passes take many
minutes on two cores): its figure is 25 x the measured batch-2 UNet time + the two-prompt text
encoding + the VAE decode, and the results label it "estimated from measured per-step time".
Each stage is the median of `--repeats` timed calls. The short stages (text encoder, tiny decoder)
get one untimed warm-up call first; the UNet and the VAE decoder do not: each call takes many
seconds here, so a first call's set-up cost is noise, and skipping it saves minutes of `make bench`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flashstep.bench.report import (
    RESULTS_DIR,
    new_report,
    percentile,
    print_table,
    pyplot,
    save_figure,
    write_report,
)
from flashstep.bench.sd15_arch import LATENT_SIZE, TEXT_TOKENS, build_sd15, count_parameters

TEACHER_STEPS = 25
LONG_STAGES = ("unet_b1", "unet_b2_cfg", "vae_decode")  # seconds per call on a CPU: no warm-up call
ESTIMATE_LABEL = "estimated from measured per-step time"


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of `repeats` calls of `fn` after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def stage_samples(modules: tuple, latent_size: int, repeats: int, tokens: int = TEXT_TOKENS, log=print) -> dict[str, list[float]]:
    """Seconds per call of each stage: text (1 and 2 prompts), UNet (batch 1 and 2), VAE and tiny decode."""
    unet, vae, text_encoder, tiny = modules
    gen = torch.Generator().manual_seed(0)
    vocab = text_encoder.config.vocab_size
    ids1 = torch.randint(0, vocab, (1, tokens), generator=gen)  # (1, 77)
    ids2 = torch.randint(0, vocab, (2, tokens), generator=gen)  # (2, 77): prompt + empty prompt for CFG
    latents = torch.randn(1, unet.config.in_channels, latent_size, latent_size, generator=gen)  # (1, 4, 64, 64)
    context = torch.randn(1, tokens, unet.config.cross_attention_dim, generator=gen)  # (1, 77, 768)
    t = torch.tensor([999])
    calls = {
        "text_encoder": lambda: text_encoder(ids1),
        "text_encoder_cfg": lambda: text_encoder(ids2),
        "unet_b1": lambda: unet(latents, t, encoder_hidden_states=context),
        "unet_b2_cfg": lambda: unet(latents.repeat(2, 1, 1, 1), t.repeat(2), encoder_hidden_states=context.repeat(2, 1, 1)),
        "vae_decode": lambda: vae.decode(latents / vae.config.scaling_factor),
        "tiny_decode": lambda: tiny.decode(latents),
    }
    samples = {}
    with torch.inference_mode():
        for name, fn in calls.items():
            warmup = 0 if name in LONG_STAGES else 1
            log(f"timing {name} ({repeats} calls after {warmup} warm-up) ...", flush=True)
            samples[name] = time_calls(fn, repeats, warmup)
    return samples


def figures_from(samples: dict[str, list[float]], teacher_steps: int = TEACHER_STEPS) -> dict:
    """Stage medians, the one-step totals, and the teacher's 25-step CFG estimate with its label."""
    med = {name: percentile(s, 50) for name, s in samples.items()}
    one_step = med["text_encoder"] + med["unet_b1"] + med["vae_decode"]
    one_step_tiny = med["text_encoder"] + med["unet_b1"] + med["tiny_decode"]
    teacher = med["text_encoder_cfg"] + teacher_steps * med["unet_b2_cfg"] + med["vae_decode"]
    return {
        "stages_median_s": med,
        "stages_samples_s": samples,
        "one_step_s": one_step,
        "one_step_tiny_decoder_s": one_step_tiny,
        "teacher_cfg_s": teacher,
        "teacher_cfg_label": f"{ESTIMATE_LABEL}: text(2 prompts) + {teacher_steps} x UNet(batch 2) + VAE decode",
        "teacher_steps": teacher_steps,
        "one_step_speedup_vs_teacher_estimated": teacher / one_step,
        "one_step_tiny_speedup_vs_teacher_estimated": teacher / one_step_tiny,
    }


def plot_stages(figures: dict, path: Path, title: str) -> bool:
    """Stacked horizontal bars: one-step, one-step with the tiny decoder, the teacher (estimated)."""
    plt = pyplot()
    if plt is None:
        return False
    med, steps = figures["stages_median_s"], figures["teacher_steps"]
    bars = [
        ("one step", [("text encoder", med["text_encoder"]), ("UNet", med["unet_b1"]), ("VAE decode", med["vae_decode"])]),
        ("one step + tiny decoder", [("text encoder", med["text_encoder"]), ("UNet", med["unet_b1"]), ("tiny decode", med["tiny_decode"])]),
        (f"teacher {steps} steps + CFG\n({ESTIMATE_LABEL})", [
            ("text encoder", med["text_encoder_cfg"]), ("UNet", steps * med["unet_b2_cfg"]), ("VAE decode", med["vae_decode"]),
        ]),
    ]  # fmt: skip
    colors = {"text encoder": "tab:blue", "UNet": "tab:orange", "VAE decode": "tab:green", "tiny decode": "tab:red"}
    fig, ax = plt.subplots(figsize=(9, 3.6))
    seen = set()
    for y, (_, parts) in enumerate(bars):
        left = 0.0
        for stage, seconds in parts:
            ax.barh(y, seconds, left=left, color=colors[stage], label=None if stage in seen else stage)
            seen.add(stage)
            left += seconds
        ax.text(left, y, f" {left:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)))
    ax.set_yticklabels([b[0] for b in bars], fontsize=8)
    ax.set_xlabel("seconds per image")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
    return True


def run(
    *,
    repeats: int = 2,
    modules: tuple | None = None,
    latent_size: int = LATENT_SIZE,
    name: str = "sd15_cpu",
    out_dir: Path = RESULTS_DIR,
) -> dict:
    """Build (or take) the modules, time the stages, write <out_dir>/<name>.json and .png; return the report."""
    start = time.perf_counter()
    modules = modules if modules is not None else build_sd15()
    built_s = time.perf_counter() - start
    unet, vae, text_encoder, tiny = modules
    settings = {
        "resolution": latent_size * 8,
        "latent": [unet.config.in_channels, latent_size, latent_size],
        "text_tokens": TEXT_TOKENS,
        "dtype": "float32",
        "weights": "random (public SD1.5 / TAESD configs, bench/sd15_arch.py)",
        "parameters": {
            "unet": count_parameters(unet), "vae": count_parameters(vae),
            "text_encoder": count_parameters(text_encoder), "tiny_decoder": count_parameters(tiny),
        },  # fmt: skip
        "repeats": repeats,
        "warmup_calls": {"text_encoder": 1, "tiny_decode": 1, **dict.fromkeys(LONG_STAGES, 0)},
        "torch_threads": torch.get_num_threads(),
        "build_s": built_s,
    }
    report = new_report(name, settings)
    figures = figures_from(stage_samples(modules, latent_size, repeats))
    report["figures"] = figures
    med = figures["stages_median_s"]
    rows = [{"stage": k, "median_s": v, "calls": len(figures["stages_samples_s"][k])} for k, v in med.items()]
    rows += [
        {"stage": "= one step (text + UNet + VAE)", "median_s": figures["one_step_s"]},
        {"stage": "= one step, tiny decoder", "median_s": figures["one_step_tiny_decoder_s"]},
        {"stage": f"= teacher {TEACHER_STEPS} steps + CFG (estimated)", "median_s": figures["teacher_cfg_s"]},
    ]
    print_table(rows, [("stage", "stage", ""), ("median_s", "seconds", ".3f"), ("calls", "calls", "")],
                title=f"\nSD1.5 size on the CPU, {settings['resolution']} px, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"teacher figure: {figures['teacher_cfg_label']}")
    print(f"one-step speedup vs teacher ({ESTIMATE_LABEL}): {figures['one_step_speedup_vs_teacher_estimated']:.1f}x, "
          f"with the tiny decoder {figures['one_step_tiny_speedup_vs_teacher_estimated']:.1f}x", flush=True)  # fmt: skip
    path = write_report(report, out_dir / f"{name}.json")
    print(f"wrote {path}")
    png = path.with_suffix(".png")
    if plot_stages(figures, png, f"SD1.5 size, random weights, CPU float32, {settings['resolution']} px"):
        print(f"wrote {png}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashstep bench sd15", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per stage")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--name", default="sd15_cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1 but is {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run(repeats=args.repeats, name=args.name, out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
