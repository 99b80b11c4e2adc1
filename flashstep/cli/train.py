"""`flashstep train STAGE [flags]`: run one training recipe with only that recipe's flags.

Each stage is a subparser built from `training.recipes.RECIPES`: `STAGE_FLAGS` adds its own flags,
`_shared` the flags several stages take, and its builder turns the parsed flags into the recipe's
config. The configs check their own values and name the field; a bad value or a flag that needs
another ends as `flashstep train STAGE: error: ...` with exit code 2. Torch and the recipes are
imported only once a stage runs, so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from flashstep.cli.options import DEFAULT_RUNS
from flashstep.training.recipes import RECIPES

# `--train-steps N` on a distillation recipe sets every training-length field its config has.
STEP_FIELDS = ("steps", "reflow_steps", "distill_steps", "student_steps", "stage_steps")

# ----- flags several stages share -----


def _shared(p: argparse.ArgumentParser, *names: str, help: dict[str, str] | None = None) -> None:
    """Add the shared flags `names` to stage `p`; `help` overrides a flag's help text for this stage."""
    texts = {**SHARED_HELP, **(help or {})}
    for name in names:
        flag, kwargs = SHARED_FLAGS[name]
        p.add_argument(flag, **kwargs, help=texts[name])


SHARED_FLAGS: dict[str, tuple[str, dict]] = {
    "train_steps": ("--train-steps", dict(type=int, default=None, metavar="N")),
    "runs": ("--runs", dict(default=str(DEFAULT_RUNS))),
    "out": ("--out", dict(type=Path, default=None)),
    "tiny": ("--tiny", dict(action="store_true")),
    "threads": ("--threads", dict(type=int, default=None)),
    "teacher": ("--teacher", dict(type=Path, default=None)),
    "student": ("--student", dict(type=Path, required=True, metavar="FOLDER")),
    "seed": ("--seed", dict(type=int, default=None)),
    "bf16": ("--bf16", dict(action="store_true")),
    "lr": ("--lr", dict(type=float, default=None)),
}
SHARED_HELP = {
    "train_steps": "optimizer steps to train for (default: the recipe's)",
    "runs": "folder for resumable training state (default: $FLASHSTEP_RUNS or ./runs)",
    "out": "models folder the recipe's exports go in (default: the shipped models)",
    "tiny": "tiny sizes, for smoke runs",
    "threads": "torch CPU threads",
    "teacher": "teacher folder to distil (default: the shipped shapes-teacher)",
    "student": "the exported student to continue; its export goes to --out, default RUNS/<stage>/<its folder name>",
    "seed": "seed of this leg's noise and prompts (default: the recipe's); give each leg of a chain its own "
    "so the chain sees fresh noise throughout",
    "bf16": "run the teacher's sampling and the student's forward passes under bfloat16 autocast",
    "lr": "the student's peak learning rate (default: the recipe's)",
}
DISTILL = ("train_steps", "runs", "out", "tiny", "threads", "teacher")


def _dmd_flags(p: argparse.ArgumentParser, weight_help: str) -> None:
    p.add_argument("--dmd-weight", type=float, default=None, help=weight_help)
    p.add_argument("--dmd-guidance", type=float, default=None,
                   help="CFG scale of the DMD term's real score, the guided teacher (default 4)")
    p.add_argument("--fake-updates", type=int, default=None,
                   help="LoRA steps of the DMD fake score per student step, so it keeps up with the student's "
                   "samples (default 2)")  # fmt: skip


def _source_refine_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--source-refine-from", type=int, default=None, metavar="T",
                   help=f"re-noise {what} to timestep T with its own noise and let the teacher take it back (SDEdit); "
                   "any --source-refine-* flag turns this on (default T: 300)")  # fmt: skip
    p.add_argument("--source-refine-steps", type=int, default=None,
                   help="the teacher's DDIM steps from --source-refine-from to 0 (default 2)")
    p.add_argument("--source-refine-guidance", type=float, default=None,
                   help="the teacher's CFG scale in that touch-up (default 2)")


