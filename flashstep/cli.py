"""`flashstep`: one command line for serving, generating, training, evaluating and benchmarking.

Each subcommand parses its flags here and hands typed values to the package that owns the work;
heavy imports happen inside the handlers so `flashstep --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_RUNS = Path(os.environ.get("FLASHSTEP_RUNS", "runs"))


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="shapes-teacher", help="shipped model name, a name under --models-root, or a folder")
    p.add_argument("--models-root", type=Path, default=None, help="folder whose sub-folders are models")
    p.add_argument("--family", default=None, help="generator family for a folder without flashstep.json")
    p.add_argument("--steps", type=int, default=None, help="UNet steps (default: the model's own)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's own)")
    p.add_argument("--nasa-alpha", type=float, default=None, help="NASA negative-attention strength")
    p.add_argument("--hybrid", action="store_true", help="base model takes the first step (diversity hybrid)")
    p.add_argument("--tiny-decoder", action="store_true", help="decode with the folder's AutoencoderTiny")


def _cmd_generate(args: argparse.Namespace) -> int:
    from models.outputs import GenerationRequest
    from models.registry import load_engine

    engine = load_engine(args.model, args.models_root, family=args.family)
    requests = [
        GenerationRequest(
            prompt=args.prompt,
            seed=args.seed + i,
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            nasa_alpha=args.nasa_alpha,
            hybrid=args.hybrid,
            tiny_decoder=args.tiny_decoder,
        )
        for i in range(args.num_images)
    ]
    result = engine.generate(requests)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        image.save(path)
        paths.append(str(path))
    t = result.timings
    print(
        f"{engine.name} ({engine.family}) wrote {', '.join(paths)}: {result.unet_evals} UNet evals/image, "
        f"encode {t.encode:.3f}s denoise {t.denoise:.3f}s decode {t.decode:.3f}s"
    )
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from models.errors import CheckpointError
    from models.flashstep_config import FlashstepConfig
    from models.registry import discover

    found = discover(args.models_root)
    if args.names:
        print("\n".join(sorted(found)))
        return 0
    print(f"{'name':24} {'family':11} {'steps':18} {'default':>7}  path")
    for name, path in sorted(found.items()):
        try:
            cfg = FlashstepConfig.load(path)
            family, steps, default = cfg.family, ",".join(map(str, cfg.allowed_steps)), str(cfg.default_steps)
        except CheckpointError:  # e.g. a public folder without flashstep.json: listed, family unknown
            family, steps, default = "?", "-", "-"
        print(f"{name:24} {family:11} {steps:18} {default:>7}  {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from training.architecture import ShapesArch

    arch = ShapesArch.tiny() if args.tiny else ShapesArch()
    runs = Path(args.runs)
    if args.stage == "judge":
        from training.judge import JUDGE_DIR, JudgeTrainConfig, train_judge

        cfg = JudgeTrainConfig(steps=args.steps or JudgeTrainConfig.steps)
        report = train_judge(cfg, args.out or JUDGE_DIR)
    elif args.stage == "vae":
        from training.vae import train_vae_recipe, vae_recipe

        _, report = train_vae_recipe(runs / "vae", *vae_recipe(args.steps, arch))
    elif args.stage == "teacher":
        from models.registry import SHIPPED_MODELS_DIR
        from training.teacher import TeacherTrainConfig, train_teacher

        cfg = TeacherTrainConfig(steps=args.steps or TeacherTrainConfig.steps, arch=arch)
        out = args.out or SHIPPED_MODELS_DIR / "shapes-teacher"
        report = train_teacher(cfg, runs / "vae" / "vae", runs / "teacher", out)
    else:  # pragma: no cover - argparse restricts the choices
        raise SystemExit(f"unknown stage {args.stage}")
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import EvalOptions, evaluate_model, print_report

    opts = EvalOptions(
        model=args.model,
        models_root=args.models_root,
        family=args.family,
        prompts=Path(args.prompts),
        seeds=args.seeds,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        nasa_alpha=args.nasa_alpha,
        hybrid=args.hybrid,
        batch_size=args.batch_size,
    )
    report = evaluate_model(opts)
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cmd_serve(argv: list[str]) -> int:
    from server.serve import serve_main

    return serve_main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flashstep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image from a prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("-n", "--num-images", type=int, default=1)
    _add_model_options(g)
    g.set_defaults(func=_cmd_generate)

    m = sub.add_parser("models", help="list available models")
    m.add_argument("--models-root", type=Path, default=None)
    m.add_argument("--names", action="store_true", help="one name a line")
    m.set_defaults(func=_cmd_models)

    t = sub.add_parser("train", help="train a stage of the shapes world")
    t.add_argument("stage", choices=["judge", "vae", "teacher"])
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--runs", default=str(DEFAULT_RUNS), help="folder for resumable training state")
    t.add_argument("--out", type=Path, default=None, help="export folder (default: the shipped one)")
    t.add_argument("--tiny", action="store_true", help="tiny sizes (smoke runs)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="ShapesBench: adherence, FD, diversity, negative efficacy, cost")
    _add_model_options(e)
    e.add_argument("--prompts", required=True, help="prompt file: text (one a line, # comments) or JSONL")
    e.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", default=None, help="write the report here")
    e.set_defaults(func=_cmd_eval)

    s = sub.add_parser("serve", help="run the HTTP server (flags: flashstep serve --help)", add_help=False)
    s.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return _cmd_serve(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
