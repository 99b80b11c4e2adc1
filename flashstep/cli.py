"""`flashstep`: one command line for serving, generating, training, evaluating and benchmarking.

Each subcommand parses its flags here and hands typed values to the package that owns the work;
heavy imports happen inside the handlers so `flashstep --help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
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


# The stages with a bfloat16 path; every other stage refuses `--bf16` rather than run in fp32 unasked.
BF16_STAGES = ("instaflow", "instaflow-refine", "hypersd-refine")
# The leg stages, whose chains run one config several times: each leg may take its own noise and prompts.
SEED_STAGES = ("instaflow-refine", "hypersd-refine")


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    if args.bf16 and args.stage not in BF16_STAGES:
        raise SystemExit(f"flashstep train {args.stage}: --bf16 is for {', '.join(BF16_STAGES)} only")
    if args.seed is not None and args.stage not in SEED_STAGES:
        raise SystemExit(f"flashstep train {args.stage}: --seed is for {', '.join(SEED_STAGES)} only")
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
    elif args.stage == "decoder":
        from training.vae import decoder_recipe, stored_dtype, train_decoder_recipe

        if args.vae is None:
            raise SystemExit("`flashstep train decoder` needs --vae FOLDER: the exported VAE whose decoder it refines")
        vae, report = train_decoder_recipe(runs / "decoder", args.vae, decoder_recipe(args.steps, arch))
        if args.out is not None:  # in the refined folder's dtype, so it drops in where that one was
            vae.to(stored_dtype(args.vae)).save_pretrained(args.out)
    elif args.stage == "teacher":
        from models.registry import SHIPPED_MODELS_DIR
        from training.teacher import TeacherTrainConfig, train_teacher

        cfg = TeacherTrainConfig(steps=args.steps or TeacherTrainConfig.steps, arch=arch)
        if args.tiny:  # seconds, not the 50k renders of the real run
            cfg = dataclasses.replace(cfg, n_train=64, batch_size=4, save_every=2)
        out = args.out or SHIPPED_MODELS_DIR / "shapes-teacher"
        report = train_teacher(cfg, args.vae or runs / "vae" / "vae", runs / "teacher", out)
    elif args.stage == "instaflow-refine":
        report = _refine_instaflow(args, runs)
    elif args.stage == "hypersd-refine":
        report = _refine_hypersd(args, runs)
    elif args.stage in DISTILL_STAGES:
        report = _train_distilled(args)
    else:  # pragma: no cover - argparse restricts the choices
        raise SystemExit(f"unknown stage {args.stage}")
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


# Distillation recipes: stage -> (module, config class, train function, export names, tiny overrides).
DISTILL_STAGES = {
    "instaflow": (
        "training.instaflow", "InstaFlowTrainConfig", "train_instaflow", ("shapes-2rf", "shapes-instaflow"),
        dict(pairs=8, pair_steps=2, pair_batch=4, reflow_steps=2, distill_steps=2, perceptual_steps=1, batch_size=2),
    ),
    "swiftbrush": (
        "training.swiftbrush", "SwiftBrushTrainConfig", "train_swiftbrush", ("shapes-swiftbrush",),
        dict(steps=2, batch_size=2, save_every=1),
    ),
    "hypersd": (
        "training.hypersd", "HyperSDTrainConfig", "train_hypersd", ("shapes-hypersd",),
        dict(latents=16, stage_steps=(1, 1, 1, 1), batch_size=2, save_every=2),
    ),
}  # fmt: skip


def _train_distilled(args: argparse.Namespace) -> dict:
    """Run one distillation recipe on `--teacher`; exports go to `--out` (default: the shipped models)."""
    import importlib

    from models.registry import SHIPPED_MODELS_DIR

    module_name, cfg_name, fn_name, exports, tiny = DISTILL_STAGES[args.stage]
    module = importlib.import_module(module_name)
    cfg = getattr(module, cfg_name)()
    if args.tiny:
        cfg = dataclasses.replace(cfg, **tiny)
    if args.steps is not None:  # 0 is a length too: swiftbrush --start-from with --steps 0 exports the take-over alone
        lengths = {}
        for f in dataclasses.fields(cfg):
            if f.name in STEP_FIELDS:
                value = getattr(cfg, f.name)
                lengths[f.name] = (args.steps,) * len(value) if isinstance(value, tuple) else args.steps
        cfg = dataclasses.replace(cfg, **lengths)
    if args.stage == "swiftbrush":
        cfg = _swiftbrush_options(cfg, args)
    if args.bf16:
        cfg = dataclasses.replace(cfg, bf16=True)
    out = Path(args.out or SHIPPED_MODELS_DIR)
    teacher = Path(args.teacher or SHIPPED_MODELS_DIR / "shapes-teacher")
    train = getattr(module, fn_name)
    return train(cfg, Path(args.runs) / args.stage, *(out / name for name in exports), teacher_dir=teacher)


def _swiftbrush_options(cfg, args: argparse.Namespace):
    """`--lr`, `--guidance-range`, `--lora-warmup`, `--prediction`, `--anchor-weight` and SwiftBrush v2's start (`--start-from FOLDER`, `--start-steps N`) on the swiftbrush recipe."""
    from training.warm_start import WarmStartConfig

    range_ = tuple(args.guidance_range) if args.guidance_range else None
    given = {"lr": args.lr, "guidance_range": range_, "lora_warmup": args.lora_warmup, "prediction": args.prediction,
             "anchor_weight": args.anchor_weight}  # fmt: skip
    given = {field: value for field, value in given.items() if value}
    if args.start_from is not None:
        start = WarmStartConfig(source=str(args.start_from))
        if args.tiny:
            start = dataclasses.replace(start, steps=2, batch_size=2, save_every=1)
        given["warm_start"] = dataclasses.replace(start, steps=args.start_steps or start.steps)
        if args.prediction == "flow" and args.start_steps:
            raise SystemExit("--start-steps sets a take-over regression, but a --prediction flow student starts "
                             "from the --start-from weights as they are")  # fmt: skip
    elif args.start_steps:
        raise SystemExit("--start-steps needs --start-from FOLDER: the one-step student to start from")
    try:
        return dataclasses.replace(cfg, **given)
    except ValueError as err:  # e.g. --anchor-weight without --start-from
        raise SystemExit(f"flashstep train swiftbrush: {err}") from err