def _pair_flags(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--pairs", type=int, default=None,
                   help=f"teacher ODE pairs to train on (default 12,288; missing ones are generated){extra}")
    p.add_argument("--pairs-from", type=int, default=None, metavar="INDEX",
                   help="index of the first pair, a multiple of 128: pairs are seeded by index, so a leg can train "
                   "on pairs earlier legs never saw (default 0)")  # fmt: skip


# ----- each stage's flags -----


def _judge_flags(p: argparse.ArgumentParser) -> None:
    _shared(p, "train_steps", "out", "threads", help={"out": "folder the judge is saved to (default: training/assets)"})


def _vae_flags(p: argparse.ArgumentParser) -> None:
    _shared(p, "train_steps", "runs", "tiny", "threads",
            help={"train_steps": "optimizer steps over both phases, a quarter joint (default: the recipe's)"})  # fmt: skip


def _decoder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", type=Path, required=True, metavar="FOLDER", help="the exported VAE whose decoder is refined")
    _shared(p, "train_steps", "runs", "out", "tiny", "threads", help={
        "train_steps": "optimizer steps shared out over the legs in proportion (default: the recipe's)",
        "out": "folder the refined VAE is saved to, in the dtype of --vae (default: RUNS/decoder only)",
    })  # fmt: skip


def _teacher_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vae", type=Path, default=None, metavar="FOLDER",
                   help="VAE folder the teacher trains on (default: RUNS/vae/vae)")
    _shared(p, "train_steps", "runs", "out", "tiny", "threads",
            help={"out": "export folder (default: the shipped shapes-teacher)"})  # fmt: skip


def _instaflow_flags(p: argparse.ArgumentParser) -> None:
    _shared(p, *DISTILL, "bf16", help={
        "train_steps": "steps of the reflow and of the one-step distillation each (default: the recipe's)",
        "bf16": "teacher pairs and the students' forward passes under bfloat16 autocast",
    })  # fmt: skip


def _swiftbrush_flags(p: argparse.ArgumentParser) -> None:
    _shared(p, *DISTILL, "lr", help={"lr": "the student's peak learning rate (default 3e-4)"})
    p.add_argument("--guidance-range", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="PG-SB's range for the guidance scale both teachers use, kappa ~ U(LO, HI) (default 0.5 2)")
    p.add_argument("--lora-warmup", type=int, default=None, metavar="N",
                   help="the first N of --train-steps train only the LoRA teacher, on the starting student's samples "
                   "(default 0)")
    p.add_argument("--prediction", choices=["epsilon", "v_prediction", "flow"], default=None,
                   help="what the student's UNet outputs from pure noise (default epsilon); flow is the rectified-flow "
                   "velocity at t = 1000 and needs --start-from, whose weights the student starts from as they are")
    p.add_argument("--start-from", type=Path, default=None, metavar="FOLDER",
                   help="start the student from this one-step instaflow student (SwiftBrush v2), taken over by "
                   "regression on fresh noise, instead of from the teacher")
    p.add_argument("--start-steps", type=int, default=None, metavar="N",
                   help="steps of that take-over regression (needs --start-from; default 1,500)")
    p.add_argument("--anchor-weight", type=float, default=None,
                   help="DMD's regression loss at this weight beside VSD: MSE to the --start-from model's one-step "
                   "sample of the same noise (needs --start-from; default 0: off)")  # fmt: skip


def _hypersd_flags(p: argparse.ArgumentParser) -> None:
    _shared(p, *DISTILL, help={"train_steps": "optimizer steps of every TSCD stage (default: the recipe's)"})


