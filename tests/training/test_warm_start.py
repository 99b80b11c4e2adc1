"""SwiftBrush v2's start: a swiftbrush student takes over a one-step instaflow student's map, then VSD goes on."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from flashstep.models.denoiser import Conditioning, Denoiser
from flashstep.models.engine import Engine
from flashstep.models.families.swiftbrush import sample_swiftbrush
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.training.checkpointing import TRAIN_STATE
from flashstep.training.distill import load_teacher
from flashstep.training.recipes.swiftbrush import (
    STUDENT_TIMESTEP,
    SwiftBrushTrainConfig,
    student_x0,
    train_swiftbrush,
)
from flashstep.training.rectified_flow import one_step
from flashstep.training.warm_start import WarmStartConfig, load_source, warm_start

PROMPTS = ["a red circle", "a blue square", "a green star on the left", "a small yellow triangle"]


def _x0(teacher):
    abar_999 = teacher.alphas_cumprod[STUDENT_TIMESTEP]
    return lambda unet, z, embeds: student_x0(unet, z, embeds, abar_999)


def _gap(teacher, student, source) -> float:
    """Latent MSE between the swiftbrush student's and the source's one-step samples on fixed noise."""
    embeds = teacher.encode_prompts(PROMPTS)
    z = torch.randn((len(PROMPTS), *teacher.latent_shape), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return F.mse_loss(_x0(teacher)(student, z, embeds), one_step(source, z, embeds)).item()


def test_the_source_must_be_a_one_step_instaflow_student(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    with pytest.raises(ValueError, match="not a one-step instaflow student \\(family teacher"):
        load_source(tiny_teacher_dir, teacher)


@pytest.mark.slow
def test_the_student_moves_onto_the_sources_map_on_fresh_noise(tiny_teacher_dir, tiny_instaflow_dir, random_judge, tmp_path):
    teacher = load_teacher(tiny_teacher_dir)
    source = load_source(tiny_instaflow_dir, teacher)
    cfg = WarmStartConfig(source=str(tiny_instaflow_dir), steps=30, batch_size=4, lr=2e-3, warmup=1, ema_decay=0.0,
                          perceptual_weight=0.1, save_every=10)  # fmt: skip
    before = _gap(teacher, load_teacher(tiny_teacher_dir).unet, source)  # the student starts as the teacher
    student, seconds = warm_start(teacher, _x0(teacher), cfg, tmp_path / "run", judge=random_judge, progress=False)
    after = _gap(teacher, student, source)
    assert seconds > 0
    assert after < 0.5 * before, (before, after)


@pytest.mark.slow
def test_the_take_over_resumes_where_it_stopped(tiny_teacher_dir, tiny_instaflow_dir, random_judge, tmp_path):
    teacher = load_teacher(tiny_teacher_dir)
    cfg = WarmStartConfig(source=str(tiny_instaflow_dir), steps=3, batch_size=2, save_every=2, warmup=1)
    run = tmp_path / "run"
    warm_start(teacher, _x0(teacher), replace(cfg, steps=2), run, judge=random_judge, progress=False)
    assert (run / TRAIN_STATE).exists()
    resumed, _ = warm_start(teacher, _x0(teacher), cfg, run, judge=random_judge, progress=False)
    again, _ = warm_start(teacher, _x0(teacher), cfg, run, judge=random_judge, progress=False)  # done: reloads
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), again.state_dict().values(), strict=True))


@pytest.mark.slow
def test_swiftbrush_from_a_warm_start_exports_the_take_over_with_its_provenance(
    tiny_teacher_dir, tiny_instaflow_dir, tmp_path
):
    start = WarmStartConfig(source=str(tiny_instaflow_dir), steps=2, batch_size=2, save_every=1, warmup=1)
    cfg = SwiftBrushTrainConfig(steps=0, batch_size=2, lora_rank=4, warm_start=start)
    out = tmp_path / "swiftbrush"
    report = train_swiftbrush(cfg, tmp_path / "run", out, teacher_dir=tiny_teacher_dir, progress=False)
    assert report["steps"] == 0 and "warm_start_seconds" in report

    provenance = FlashstepConfig.load(out).provenance
    assert provenance["start"].startswith("tiny-instaflow")
    assert (provenance["warm_start"]["source"], provenance["warm_start"]["steps"]) == ("tiny-instaflow", 2)

    # With no VSD steps the export is the take-over itself, served by the swiftbrush sampler.
    teacher = load_teacher(tiny_teacher_dir)
    taken_over, _ = warm_start(teacher, _x0(teacher), start, tmp_path / "run" / "warm_start", progress=False)
    exported = Engine.load(out)
    result = exported.generate([GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=1)])
    assert result.unet_evals == 1
    served = load_teacher(out).unet.state_dict()
    assert all(torch.equal(served[k], v.half().float()) for k, v in taken_over.state_dict().items())  # stored fp16


def test_the_anchor_is_the_mse_to_the_sources_sample_from_the_students_own_noise(tiny_teacher_dir, tiny_instaflow_dir):
    """DMD's regression loss beside VSD: the same z feeds the student and the source."""
    from flashstep.training.lora import lora_teacher
    from flashstep.training.recipes.swiftbrush import student_vsd

    teacher = load_teacher(tiny_teacher_dir)
    source = load_source(tiny_instaflow_dir, teacher)
    cfg = SwiftBrushTrainConfig(batch_size=2, lora_rank=4, anchor_weight=0.5,
                                warm_start=WarmStartConfig(source=str(tiny_instaflow_dir)))  # fmt: skip
    guide = lora_teacher(teacher, cfg.lora_rank, cfg.lora_targets)
    gen = torch.Generator().manual_seed(7)
    z = torch.randn((2, *teacher.latent_shape), generator=torch.Generator().manual_seed(7))  # student_vsd's first draw
    losses, batch = student_vsd(teacher, teacher.unet, guide, PROMPTS[:2], cfg, gen, source)
    with torch.no_grad():
        want = F.mse_loss(_x0(teacher)(teacher.unet, z, batch.embeds), one_step(source, z, batch.embeds))
    assert set(losses) == {"vsd", "anchor"}
    assert torch.allclose(losses["anchor"], want)
    without, _ = student_vsd(teacher, teacher.unet, guide, PROMPTS[:2], cfg, torch.Generator().manual_seed(7))
    assert set(without) == {"vsd"}
    with pytest.raises(ValueError, match="anchor_weight needs warm_start"):
        SwiftBrushTrainConfig(anchor_weight=0.5)


