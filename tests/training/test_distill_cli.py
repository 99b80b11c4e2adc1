"""`flashstep train <recipe> --tiny` distils a teacher folder into servable exports from the command line."""

import io
import json
import re
import shutil
from contextlib import redirect_stderr

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from flashstep.cli import main as flashstep_main
from flashstep.models.engine import load_engine
from flashstep.models.errors import InvalidRequestError
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.training.autoencoder import stored_dtype
from flashstep.training.recipes import RECIPES

DISTILL_STAGES = ("hypersd", "instaflow", "swiftbrush")


def refused(argv: list[str], pattern: str) -> None:
    """`flashstep ARGV` stops with argparse's usage error (exit code 2) and a message matching `pattern`."""
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as stopped:
        flashstep_main(argv)
    assert stopped.value.code == 2
    assert re.search(pattern, err.getvalue()), err.getvalue()


@pytest.mark.parametrize("stage", DISTILL_STAGES)
@pytest.mark.slow
def test_train_recipe_from_the_command_line_exports_loadable_models(stage, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "models"
    argv = ["train", stage, "--tiny", "--teacher", str(tiny_teacher_dir), "--out", str(out), "--runs", str(tmp_path / "runs")]
    assert flashstep_main(argv) == 0
    assert "seconds" in capsys.readouterr().out
    exports = RECIPES[stage].exports
    for name in exports:
        config = FlashstepConfig.load(out / name)
        engine = load_engine(str(out / name), models_root=tiny_teacher_dir.parent)
        steps = config.default_steps
        result = engine.generate([GenerationRequest(prompt="a blue star", seed=1, num_inference_steps=steps)])
        assert result.images[0].size == (64, 64)


@pytest.mark.slow
def test_bf16_reaches_the_instaflow_recipe_and_its_exports_say_so(tiny_teacher_dir, tmp_path):
    """`train instaflow --bf16` runs pairs, reflow and distillation under bfloat16 autocast, as the
    refinement legs do; a stage with no bf16 path refuses the flag instead of ignoring it."""
    out = tmp_path / "models"
    argv = ["train", "instaflow", "--tiny", "--bf16", "--teacher", str(tiny_teacher_dir), "--runs", str(tmp_path / "runs")]
    assert flashstep_main([*argv, "--out", str(out)]) == 0
    assert json.loads((tmp_path / "runs" / "instaflow" / "instaflow_report.json").read_text())["config"]["bf16"] is True
    for name in RECIPES["instaflow"].exports:
        assert FlashstepConfig.load(out / name).provenance["bf16"] is True
    for stage in ("swiftbrush", "hypersd", "teacher", "vae"):
        refused(["train", stage, "--tiny", "--bf16", "--teacher", str(tiny_teacher_dir), "--runs", str(tmp_path / stage)], "unrecognized arguments: --bf16")


def test_train_teacher_on_a_given_vae_from_the_command_line(tiny_teacher_dir, tmp_path, capsys):
    """`--vae` trains a teacher on an existing VAE (e.g. the shipped one) instead of RUNS/vae/vae."""
    out = tmp_path / "teacher"
    argv = ["train", "teacher", "--tiny", "--train-steps", "2", "--vae", str(tiny_teacher_dir / "vae"), "--out", str(out)]
    assert flashstep_main([*argv, "--runs", str(tmp_path / "runs")]) == 0
    assert "final_loss" in capsys.readouterr().out
    assert FlashstepConfig.load(out).family == "teacher"
    result = load_engine(str(out)).generate([GenerationRequest(prompt="a blue star", seed=1, num_inference_steps=2)])
    assert result.images[0].size == (64, 64)


@pytest.mark.slow
def test_refine_a_model_folders_decoder_from_the_command_line(tiny_teacher_dir, tmp_path, capsys):
    """`train decoder --vae` refines an exported VAE's decoder and writes a VAE folder that drops
    into the model folder in place of the old one: same dtype, encoder and scaling factor."""
    out = tmp_path / "vae"
    argv = ["train", "decoder", "--tiny", "--train-steps", "3", "--vae", str(tiny_teacher_dir / "vae"), "--out", str(out)]
    assert flashstep_main([*argv, "--runs", str(tmp_path / "runs")]) == 0
    assert "recon_mae_255" in capsys.readouterr().out
    old, new = (AutoencoderKL.from_pretrained(d) for d in (tiny_teacher_dir / "vae", out))
    assert stored_dtype(out) == stored_dtype(tiny_teacher_dir / "vae")
    assert new.config.scaling_factor == old.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(old.encoder.state_dict().values(), new.encoder.state_dict().values(), strict=True))
    model = tmp_path / "model"
    shutil.copytree(tiny_teacher_dir, model)
    shutil.rmtree(model / "vae")
    shutil.copytree(out, model / "vae")
    result = load_engine(str(model)).generate([GenerationRequest(prompt="a blue star", seed=1, num_inference_steps=2)])
    assert result.images[0].size == (64, 64)