def _instaflow_refine_flags(p: argparse.ArgumentParser) -> None:
    _shared(p, "student", *DISTILL, "seed", "bf16", "lr", help={
        "student": "the exported instaflow student to continue: a one-step student (more distillation) or a "
        "2-rectified flow (more reflow); its export goes to --out, default RUNS/instaflow-refine/<its folder name>",
        "train_steps": "steps of the leg (default 2,400)",
        "out": "export folder (default: RUNS/instaflow-refine/<the student's folder name>)",
        "seed": "seed of this leg's noise and prompts (default 7000); give each leg of a chain its own",
        "bf16": "teacher pairs, the teacher's touch-up (--source-refine-*) and the student's forward passes under "
        "bfloat16 autocast",
        "lr": "the student's peak learning rate (default 1e-4)",
    })  # fmt: skip
    _pair_flags(p)
    p.add_argument("--perceptual-weight", type=float, default=None,
                   help="weight of the judge-feature perceptual loss beside the latent MSE to the target (default 1; "
                   "0: latent MSE alone)")
    p.add_argument("--colour-weight", type=float, default=None,
                   help="weight of the perceptual loss's pooled-colour term (default 0: judge features only)")
    _source_refine_flags(p, "the one-step student's own sample of fresh noise")
    _dmd_flags(p, "add DMD distribution matching (real score: the teacher with CFG; fake score: a LoRA on the "
               "student's samples) at this weight beside the regression (default: off)")  # fmt: skip


def _hypersd_refine_flags(p: argparse.ArgumentParser) -> None:
    _shared(p, "student", *DISTILL, "seed", "bf16", "lr", help={
        "student": "the exported hypersd LoRA folder to continue",
        "train_steps": "steps of the leg (default 1,500)",
        "out": "export folder (default: RUNS/hypersd-refine/<the student's folder name>)",
        "seed": "seed of this leg's noise and prompts (default 9500); give each leg of a chain its own",
        "bf16": "the teacher pairs and the teacher's touch-up under bfloat16 autocast (the LoRA's own passes stay fp32)",
        "lr": "the LoRA's peak learning rate (default 2e-4)",
    })  # fmt: skip
    _dmd_flags(p, "weight of the DMD term on the 1-step samples (default 1; 0 turns it off)")
    p.add_argument("--tscd-weight", type=float, default=None,
                   help="weight of the k = 1 TSCD loss that keeps the multi-step jumps (default 1); 0 trains a LoRA "
                   "for one step only")
    p.add_argument("--one-step-timestep", type=int, default=None, metavar="T",
                   help="the timestep the 1-step sample feeds pure noise at, in training and in the export, "
                   "in [1, 999] (default: the student's)")
    p.add_argument("--rank", type=int, default=None,
                   help="widen the student's LoRA to this rank before training, keeping its update exactly "
                   "(default: its own rank)")
    p.add_argument("--export-rank", type=int, default=None,
                   help="store the trained LoRA at this lower rank, each layer's best approximation (SVD); "
                   "a finished run re-exports without training again (default: as trained)")
    p.add_argument("--ema-decay", type=float, default=None,
                   help="export an exponential moving average of the LoRA at this decay in (0, 1) instead of its "
                   "last weights (default: the last weights)")
    p.add_argument("--regression-weight", type=float, default=None,
                   help="weight of DMD's regression loss (latent MSE + judge-feature perceptual) on teacher ODE "
                   "pairs, a --regression-source's samples or, with --source-refine-* alone, the LoRA's own refined "
                   "samples (default 0.25; turns the term on)")
    p.add_argument("--perceptual-weight", type=float, default=None,
                   help="weight of the regression term's judge-feature perceptual loss beside its latent MSE "
                   "(default 1)")
    _pair_flags(p, "; turns the regression term on")
    p.add_argument("--regression-source", type=Path, default=None, metavar="FOLDER",
                   help="regress the 1-step sample onto this one-step instaflow student's sample of the same fresh "
                   "noise instead of onto teacher ODE pairs")
    p.add_argument("--regression-steps", type=int, nargs="+", default=None, metavar="K",
                   help="with --source-refine-* alone: the served step counts (of 1, 2, 4, 8) whose own samples the "
                   "LoRA regresses onto their teacher touch-up, one drawn per batch (default 1)")
    _source_refine_flags(p, "each regression target (a --regression-source's sample, or without one the LoRA's "
                         "own sample of fresh noise)")  # fmt: skip