def _refinement_paths(args: argparse.Namespace, runs: Path, shipped_name: str) -> tuple[Path, Path]:
    """(export folder, teacher folder) of a `*-refine` stage, which needs the exported student it continues."""
    from models.registry import SHIPPED_MODELS_DIR

    if args.student is None:
        raise SystemExit(f"`flashstep train {args.stage}` needs --student FOLDER: the exported {shipped_name} to refine")
    out = args.out or runs / args.stage / Path(args.student).name
    return Path(out), Path(args.teacher or SHIPPED_MODELS_DIR / "shapes-teacher")


def _matching(dm, steps: int):
    """The fake score's warm-up shortened to half a short run, so smoke runs exercise the DMD term too."""
    return dataclasses.replace(dm, fake_warmup=min(dm.fake_warmup, steps // 2))


# The DMD term's own flags: (argparse dest, config field, flag as typed).
DMD_FLAGS = (("dmd_guidance", "guidance", "--dmd-guidance"), ("fake_updates", "fake_updates", "--fake-updates"))


def _dmd_flags_given(args: argparse.Namespace) -> list[str]:
    """The DMD flags the command line set, as typed: each needs the DMD term on."""
    return [flag for dest, _, flag in DMD_FLAGS if getattr(args, dest) is not None]


def _dmd_config(dm, args: argparse.Namespace):
    """`dm` with --dmd-guidance / --fake-updates applied; the config checks the values and names the field."""
    given = {field: getattr(args, dest) for dest, field, _ in DMD_FLAGS if getattr(args, dest) is not None}
    try:
        return dataclasses.replace(dm, **given)
    except ValueError as err:
        raise SystemExit(f"flashstep train {args.stage}: {err}") from err


def _refine_instaflow(args: argparse.Namespace, runs: Path) -> dict:
    """Continue an exported instaflow student (`--student`): a one-step one's distillation, a 2-rectified
    flow's reflow; export to `--out`."""
    from training.distribution_matching import DistributionMatchingConfig
    from training.instaflow import REFINE_DEFAULTS, InstaFlowTrainConfig, refine_instaflow

    out, teacher = _refinement_paths(args, runs, "shapes-instaflow")
    cfg = dataclasses.replace(InstaFlowTrainConfig(), **REFINE_DEFAULTS)
    if args.tiny:
        cfg = dataclasses.replace(cfg, **{**DISTILL_STAGES["instaflow"][4], "perceptual_steps": 2})
    if args.steps:
        cfg = dataclasses.replace(cfg, distill_steps=args.steps, perceptual_steps=args.steps, reflow_steps=args.steps)
    given = {
        "pairs": args.pairs, "pair_start": args.pairs_from, "colour_weight": args.colour_weight, "lr": args.lr,
        "bf16": args.bf16,
    }  # fmt: skip
    chosen = {field: value for field, value in given.items() if value}
    if args.perceptual_weight is not None:  # 0 is a real choice here (latent MSE alone)
        chosen["perceptual_weight"] = args.perceptual_weight
    if args.seed is not None:
        chosen["seed"] = args.seed
    try:  # the config checks the loss weights' range and names the field
        cfg = dataclasses.replace(cfg, **chosen)
    except ValueError as err:
        raise SystemExit(f"flashstep train instaflow-refine: {err}") from err
    if (refine := _teacher_refinement(args)) is not None:
        if args.pairs or args.pairs_from:
            raise SystemExit("flashstep train instaflow-refine: --source-refine-* trains on the student's own refined samples of fresh noise, not on teacher pairs; drop --pairs / --pairs-from")
        cfg = dataclasses.replace(cfg, self_refine=refine)
    if args.dmd_weight:
        dm = _matching(_dmd_config(DistributionMatchingConfig(weight=args.dmd_weight), args), cfg.distill_steps)
        cfg = dataclasses.replace(cfg, distribution_matching=dm)
    elif flags := _dmd_flags_given(args):
        raise SystemExit(f"flashstep train instaflow-refine: {' / '.join(flags)} needs --dmd-weight (the DMD term is off without it)")
    return refine_instaflow(cfg, runs / "instaflow-refine", args.student, out, teacher_dir=teacher)


REFINE_FLAGS = {"source_refine_from": "timestep", "source_refine_steps": "steps", "source_refine_guidance": "guidance"}


def _teacher_refinement(args: argparse.Namespace):
    """The `--source-refine-*` flags as a `TeacherRefinement`, or None where none is given; an
    out-of-range value exits naming the stage and the field."""
    from training.teacher_refinement import TeacherRefinement

    given = {field: getattr(args, name) for name, field in REFINE_FLAGS.items() if getattr(args, name) is not None}
    try:
        return TeacherRefinement(**given, bf16=args.bf16) if given else None
    except ValueError as err:
        raise SystemExit(f"flashstep train {args.stage}: {err}") from err


def _refine_hypersd(args: argparse.Namespace, runs: Path) -> dict:
    """Hyper-SD's score-distillation stage on an exported hypersd LoRA (`--student`); export to `--out`."""
    from training.hypersd import (
        HyperSDRefineConfig,
        PairRegressionConfig,
        SelfRegressionConfig,
        SourceRegressionConfig,
        refine_hypersd,
    )

    out, teacher = _refinement_paths(args, runs, "shapes-hypersd")
    cfg = HyperSDRefineConfig()
    if args.tiny:
        cfg = dataclasses.replace(cfg, steps=2, latents=8, batch_size=2, save_every=1)
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.lr:
        cfg = dataclasses.replace(cfg, lr=args.lr)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.regression_source:
        if args.pairs or args.pairs_from:
            raise SystemExit("flashstep train hypersd-refine: --regression-source replaces the teacher pairs; drop --pairs / --pairs-from")
        reg = SourceRegressionConfig(str(args.regression_source), refine=_teacher_refinement(args))
        cfg = dataclasses.replace(cfg, regression=dataclasses.replace(reg, weight=args.regression_weight or reg.weight))
    elif (refine := _teacher_refinement(args)) is not None:  # no source: the LoRA's own samples, refined
        if args.pairs or args.pairs_from:
            raise SystemExit("flashstep train hypersd-refine: --source-refine-* without --regression-source trains on the LoRA's own refined samples of fresh noise, not on teacher pairs; drop --pairs / --pairs-from")
        try:  # SelfRegressionConfig names the field a bad step count is in
            reg = SelfRegressionConfig(refine=refine, sample_steps=tuple(args.regression_steps or (1,)))
        except ValueError as err:
            raise SystemExit(f"flashstep train hypersd-refine: {err}") from err
        cfg = dataclasses.replace(cfg, regression=dataclasses.replace(reg, weight=args.regression_weight or reg.weight))
    elif args.perceptual_weight is not None and not (args.pairs or args.regression_weight):
        raise SystemExit("flashstep train hypersd-refine: --perceptual-weight weighs the regression term; add --regression-source, --source-refine-* or --pairs")
    elif args.pairs or args.regression_weight:
        reg = PairRegressionConfig(bf16=args.bf16)
        if args.tiny:
            reg = dataclasses.replace(reg, pairs=4, pair_start=0)
        given = {"pairs": args.pairs, "pair_start": args.pairs_from, "weight": args.regression_weight}
        cfg = dataclasses.replace(cfg, regression=dataclasses.replace(reg, **{k: v for k, v in given.items() if v}))
    if args.regression_steps and not isinstance(cfg.regression, SelfRegressionConfig):
        raise SystemExit("flashstep train hypersd-refine: --regression-steps picks the step counts of the LoRA's own refined samples; add --source-refine-* without --regression-source")
    weight = cfg.matching.weight if args.dmd_weight is None else args.dmd_weight
    if weight == 0:  # DMD off: the leg is TSCD and/or regression
        if flags := _dmd_flags_given(args):
            raise SystemExit(f"flashstep train hypersd-refine: {' / '.join(flags)} needs a DMD term, but --dmd-weight is 0")
        matching = None
    else:
        matching = _matching(_dmd_config(dataclasses.replace(cfg.matching, weight=weight), args), cfg.steps)
    try:  # HyperSDRefineConfig and the regression configs check the ranges and name the field
        if args.perceptual_weight is not None:
            cfg = dataclasses.replace(cfg, regression=dataclasses.replace(cfg.regression, perceptual_weight=args.perceptual_weight))
        cfg = dataclasses.replace(
            cfg, one_step_timestep=args.one_step_timestep, rank=args.rank, export_rank=args.export_rank,
            tscd_weight=cfg.tscd_weight if args.tscd_weight is None else args.tscd_weight, matching=matching,
            ema_decay=args.ema_decay,
        )
    except ValueError as err:
        raise SystemExit(f"flashstep train hypersd-refine: {err}") from err
    return refine_hypersd(cfg, runs / "hypersd-refine", args.student, out, teacher_dir=teacher)


# `--steps N` sets every training-length field a recipe config has (smoke runs, quick trials).
STEP_FIELDS = ("steps", "reflow_steps", "distill_steps", "student_steps", "stage_steps")


def _cmd_link_weights(args: argparse.Namespace) -> int:
    from models.registry import SHIPPED_MODELS_DIR
    from training.shared_weights import link_identical_weights, unique_weight_bytes

    root = args.root or SHIPPED_MODELS_DIR
    for link, target in link_identical_weights(root):
        print(f"{link.relative_to(root)} -> {target.relative_to(root)}")
    print(f"{unique_weight_bytes(root):,} bytes of distinct weights under {root}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from training.report import REPORT_DIR, run_report

    run_report(seeds=args.seeds, models_root=args.models_root, out=Path(args.out or REPORT_DIR))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import EvalOptions, evaluate_model, print_report

    try:
        opts = EvalOptions(
            model=args.model,
            models_root=args.models_root,
            family=args.family,
            prompts=Path(args.prompts),
            seeds=args.seeds,
            first_seed=args.first_seed,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            nasa_alpha=args.nasa_alpha,
            hybrid=args.hybrid,
            batch_size=args.batch_size,
        )
    except ValueError as err:
        raise SystemExit(f"flashstep eval: {err}") from err
    report = evaluate_model(opts)
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cmd_serve(argv: list[str]) -> int:
    from server.serve import serve_main

    return serve_main(argv) or 0


# `flashstep bench <name> [flags]` -> bench/<module>.main(flags); each has its own --help.
BENCH_COMMANDS = {
    "cpu": ("bench.cpu", "the whole CPU set (make bench): latency, load, sd15; bench/results/cpu.json"),
    "latency": ("bench.latency", "in-process latency of every shipped model x steps x batch size"),
    "load": ("bench.load", "HTTP load on flashstep and its peers (FastAPI per request, LitServe, in-process)"),
    "sd15": ("bench.sd15_cpu", "SD1.5-size random-weight stages on the CPU at 512 px"),
    "gpu": ("bench.gpu", "SD1.5-size fp16 scenarios per attention backend (needs CUDA; see bench/gpu.sh)"),
}


def _cmd_bench(argv: list[str]) -> int:
    import importlib

    usage = "usage: flashstep bench {" + ",".join(BENCH_COMMANDS) + "} [flags]   (flags: flashstep bench NAME --help)\n"
    usage += "\n".join(f"  {name:8} {text}" for name, (_, text) in BENCH_COMMANDS.items())
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if argv[0] not in BENCH_COMMANDS:
        print(f"flashstep bench: unknown benchmark {argv[0]!r}\n{usage}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCH_COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


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
    t.add_argument("stage", choices=["judge", "vae", "decoder", "teacher", *DISTILL_STAGES, "instaflow-refine", "hypersd-refine"])
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--runs", default=str(DEFAULT_RUNS), help="folder for resumable training state")
    t.add_argument("--out", type=Path, default=None, help="export folder; for distillation recipes the models folder their exports go in (default: the shipped one)")
    t.add_argument("--student", type=Path, default=None, help="instaflow-refine / hypersd-refine: the exported student to refine, for instaflow-refine a one-step student (more distillation) or a 2-rectified flow (more reflow); its export goes to --out, default RUNS/<stage>/<its folder name>")
    t.add_argument("--dmd-weight", type=float, default=None, help="instaflow-refine: add DMD distribution matching (real score: the teacher with CFG; fake score: a LoRA on the student's samples) at this weight beside the L2 regression; hypersd-refine: the weight of its DMD term (default 1; 0 turns it off)")
    t.add_argument("--dmd-guidance", type=float, default=None, help="instaflow-refine, hypersd-refine: the CFG scale of DMD's real score (default 4, the scale the teacher pairs are sampled at); on shapes the teacher@25 names colours best near 2 (0.96 colour accuracy at 2, 0.91 at 4, 0.86 at 8)")
    t.add_argument("--fake-updates", type=int, default=None, help="instaflow-refine, hypersd-refine: the DMD fake score's LoRA steps per student step (default 2; DMD2's two time-scale rule uses 5, so the fake score keeps up with the student's samples)")
    t.add_argument("--pairs", type=int, default=None, help="instaflow-refine, hypersd-refine: teacher ODE pairs to train on (default 12,288; the first ones are the recipe's, missing ones are generated); for hypersd-refine, turns on the regression term")
    t.add_argument("--pairs-from", type=int, default=None, help="instaflow-refine, hypersd-refine: index of the first pair (a multiple of 128): pairs are seeded by index, so a leg can train on pairs earlier legs never saw (default 0)")
    t.add_argument("--bf16", action="store_true", help="instaflow, instaflow-refine: teacher pairs, the teacher's touch-up (--source-refine-*) and the student's forward passes under bfloat16 autocast (2.0x and 1.4x faster on the 2-core CPU); hypersd-refine: the pairs and the touch-up only (the LoRA's own passes stay fp32: bfloat16 made them slower)")
    t.add_argument("--seed", type=int, default=None, help="instaflow-refine, hypersd-refine: the leg's seed for its noise and prompts; legs of one chain on the same seed revisit the same batches, so give each its own to see fresh noise throughout (default: the recipe's, hypersd-refine 9500, instaflow-refine 7000)")
    t.add_argument("--lr", type=float, default=None, help="instaflow-refine, swiftbrush, hypersd-refine: the student's peak learning rate (defaults 1e-4, 3e-4, 2e-4)")
    t.add_argument("--guidance-range", type=float, nargs=2, default=None, metavar=("LO", "HI"), help="swiftbrush: PG-SB's range for the guidance scale both teachers use, kappa ~ U(LO, HI) (default 0.5 2)")
    t.add_argument("--lora-warmup", type=int, default=None, help="swiftbrush: the first N of --steps train only the LoRA teacher, on the starting student's samples (default 0)")
    t.add_argument("--prediction", choices=["epsilon", "v_prediction", "flow"], default=None, help="swiftbrush: what the student's UNet outputs from pure noise (default epsilon, SwiftBrush's; v_prediction, SD-Turbo's, conditions its one step ~15x better; flow, the rectified-flow velocity at t = 1000: with --start-from, the student starts from that instaflow student's weights, no take-over)")
    t.add_argument("--anchor-weight", type=float, default=None, help="swiftbrush with --start-from: DMD's regression loss at this weight beside VSD, MSE to the --start-from model's one-step sample on the same noise (default 0: off)")
    t.add_argument("--start-from", type=Path, default=None, help="swiftbrush: start the student from this one-step instaflow student (SwiftBrush v2), taken over by regression on fresh noise, instead of from the teacher")
    t.add_argument("--start-steps", type=int, default=None, help="swiftbrush with --start-from: steps of that regression (default 1,500)")
    t.add_argument("--one-step-timestep", type=int, default=None, help="hypersd-refine: the timestep the 1-step sample feeds pure noise at, in training and in the export (default: the student's, 999 from the recipe; Hyper-SD's SDXL one-step UNet uses 800)")
    t.add_argument("--tscd-weight", type=float, default=None, help="hypersd-refine: weight of the k = 1 TSCD loss that keeps the multi-step jumps (default 1); 0 trains a LoRA for one step only")
    t.add_argument("--rank", type=int, default=None, help="hypersd-refine: widen the student's LoRA to this rank before training (the stored update kept exactly; default: its own rank)")
    t.add_argument("--export-rank", type=int, default=None, help="hypersd-refine: store the trained LoRA at this lower rank, each layer's best approximation (SVD), e.g. train at --rank 32 and ship at 16 (default: as trained); a finished run re-exports without training again")
    t.add_argument("--ema-decay", type=float, default=None, help="hypersd-refine: export an exponential moving average of the LoRA at this decay (e.g. 0.995, a ~200-step window) instead of its last weights (default: the last weights)")
    t.add_argument("--regression-source", type=Path, default=None, help="hypersd-refine: regress the 1-step sample onto this one-step instaflow student's sample of the same fresh noise (InstaFlow: a reflowed map distils into one step better than the teacher's) instead of onto teacher ODE pairs")
    t.add_argument("--source-refine-from", type=int, default=None, help="hypersd-refine with --regression-source: re-noise each source sample to this timestep with its own noise and let the teacher take it back (SDEdit), so the target draws the teacher's colours on the source's map; instaflow-refine, and hypersd-refine without --regression-source: the one-step student (or LoRA) trains on fresh noise toward its own sample refined so, with no teacher pairs (default when any --source-refine-* flag is given: 300)")
    t.add_argument("--source-refine-steps", type=int, default=None, help="hypersd-refine, instaflow-refine: the teacher's DDIM steps from --source-refine-from to 0 (default 2)")
    t.add_argument("--source-refine-guidance", type=float, default=None, help="hypersd-refine, instaflow-refine: the teacher's CFG scale in that refinement (default 2, the scale it names colours best at)")
    t.add_argument("--regression-weight", type=float, default=None, help="hypersd-refine: DMD's regression loss (latent MSE + judge-feature perceptual) at this weight, onto teacher ODE pairs, a --regression-source's samples or, with --source-refine-* alone, the LoRA's own refined samples (default 0.25; --pairs / --pairs-from / --bf16 choose and make the pairs as for instaflow-refine)")
    t.add_argument("--regression-steps", type=int, nargs="+", default=None, help="hypersd-refine with --source-refine-* alone: the served step counts (of 1, 2, 4, 8) whose own samples the LoRA regresses onto their teacher touch-up, one drawn per batch; the first k - 1 TCD steps run without gradient, the last is trained (default 1: the one-step map only)")
    t.add_argument("--perceptual-weight", type=float, default=None, help="hypersd-refine: the regression term's judge-feature perceptual loss at this weight beside its latent MSE (default 1; on the shipped one-step LoRA the two are of one size, 0.04 and 0.05); instaflow-refine (one-step student): the same loss beside the latent MSE to the pair or refined target (default 1)")
    t.add_argument("--colour-weight", type=float, default=None, help="instaflow-refine: weight of the perceptual loss's pooled-colour term (default 0: judge features only)")
    t.add_argument("--tiny", action="store_true", help="tiny sizes (smoke runs)")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--teacher", type=Path, default=None, help="teacher folder to distil (default: shapes-teacher)")
    t.add_argument("--vae", type=Path, default=None, help="VAE folder the teacher trains on (default: RUNS/vae/vae; the shipped one is models/shipped/shapes-teacher/vae), or whose decoder `train decoder` refines")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="ShapesBench: adherence, FD, diversity, negative efficacy, cost")
    _add_model_options(e)
    e.add_argument("--prompts", required=True, help="prompt file: text (one a line, # comments) or JSONL")
    e.add_argument("--seeds", type=int, default=8, help="seeds per prompt")
    e.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from here (default 0, as the README's figures): a fresh range checks a choice made on another")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--json", default=None, help="write the report here")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("report", help="ShapesBench table of every shipped generator (README figures)")
    r.add_argument("--seeds", type=int, default=8, help="seeds per prompt; with fewer, diversity reads low and FD high (the teacher at CFG 2.5: diversity 0.84 at 4 seeds, 0.98 at 8)")
    r.add_argument("--models-root", type=Path, default=None)
    r.add_argument("--out", default=None, help="folder for shapesbench.json/.md (default: training/reports)")
    r.set_defaults(func=_cmd_report)

    w = sub.add_parser("link-weights", help="replace weight files that duplicate another (a student's copy of the teacher's VAE) by relative symlinks")
    w.add_argument("--root", type=Path, default=None, help="models root (default: the shipped models)")
    w.set_defaults(func=_cmd_link_weights)

    s = sub.add_parser("serve", help="run the HTTP server (flags: flashstep serve --help)", add_help=False)
    s.set_defaults(func=None)

    b = sub.add_parser("bench", help="benchmarks: cpu (make bench), latency, load, sd15, gpu", add_help=False)
    b.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        return _cmd_serve(argv[1:])
    if argv and argv[0] == "bench":
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