def test_refining_a_decoder_needs_the_vae_to_refine(tmp_path):
    refused(["train", "decoder", "--tiny", "--train-steps", "1", "--runs", str(tmp_path)], "--vae")


@pytest.mark.slow
def test_refine_an_instaflow_student_from_the_command_line(tiny_teacher_dir, tmp_path, capsys):
    runs, models = str(tmp_path / "runs"), tmp_path / "models"
    common = ["--tiny", "--teacher", str(tiny_teacher_dir), "--runs", runs]
    assert flashstep_main(["train", "instaflow", *common, "--out", str(models)]) == 0
    refined = tmp_path / "refined"
    argv = ["train", "instaflow-refine", *common, "--train-steps", "2", "--student", str(models / "shapes-instaflow")]
    options = ["--dmd-weight", "0.5", "--dmd-guidance", "3", "--colour-weight", "5", "--pairs", "12", "--pairs-from", "8", "--lr", "3e-4"]
    options += ["--fake-updates", "3"]
    assert flashstep_main([*argv, *options, "--bf16", "--out", str(refined)]) == 0
    assert "refine_seconds" in capsys.readouterr().out
    leg = FlashstepConfig.load(refined).provenance["refinements"][0]
    assert (leg["steps"], leg["colour_weight"], leg["pairs"], leg["lr"]) == (2, 5.0, 12, 3e-4)
    assert (leg["pair_start"], leg["bf16"]) == (8, True)
    pairs = sorted(p.name for p in (tmp_path / "runs" / "instaflow-refine" / "pairs").glob("pairs_*"))
    assert pairs == ["pairs_0002.safetensors", "pairs_0003.safetensors", "pairs_0004.safetensors"]  # 8..19, by 4
    # Distribution matching joins after a fake-score warm-up that fits inside a short run.
    assert (leg["distribution_matching"]["weight"], leg["distribution_matching"]["fake_warmup"]) == (0.5, 1)
    assert (leg["distribution_matching"]["guidance"], leg["distribution_matching"]["fake_updates"]) == (3.0, 3)
    result = load_engine(str(refined)).generate([GenerationRequest(prompt="a blue star", seed=1)])
    assert result.images[0].size == (64, 64)

    # With --source-refine-* the student trains toward its own samples as the teacher refines them: no pairs.
    self_refined = ["--source-refine-from", "400", "--source-refine-steps", "2", "--runs", str(tmp_path / "self-runs")]
    weighted = ["--perceptual-weight", "3"]
    assert flashstep_main([*argv[:-6], *argv[-4:], *self_refined, *weighted, "--out", str(tmp_path / "self")]) == 0
    leg = FlashstepConfig.load(tmp_path / "self").provenance["refinements"][0]
    assert (leg["pairs"], leg["self_refine"]) == (0, {"timestep": 400, "steps": 2, "guidance": 2.0, "bf16": False})
    assert leg["perceptual_weight"] == 3.0
    refused([*argv, *self_refined, "--perceptual-weight", "-1", "--out", str(tmp_path / "self")], "instaflow-refine: error: `perceptual_weight` must be >= 0 but is -1")
    refused([*argv, *self_refined, "--colour-weight", "-5", "--out", str(tmp_path / "self")], "instaflow-refine: error: `colour_weight` must be >= 0 but is -5")
    assert not (tmp_path / "self-runs" / "instaflow-refine" / "pairs").exists()
    refused([*argv, *self_refined, "--pairs", "12", "--out", str(tmp_path / "self")], "not on teacher pairs; drop --pairs / --pairs-from")
    refused([*argv, "--source-refine-from", "1000", "--out", str(tmp_path / "self")], "instaflow-refine: error: `timestep` must be in \\[1, 999\\] but is 1000")

    # The 2-rectified flow continues its reflow; with no --out its export is named after the student.
    argv = ["train", "instaflow-refine", *common, "--train-steps", "2", "--student", str(models / "shapes-2rf")]
    assert flashstep_main(argv) == 0
    leg = FlashstepConfig.load(tmp_path / "runs" / "instaflow-refine" / "shapes-2rf").provenance["refinements"][0]
    assert (leg["recipe"], leg["steps"]) == ("reflow", 2)