STAGE_FLAGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "judge": _judge_flags,
    "vae": _vae_flags,
    "decoder": _decoder_flags,
    "teacher": _teacher_flags,
    "instaflow": _instaflow_flags,
    "swiftbrush": _swiftbrush_flags,
    "hypersd": _hypersd_flags,
    "instaflow-refine": _instaflow_refine_flags,
    "hypersd-refine": _hypersd_refine_flags,
}


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a stage of the shapes world (flags: flashstep train STAGE --help)",
                       description="Train one recipe; each stage takes only its own flags.")  # fmt: skip
    stages = t.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, recipe in RECIPES.items():
        p = stages.add_parser(stage, help=recipe.summary, description=f"flashstep train {stage}: {recipe.summary}.")
        STAGE_FLAGS[stage](p)
        p.set_defaults(func=run, stage_parser=p)


# ----- from flags to a recipe run -----


class FlagError(Exception):
    """A flag combination the command line refuses; `run` reports it as `parser.error`."""


def run(args: argparse.Namespace) -> int:
    """Build the stage's config from its flags (any ValueError names the field: exit 2), then train."""
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        job = BUILDERS[args.stage](args)
    except (FlagError, ValueError) as err:
        args.stage_parser.error(str(err))
    report = job()
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2))
    return 0


def _arch(args: argparse.Namespace):
    from flashstep.training.architecture import ShapesArch

    return ShapesArch.tiny() if args.tiny else ShapesArch()


def _judge(args: argparse.Namespace):
    from flashstep.training.judge import JUDGE_DIR

    _, config, train = RECIPES["judge"].load()
    cfg = config(steps=args.train_steps or config.steps)
    return lambda: train(cfg, args.out or JUDGE_DIR)


def _vae(args: argparse.Namespace):
    module, _, train = RECIPES["vae"].load()
    legs = module.vae_recipe(args.train_steps, _arch(args))
    return lambda: train(Path(args.runs) / "vae", *legs)[1]


def _decoder(args: argparse.Namespace):
    module, _, train = RECIPES["decoder"].load()
    legs = module.decoder_recipe(args.train_steps, _arch(args))

    def job() -> dict:
        vae, report = train(Path(args.runs) / "decoder", args.vae, legs)
        if args.out is not None:  # in the refined folder's dtype, so it drops in where that one was
            vae.to(module.stored_dtype(args.vae)).save_pretrained(args.out)
        return report

    return job


def _teacher(args: argparse.Namespace):
    from flashstep.models.registry import SHIPPED_MODELS_DIR

    module, config, train = RECIPES["teacher"].load()
    cfg = config(steps=args.train_steps or config.steps, arch=_arch(args))
    if args.tiny:
        cfg = dataclasses.replace(cfg, **module.TINY)
    runs = Path(args.runs)
    out = args.out or SHIPPED_MODELS_DIR / "shapes-teacher"
    return lambda: train(cfg, args.vae or runs / "vae" / "vae", runs / "teacher", out)


def _distilled(args: argparse.Namespace):
    """A distillation recipe on `--teacher`; its exports go to `--out` (default: the shipped models)."""
    from flashstep.models.registry import SHIPPED_MODELS_DIR

    recipe = RECIPES[args.stage]
    module, config, train = recipe.load()
    cfg = config()
    if args.tiny:
        cfg = dataclasses.replace(cfg, **module.TINY)
    if args.train_steps is not None:  # 0 is a length too: swiftbrush --start-from with 0 exports the take-over alone
        lengths = {}
        for f in dataclasses.fields(cfg):
            if f.name in STEP_FIELDS:
                value = getattr(cfg, f.name)
                lengths[f.name] = (args.train_steps,) * len(value) if isinstance(value, tuple) else args.train_steps
        cfg = dataclasses.replace(cfg, **lengths)
    if args.stage == "swiftbrush":
        cfg = _swiftbrush_options(cfg, args)
    if getattr(args, "bf16", False):
        cfg = dataclasses.replace(cfg, bf16=True)
    out = Path(args.out or SHIPPED_MODELS_DIR)
    teacher = Path(args.teacher or SHIPPED_MODELS_DIR / "shapes-teacher")
    run_dir = Path(args.runs) / args.stage
    return lambda: train(cfg, run_dir, *(out / name for name in recipe.exports), teacher_dir=teacher)