@pytest.mark.slow
def test_an_anchored_vsd_run_logs_both_losses_and_records_its_weight(tiny_teacher_dir, tiny_instaflow_dir, tmp_path):
    start = WarmStartConfig(source=str(tiny_instaflow_dir), steps=1, batch_size=2, save_every=1, warmup=1)
    cfg = SwiftBrushTrainConfig(steps=2, batch_size=2, lora_rank=4, save_every=2, warmup=1, anchor_weight=0.5,
                                warm_start=start)  # fmt: skip
    out = tmp_path / "swiftbrush"
    train_swiftbrush(cfg, tmp_path / "run", out, teacher_dir=tiny_teacher_dir, progress=False)
    losses = [line for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all('"anchor"' in line and '"vsd"' in line for line in losses)
    assert FlashstepConfig.load(out).provenance["anchor_weight"] == 0.5


def test_a_flow_student_starts_from_the_sources_weights_and_is_served_with_its_map(tiny_teacher_dir, tiny_instaflow_dir, tmp_path):
    """SwiftBrush v2 starts from SD-Turbo's weights: with the source's own parameterisation, no regression."""
    start = WarmStartConfig(source=str(tiny_instaflow_dir))  # its take-over steps are not used
    cfg = SwiftBrushTrainConfig(steps=0, batch_size=2, lora_rank=4, prediction="flow", anchor_weight=0.25, warm_start=start)
    out = tmp_path / "swiftbrush"
    report = train_swiftbrush(cfg, tmp_path / "run", out, teacher_dir=tiny_teacher_dir, progress=False)
    assert report["warm_start_seconds"] == 0 and not (tmp_path / "run" / "warm_start").exists()

    config = FlashstepConfig.load(out)
    assert (config.family, config.prediction, config.conditioning_timestep) == ("swiftbrush", "flow_match", 1000)  # exported with diffusers' flow sign
    assert config.provenance["start"].startswith("tiny-instaflow's weights")

    teacher = load_teacher(tiny_teacher_dir)
    source = load_source(tiny_instaflow_dir, teacher)
    engine = Engine.load(out)
    embeds = teacher.encode_prompts(PROMPTS[:2])
    z = torch.randn((2, *teacher.latent_shape), generator=torch.Generator().manual_seed(3))
    model = Denoiser(engine.unet, Conditioning(prompt_embeds=embeds), engine.config.prediction, engine.schedule)
    with torch.no_grad():
        served = sample_swiftbrush(model, z, [config.conditioning_timestep], engine.schedule, [])
        trained = student_x0(engine.unet, z, embeds, teacher.alphas_cumprod[STUDENT_TIMESTEP], "flow")
        want = one_step(source, z, embeds)
    assert torch.allclose(served, trained, atol=1e-4)
    assert torch.allclose(served, want, atol=2e-2)  # the source's map, up to the fp16 export
    result = engine.generate([GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=1)])
    assert result.unet_evals == 1


def test_a_flow_student_needs_a_source_to_start_from():
    with pytest.raises(ValueError, match="prediction 'flow' needs warm_start"):
        SwiftBrushTrainConfig(prediction="flow")