def test_refining_instaflow_needs_the_student_to_refine(tmp_path):
    refused(["train", "instaflow-refine", "--tiny", "--runs", str(tmp_path)], "--student")


def test_dmd_guidance_needs_the_dmd_term_and_a_scale_of_at_least_zero(tmp_path):
    argv = ["train", "instaflow-refine", "--tiny", "--runs", str(tmp_path), "--student", str(tmp_path / "s")]
    refused([*argv, "--dmd-guidance", "2"], "--dmd-guidance needs --dmd-weight")
    refused([*argv, "--dmd-weight", "1", "--dmd-guidance", "-1"], "`guidance` \\(the real score's CFG scale\\) must be >= 0 but is -1")


def test_fake_updates_need_the_dmd_term_and_at_least_one_step(tmp_path):
    for stage, off in (("instaflow-refine", "needs --dmd-weight"), ("hypersd-refine", "needs a DMD term")):
        argv = ["train", stage, "--tiny", "--runs", str(tmp_path), "--student", str(tmp_path / "s")]
        refused([*argv, "--dmd-weight", "0", "--fake-updates", "5"], f"--fake-updates {off}")
        refused([*argv, "--dmd-weight", "1", "--fake-updates", "0"], f"{stage}: error: fake_updates must be >= 1")


@pytest.mark.slow
def test_swiftbrush_from_an_instaflow_students_start_on_the_command_line(tiny_teacher_dir, tmp_path):
    runs, models = str(tmp_path / "runs"), tmp_path / "models"
    common = ["--tiny", "--teacher", str(tiny_teacher_dir), "--runs", runs]
    assert flashstep_main(["train", "instaflow", *common, "--out", str(models)]) == 0
    start = ["--start-from", str(models / "shapes-instaflow"), "--start-steps", "3", "--lr", "5e-5"]
    start += ["--guidance-range", "2", "6", "--prediction", "v_prediction"]
    out = tmp_path / "sb"
    # --train-steps 0: the take-over alone, exported as a swiftbrush student.
    assert flashstep_main(["train", "swiftbrush", *common, *start, "--train-steps", "0", "--out", str(out)]) == 0
    provenance = FlashstepConfig.load(out / "shapes-swiftbrush").provenance
    assert (provenance["steps"], provenance["lr"], provenance["warm_start"]["steps"]) == (0, 5e-5, 3)
    assert provenance["warm_start"]["source"] == "shapes-instaflow"
    assert provenance["guidance"] == "PG-SB kappa ~ U(2.0, 6.0)"
    assert provenance["prediction"] == FlashstepConfig.load(out / "shapes-swiftbrush").prediction == "v_prediction"
    result = load_engine(str(out / "shapes-swiftbrush")).generate([GenerationRequest(prompt="a blue star", seed=1)])
    assert result.images[0].size == (64, 64)
    refused(["train", "swiftbrush", *common, "--start-steps", "3", "--out", str(out)], "--start-from")
    refused(["train", "swiftbrush", *common, "--anchor-weight", "0.25", "--out", str(out)], "anchor_weight needs warm_start")

    # --prediction flow: the student starts from the instaflow student's weights, with no take-over to size.
    flow = ["--start-from", str(models / "shapes-instaflow"), "--prediction", "flow", "--anchor-weight", "0.25"]
    assert flashstep_main(["train", "swiftbrush", *common, *flow, "--train-steps", "1", "--out", str(tmp_path / "fl")]) == 0
    config = FlashstepConfig.load(tmp_path / "fl" / "shapes-swiftbrush")
    assert (config.prediction, config.conditioning_timestep, config.provenance["steps"]) == ("flow_match", 1000, 1)  # exported with diffusers' flow sign
    refused(["train", "swiftbrush", *common, *flow, "--start-steps", "3", "--out", str(out)], "starts from the --start-from weights as they are")
    refused(["train", "swiftbrush", *common, "--prediction", "flow", "--out", str(out)], "prediction 'flow' needs warm_start")