def _swiftbrush_options(cfg, args: argparse.Namespace):
    """The swiftbrush flags on its config, SwiftBrush v2's start (`--start-from`, `--start-steps`) included."""
    from flashstep.training.warm_start import WarmStartConfig

    range_ = tuple(args.guidance_range) if args.guidance_range else None
    given = {"lr": args.lr, "guidance_range": range_, "lora_warmup": args.lora_warmup, "prediction": args.prediction,
             "anchor_weight": args.anchor_weight}  # fmt: skip
    given = {field: value for field, value in given.items() if value}
    if args.start_from is not None:
        if args.prediction == "flow" and args.start_steps:
            raise FlagError("--start-steps sets a take-over regression, but a --prediction flow student starts "
                            "from the --start-from weights as they are")  # fmt: skip
        start = WarmStartConfig(source=str(args.start_from))
        if args.tiny:
            start = dataclasses.replace(start, steps=2, batch_size=2, save_every=1)
        given["warm_start"] = dataclasses.replace(start, steps=args.start_steps or start.steps)
    elif args.start_steps:
        raise FlagError("--start-steps needs --start-from FOLDER: the one-step student to start from")
    return dataclasses.replace(cfg, **given)  # the config names a field that needs --start-from


def _refinement_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """(export folder, teacher folder) of a `*-refine` stage."""
    from flashstep.models.registry import SHIPPED_MODELS_DIR

    out = args.out or Path(args.runs) / args.stage / Path(args.student).name
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
    return dataclasses.replace(dm, **given)


REFINE_FLAGS = {"source_refine_from": "timestep", "source_refine_steps": "steps", "source_refine_guidance": "guidance"}


def _teacher_refinement(args: argparse.Namespace):
    """The `--source-refine-*` flags as a `TeacherRefinement`, or None where none is given."""
    from flashstep.training.teacher_refinement import TeacherRefinement

    given = {field: getattr(args, name) for name, field in REFINE_FLAGS.items() if getattr(args, name) is not None}
    return TeacherRefinement(**given, bf16=args.bf16) if given else None


def _instaflow_refine(args: argparse.Namespace):
    """Continue an exported instaflow student (`--student`); export to `--out`."""
    from flashstep.training.distribution_matching import DistributionMatchingConfig

    module, _, train = RECIPES["instaflow-refine"].load()
    out, teacher = _refinement_paths(args)
    cfg = module.refine_config()
    if args.tiny:
        cfg = dataclasses.replace(cfg, **module.TINY)
    if args.train_steps:
        n = args.train_steps
        cfg = dataclasses.replace(cfg, distill_steps=n, perceptual_steps=n, reflow_steps=n)
    given = {
        "pairs": args.pairs, "pair_start": args.pairs_from, "colour_weight": args.colour_weight, "lr": args.lr,
        "bf16": args.bf16,
    }  # fmt: skip
    chosen = {field: value for field, value in given.items() if value}
    if args.perceptual_weight is not None:  # 0 is a real choice here (latent MSE alone)
        chosen["perceptual_weight"] = args.perceptual_weight
    if args.seed is not None:
        chosen["seed"] = args.seed
    cfg = dataclasses.replace(cfg, **chosen)  # the config checks the loss weights' range and names the field
    if (refine := _teacher_refinement(args)) is not None:
        if args.pairs or args.pairs_from:
            raise FlagError("--source-refine-* trains on the student's own refined samples of fresh noise, "
                            "not on teacher pairs; drop --pairs / --pairs-from")  # fmt: skip
        cfg = dataclasses.replace(cfg, self_refine=refine)
    if args.dmd_weight:
        dm = _matching(_dmd_config(DistributionMatchingConfig(weight=args.dmd_weight), args), cfg.distill_steps)
        cfg = dataclasses.replace(cfg, distribution_matching=dm)
    elif flags := _dmd_flags_given(args):
        raise FlagError(f"{' / '.join(flags)} needs --dmd-weight (the DMD term is off without it)")
    run_dir = Path(args.runs) / "instaflow-refine"
    return lambda: train(cfg, run_dir, args.student, out, teacher_dir=teacher)