@pytest.mark.slow
def test_refine_a_hypersd_lora_from_the_command_line(tiny_teacher_dir, tiny_instaflow_dir, tmp_path):
    runs, models = str(tmp_path / "runs"), tmp_path / "models"
    common = ["--tiny", "--teacher", str(tiny_teacher_dir), "--runs", runs]
    assert flashstep_main(["train", "hypersd", *common, "--out", str(models)]) == 0
    refined = tmp_path / "refined"
    argv = ["train", "hypersd-refine", *common, "--student", str(models / "shapes-hypersd"), "--dmd-weight", "2"]
    flags = ["--dmd-guidance", "2.5", "--fake-updates", "3", "--ema-decay", "0.99"]
    assert flashstep_main([*argv, *flags, "--out", str(refined)]) == 0
    leg = FlashstepConfig.load(refined).provenance["refinements"][0]
    assert (leg["steps"], leg["distribution_matching"]["weight"], leg["distribution_matching"]["guidance"]) == (2, 2.0, 2.5)
    assert (leg["distribution_matching"]["fake_updates"], leg["ema_decay"]) == (3, 0.99)
    assert leg["recipe"] == "k=1 TSCD + DMD on 1-step samples"
    at_800 = tmp_path / "at800"
    assert flashstep_main([*argv, "--one-step-timestep", "800", "--regression-weight", "1", "--out", str(at_800)]) == 0
    assert FlashstepConfig.load(at_800).timesteps["1"] == [800]
    regression = FlashstepConfig.load(at_800).provenance["refinements"][-1]["regression"]
    assert (regression["pairs"], regression["weight"]) == (4, 1.0)
    refused([*argv, "--one-step-timestep", "1000", "--out", str(at_800)], "`one_step_timestep` must be in \\[1, 999\\] but is 1000")
    wide = ["--runs", str(tmp_path / "wide-runs"), "--rank", "32", "--out", str(tmp_path / "wide")]
    assert flashstep_main([*argv, *wide]) == 0
    assert FlashstepConfig.load(tmp_path / "wide").provenance["refinements"][-1]["rank"] == 32
    narrow = [*wide[:-1], str(tmp_path / "narrow"), "--export-rank", "16"]  # the finished run, stored at rank 16
    assert flashstep_main([*argv, *narrow]) == 0
    leg = FlashstepConfig.load(tmp_path / "narrow").provenance["refinements"][-1]
    assert (leg["rank"], leg["export_rank"]) == (32, 16)
    # A one-step-only leg: no TSCD term, and no regression either, so its first (warm-up) step has nothing to train.
    one_step = ["--runs", str(tmp_path / "one-runs"), "--tscd-weight", "0", "--out", str(tmp_path / "one")]
    assert flashstep_main([*argv, *one_step]) == 0
    one = FlashstepConfig.load(tmp_path / "one")
    assert one.provenance["refinements"][-1]["tscd_weight"] == 0.0
    assert (one.allowed_steps, one.default_steps, one.timesteps) == ((1,), 1, {"1": [999]})  # nothing kept 2+ steps
    with pytest.raises(InvalidRequestError, match="num_inference_steps"):
        load_engine(str(tmp_path / "one")).validate(GenerationRequest(prompt="a red circle", seed=0, num_inference_steps=2))
    # Regression alone: --dmd-weight 0 turns the DMD term (and its fake score) off.
    plain = ["--runs", str(tmp_path / "plain-runs"), "--dmd-weight", "0", "--regression-weight", "1"]
    assert flashstep_main([*argv[:-2], *plain, "--tscd-weight", "0", "--out", str(tmp_path / "plain")]) == 0
    leg = FlashstepConfig.load(tmp_path / "plain").provenance["refinements"][-1]
    assert (leg["distribution_matching"], leg["regression"]["weight"], leg["tscd_weight"]) == (None, 1.0, 0.0)
    assert leg["recipe"] == "regression on teacher ODE pairs"
    # Regression onto a one-step instaflow student's samples instead of teacher pairs.
    sourced = ["--runs", str(tmp_path / "src-runs"), "--dmd-weight", "0", "--regression-source", str(tiny_instaflow_dir)]
    weights = ["--regression-weight", "2", "--perceptual-weight", "4"]
    assert flashstep_main([*argv[:-2], *sourced, *weights, "--out", str(tmp_path / "src")]) == 0
    leg = FlashstepConfig.load(tmp_path / "src").provenance["refinements"][-1]
    assert (leg["regression"]["source"], leg["regression"]["weight"]) == (str(tiny_instaflow_dir), 2.0)
    assert leg["regression"]["perceptual_weight"] == 4.0
    refused([*argv[:-2], *sourced, "--perceptual-weight", "-1", "--out", str(tmp_path / "src")], "`perceptual_weight` must be >= 0 but is -1")
    refused([*argv, "--perceptual-weight", "4", "--out", str(tmp_path / "src")], "--perceptual-weight weighs the regression term")
    assert leg["recipe"] == "k=1 TSCD + regression on tiny-instaflow's one-step samples"
    # The source's samples touched up by the teacher before the regression takes them as targets.
    refined_src = ["--source-refine-from", "300", "--source-refine-steps", "2", "--source-refine-guidance", "2"]
    fresh = ["--runs", str(tmp_path / "src-refined-runs"), *sourced[2:]]  # a finished run dir would only re-export
    assert flashstep_main([*argv[:-2], *fresh, *refined_src, "--out", str(tmp_path / "src-refined")]) == 0
    leg = FlashstepConfig.load(tmp_path / "src-refined").provenance["refinements"][-1]
    assert leg["regression"]["refine"] == {"timestep": 300, "steps": 2, "guidance": 2.0, "bf16": False}
    assert leg["recipe"].endswith("one-step samples, refined by the teacher (t=300, 2 DDIM steps, CFG 2)")
    refused([*argv[:-2], *sourced, "--source-refine-steps", "0", "--out", str(tmp_path / "src-refined")], "`steps` must be in \\[1, timestep=300\\] but is 0")
    # With no --regression-source the --source-refine-* flags refine the LoRA's own one-step samples instead.
    own = ["--runs", str(tmp_path / "self-runs"), "--dmd-weight", "0", "--tscd-weight", "0", *weights, *refined_src]
    assert flashstep_main([*argv[:-2], *own, "--out", str(tmp_path / "self")]) == 0
    leg = FlashstepConfig.load(tmp_path / "self").provenance["refinements"][-1]
    assert (leg["regression"]["refine"]["timestep"], leg["regression"]["weight"], leg["regression"]["perceptual_weight"]) == (300, 2.0, 4.0)
    assert leg["recipe"] == "regression on its own one-step samples, refined by the teacher (t=300, 2 DDIM steps, CFG 2)"
    # --seed gives a leg its own noise and prompts (a chain's legs need not revisit one another's batches);
    # --bf16 runs the teacher's touch-up under bfloat16 autocast.
    reseeded = ["--runs", str(tmp_path / "seed-runs"), *own[2:], "--seed", "7"]
    assert flashstep_main([*argv[:-2], *reseeded, "--out", str(tmp_path / "seeded")]) == 0
    seeded = FlashstepConfig.load(tmp_path / "seeded").provenance["refinements"][-1]
    assert (seeded["seed"], leg["seed"], seeded["regression"]["refine"]["bf16"]) == (7, 9500, False)
    lora_a, lora_b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("self", "seeded"))
    assert lora_a.keys() == lora_b.keys() and any(not torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    in_bf16 = ["--runs", str(tmp_path / "bf16-runs"), *own[2:], "--bf16"]
    assert flashstep_main([*argv[:-2], *in_bf16, "--out", str(tmp_path / "bf16")]) == 0
    assert FlashstepConfig.load(tmp_path / "bf16").provenance["refinements"][-1]["regression"]["refine"]["bf16"] is True
    refused(["train", "hypersd", *common, "--seed", "7", "--out", str(models)], "unrecognized arguments: --seed")
    # --regression-steps: the LoRA's own 1- and 2-step samples, with TSCD kept so every step count stays served.
    multi = ["--runs", str(tmp_path / "multi-runs"), "--dmd-weight", "0", *weights, *refined_src, "--regression-steps", "1", "2"]
    assert flashstep_main([*argv[:-2], *multi, "--out", str(tmp_path / "multi")]) == 0
    multi_cfg = FlashstepConfig.load(tmp_path / "multi")
    assert multi_cfg.provenance["refinements"][-1]["regression"]["sample_steps"] == [1, 2]
    assert multi_cfg.provenance["refinements"][-1]["recipe"].startswith("k=1 TSCD + regression on its own 1/2-step samples")
    assert multi_cfg.allowed_steps == (1, 2, 4, 8)
    refused([*argv[:-2], *multi[:-2], "3", "--out", str(tmp_path / "multi")], "`sample_steps` must list served step counts \\[1, 2, 4, 8\\] but is \\[3\\]")
    refused([*argv[:-2], *multi, "--tscd-weight", "0", "--out", str(tmp_path / "multi")], "exports a one-step LoRA")
    refused([*argv[:-2], *sourced, "--regression-steps", "2", "--out", str(tmp_path / "src")], "--regression-steps picks the step counts")
    refused([*argv, "--source-refine-from", "300", "--pairs", "4", "--out", str(tmp_path / "self")], "the LoRA's own refined samples of fresh noise, not on teacher pairs")
    refused([*argv[:-2], *sourced, "--pairs", "4", "--out", str(tmp_path / "src")], "--regression-source replaces the teacher pairs")
    refused([*argv[:-2], "--dmd-weight", "0", "--tscd-weight", "0", "--out", str(tmp_path / "none")], "has no loss to train on")
    refused([*argv[:-2], "--dmd-weight", "0", "--dmd-guidance", "2", "--out", str(tmp_path / "none")], "--dmd-guidance needs a DMD term")
    refused([*argv, "--tscd-weight", "-1", "--out", str(tmp_path / "one")], "`tscd_weight` must be >= 0 but is -1")
    refused([*argv, "--ema-decay", "1", "--out", str(tmp_path / "one")], "`ema_decay` must be in \\(0, 1\\) but is 1.0")
    refused([*argv, "--rank", "0", "--out", str(tmp_path / "wide")], "`rank` must be a positive integer but is 0")
    result = load_engine(str(refined)).generate([GenerationRequest(prompt="a blue star", seed=1, num_inference_steps=1)])
    assert result.images[0].size == (64, 64)
    refused(["train", "hypersd-refine", *common], "--student")