def _hypersd_refine(args: argparse.Namespace):
    """Hyper-SD's score-distillation stage on an exported hypersd LoRA (`--student`); export to `--out`."""
    module, config, train = RECIPES["hypersd-refine"].load()
    out, teacher = _refinement_paths(args)
    cfg = config()
    if args.tiny:
        cfg = dataclasses.replace(cfg, **module.TINY)
    if args.train_steps:
        cfg = dataclasses.replace(cfg, steps=args.train_steps)
    if args.lr:
        cfg = dataclasses.replace(cfg, lr=args.lr)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    if args.regression_source:
        if args.pairs or args.pairs_from:
            raise FlagError("--regression-source replaces the teacher pairs; drop --pairs / --pairs-from")
        reg = module.SourceRegressionConfig(str(args.regression_source), refine=_teacher_refinement(args))
        cfg = dataclasses.replace(cfg, regression=dataclasses.replace(reg, weight=args.regression_weight or reg.weight))
    elif (refine := _teacher_refinement(args)) is not None:  # no source: the LoRA's own samples, refined
        if args.pairs or args.pairs_from:
            raise FlagError("--source-refine-* without --regression-source trains on the LoRA's own refined samples "
                            "of fresh noise, not on teacher pairs; drop --pairs / --pairs-from")  # fmt: skip
        reg = module.SelfRegressionConfig(refine=refine, sample_steps=tuple(args.regression_steps or (1,)))
        cfg = dataclasses.replace(cfg, regression=dataclasses.replace(reg, weight=args.regression_weight or reg.weight))
    elif args.perceptual_weight is not None and not (args.pairs or args.regression_weight):
        raise FlagError("--perceptual-weight weighs the regression term; add --regression-source, "
                        "--source-refine-* or --pairs")  # fmt: skip
    elif args.pairs or args.regression_weight:
        reg = module.PairRegressionConfig(bf16=args.bf16)
        if args.tiny:
            reg = dataclasses.replace(reg, **module.TINY_PAIRS)
        given = {"pairs": args.pairs, "pair_start": args.pairs_from, "weight": args.regression_weight}
        cfg = dataclasses.replace(cfg, regression=dataclasses.replace(reg, **{k: v for k, v in given.items() if v}))
    if args.regression_steps and not isinstance(cfg.regression, module.SelfRegressionConfig):
        raise FlagError("--regression-steps picks the step counts of the LoRA's own refined samples; "
                        "add --source-refine-* without --regression-source")  # fmt: skip
    weight = cfg.matching.weight if args.dmd_weight is None else args.dmd_weight
    if weight == 0:  # DMD off: the leg is TSCD and/or regression
        if flags := _dmd_flags_given(args):
            raise FlagError(f"{' / '.join(flags)} needs a DMD term, but --dmd-weight is 0")
        matching = None
    else:
        matching = _matching(_dmd_config(dataclasses.replace(cfg.matching, weight=weight), args), cfg.steps)
    if args.perceptual_weight is not None:
        cfg = dataclasses.replace(cfg, regression=dataclasses.replace(cfg.regression, perceptual_weight=args.perceptual_weight))
    cfg = dataclasses.replace(
        cfg, one_step_timestep=args.one_step_timestep, rank=args.rank, export_rank=args.export_rank,
        tscd_weight=cfg.tscd_weight if args.tscd_weight is None else args.tscd_weight, matching=matching,
        ema_decay=args.ema_decay,
    )  # fmt: skip
    run_dir = Path(args.runs) / "hypersd-refine"
    return lambda: train(cfg, run_dir, args.student, out, teacher_dir=teacher)


# Stage -> builder: parsed flags -> a no-argument job that trains and returns the report.
BUILDERS: dict[str, Callable[[argparse.Namespace], Callable[[], dict]]] = {
    "judge": _judge,
    "vae": _vae,
    "decoder": _decoder,
    "teacher": _teacher,
    "instaflow": _distilled,
    "swiftbrush": _distilled,
    "hypersd": _distilled,
    "instaflow-refine": _instaflow_refine,
    "hypersd-refine": _hypersd_refine,
}
