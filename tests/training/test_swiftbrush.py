"""SwiftBrush VSD: the maths by hand, the LoRA teacher, and the whole recipe on a tiny teacher end to end."""

import json
import math
from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from flashstep.models.denoiser import Conditioning, Denoiser
from flashstep.models.engine import Engine
from flashstep.models.families.swiftbrush import sample_swiftbrush
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.models.schedule import NoiseSchedule
from flashstep.training.checkpointing import TRAIN_STATE
from flashstep.training.distill import add_noise, load_teacher, unet_eps
from flashstep.training.lora import adapters_off, lora_teacher
from flashstep.training.recipes.swiftbrush import (
    SwiftBrushTrainConfig,
    guidance_scales,
    student_x0,
    train_swiftbrush,
    vsd_grad,
    vsd_loss,
)

TINY = SwiftBrushTrainConfig(steps=3, batch_size=2, save_every=2, warmup=1, lora_rank=4)


class ConstantEps(torch.nn.Module):
    """A stand-in UNet that predicts a fixed epsilon and records the timesteps it was given."""

    def __init__(self, eps: torch.Tensor) -> None:
        super().__init__()
        self.eps = eps
        self.seen_t = None

    def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
        self.seen_t = t
        return type("Out", (), {"sample": self.eps})()


def test_vsd_gradient_matches_a_hand_computation():
    eps_teacher = torch.tensor([1.0, -2.0, 0.5, 0.0]).view(2, 2, 1, 1)  # (B=2, C=2, 1, 1)
    eps_lora = torch.tensor([0.5, 1.0, 0.5, 4.0]).view(2, 2, 1, 1)
    abar_t = torch.tensor([0.75, 0.2])
    grad = vsd_grad(eps_teacher, eps_lora, abar_t)
    # (1 - abar_t) (eps_teacher - eps_lora): sample 0 weighs 0.25, sample 1 weighs 0.8.
    want = torch.tensor([0.25 * 0.5, 0.25 * -3.0, 0.8 * 0.0, 0.8 * -4.0]).view(2, 2, 1, 1)
    assert torch.allclose(grad, want)

    x0 = torch.tensor([3.0, -1.0, 2.0, 0.0]).view(2, 2, 1, 1).requires_grad_(True)
    loss = vsd_loss(x0, grad)
    # The value is 0.5 * mean(grad^2); the gradient on x0 is exactly grad / numel, never through the target.
    assert math.isclose(loss.item(), 0.5 * (0.125**2 + 0.75**2 + 0.0 + 3.2**2) / 4, rel_tol=1e-6)
    loss.backward()
    assert torch.allclose(x0.grad, want / 4)


def test_student_x0_is_the_served_one_step_sample():
    abar = torch.tensor(0.0047)
    z = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    eps = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)
    unet = ConstantEps(eps)
    x0 = student_x0(unet, z, torch.zeros(1, 3, 8), abar)
    # The student always sees t = 999 and inverts x_t = sqrt(abar) x0 + sqrt(1 - abar) eps.
    assert unet.seen_t.tolist() == [999.0]
    assert torch.allclose(x0, (z - math.sqrt(1 - 0.0047) * eps) / math.sqrt(0.0047))
    assert torch.allclose(add_noise(x0, eps, abar.view(1)), z, atol=1e-5)

    # The engine's swiftbrush sampler computes the same map from the same schedule.
    alphas = torch.linspace(0.999, 0.0047, 1000, dtype=torch.float64)
    schedule = NoiseSchedule(alphas)
    embeds = torch.zeros(1, 3, 8)
    served = sample_swiftbrush(
        Denoiser(unet, Conditioning(prompt_embeds=embeds), "epsilon", schedule), z, [999], schedule, []
    )
    assert torch.allclose(student_x0(unet, z, embeds, alphas[999].float()), served.float(), atol=1e-4)


def test_a_v_prediction_student_draws_the_sample_the_engine_serves_for_it():
    """SD-Turbo's parameterisation: x0 = sqrt(abar) z - sqrt(1 - abar) v, with no division by sqrt(abar_999)."""
    abar = torch.tensor(0.0047)
    z = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1)
    v = torch.tensor([1.5, -0.5]).view(1, 2, 1, 1)
    unet = ConstantEps(v)
    x0 = student_x0(unet, z, torch.zeros(1, 3, 8), abar, "v_prediction")
    assert torch.allclose(x0, math.sqrt(0.0047) * z - math.sqrt(1 - 0.0047) * v)
    # A unit error in the output moves x0 by sqrt(1 - abar) here, by sqrt((1 - abar) / abar) ~ 14.6 as epsilon.
    moved = student_x0(ConstantEps(v + 1), z, torch.zeros(1, 3, 8), abar, "v_prediction") - x0
    assert torch.allclose(moved, torch.full_like(moved, -math.sqrt(1 - 0.0047)))

    alphas = torch.linspace(0.999, 0.0047, 1000, dtype=torch.float64)
    schedule = NoiseSchedule(alphas)
    embeds = torch.zeros(1, 3, 8)
    served = sample_swiftbrush(
        Denoiser(unet, Conditioning(prompt_embeds=embeds), "v_prediction", schedule), z, [999], schedule, []
    )
    assert torch.allclose(student_x0(unet, z, embeds, alphas[999].float(), "v_prediction"), served.float(), atol=1e-4)
    with pytest.raises(ValueError, match="prediction"):
        SwiftBrushTrainConfig(prediction="sample")


def test_pg_sb_draws_a_guidance_scale_per_sample_and_a_fixed_scale_is_an_option():
    gen = torch.Generator().manual_seed(0)
    kappa = guidance_scales(4096, SwiftBrushTrainConfig(guidance_range=(0.5, 4.0)), gen)
    assert kappa.shape == (4096,)
    assert 0.5 <= kappa.min() < 0.6 and 3.9 < kappa.max() <= 4.0
    assert kappa.std() > 0.9  # uniform on [0.5, 4]: std 3.5 / sqrt(12) ~ 1.01
    fixed = guidance_scales(3, SwiftBrushTrainConfig(guidance=4.5), gen)
    assert fixed.tolist() == [4.5, 4.5, 4.5]


def test_lora_teacher_starts_as_the_teacher_and_with_adapters_off_stays_the_teacher(tiny_teacher_dir):
    teacher = load_teacher(tiny_teacher_dir)
    guide = lora_teacher(teacher, rank=4, targets=SwiftBrushTrainConfig().lora_targets)
    trainable = [n for n, p in guide.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("attn2.to_k" in n for n in trainable) and any("ff.net.2" in n for n in trainable)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *teacher.latent_shape, generator=gen)
    t = torch.tensor([20, 980])
    embeds = teacher.encode_prompts(["a red circle", ""])
    with torch.no_grad():
        want = unet_eps(teacher.unet, x, t, embeds)
        # PEFT starts the LoRA up-projections at zero.
        assert torch.allclose(unet_eps(guide, x, t, embeds), want, atol=1e-6)
        for p in guide.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        assert not torch.allclose(unet_eps(guide, x, t, embeds), want, atol=1e-3)
        with adapters_off(guide):
            assert torch.allclose(unet_eps(guide, x, t, embeds), want, atol=1e-6)
        with pytest.raises(RuntimeError), adapters_off(guide):
            raise RuntimeError("the adapters come back on even after an error")
        assert not torch.allclose(unet_eps(guide, x, t, embeds), want, atol=1e-3)


@pytest.mark.slow
def test_swiftbrush_recipe_trains_resumes_and_exports_a_servable_one_step_folder(tiny_teacher_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "swiftbrush"
    # Stop after two steps, then resume to three.
    train_swiftbrush(replace(TINY, steps=2), run, None, teacher_dir=tiny_teacher_dir, progress=False)
    report = train_swiftbrush(TINY, run, out, teacher_dir=tiny_teacher_dir, progress=False)
    assert report["steps"] == 3 and report["config"]["guidance"] is None

    losses = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [h["step"] for h in losses] == [1, 2, 3]
    assert all(math.isfinite(h["vsd"]) and math.isfinite(h["lora"]) for h in losses)
    assert losses[0]["vsd"] == 0.0  # the untrained LoRA teacher equals the teacher: no VSD gradient yet
    assert losses[-1]["vsd"] > 0.0  # after one LoRA step it has learned something of the student
    assert sorted(p.name for p in (run / "probes").iterdir()) == ["step_00002.png", "step_00003.png"]

    # The train state holds the LoRA teacher's adapter weights (not its frozen base) and both optimizers.
    with safe_open(str(run / TRAIN_STATE), framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata()["step"] == "3"
    lora_keys = [k for k in keys if k.startswith("module.lora.")]
    assert lora_keys and all("lora_" in k for k in lora_keys)
    assert {k.split(".")[1] for k in keys if k.startswith("optim.")} == {"lora", "student"}

    config = FlashstepConfig.load(out)
    assert (config.family, config.default_steps, config.allowed_steps) == ("swiftbrush", 1, (1,))
    assert config.timesteps == {"1": [999]} and config.conditioning_timestep == 999
    assert config.default_guidance_scale == 0.0
    assert config.provenance["teacher"] == "tiny-teacher" and config.provenance["steps"] == 3

    engine = Engine.load(out)
    result = engine.generate([GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=1)])
    assert result.unet_evals == 1
    assert result.images[0].size == (64, 64)
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert pipe.unet.config.in_channels == 4
    # A plain UNet: nothing of the LoRA teacher is exported.
    assert not any("lora" in k for k in pipe.unet.state_dict())
    assert config.prediction == pipe.scheduler.config.prediction_type == "epsilon"


@pytest.mark.slow
def test_a_v_prediction_student_is_exported_as_one_and_served_as_it_was_trained(tiny_teacher_dir, tmp_path):
    cfg = replace(TINY, steps=1, prediction="v_prediction")
    out = tmp_path / "swiftbrush"
    train_swiftbrush(cfg, tmp_path / "run", out, teacher_dir=tiny_teacher_dir, progress=False)
    config = FlashstepConfig.load(out)
    assert config.prediction == config.provenance["prediction"] == "v_prediction"
    # diffusers reads the prediction type from the scheduler: a vanilla pipeline must read v too.
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == "v_prediction"

    # The engine reads the exported UNet's output as v, as training did.
    teacher = load_teacher(tiny_teacher_dir)
    embeds = teacher.encode_prompts(["a red circle"])
    z = torch.randn((1, *teacher.latent_shape), generator=torch.Generator().manual_seed(3))
    engine = Engine.load(out)
    with torch.no_grad():
        want = student_x0(engine.unet, z, embeds, teacher.alphas_cumprod[999], "v_prediction")
    model = Denoiser(engine.unet, Conditioning(prompt_embeds=embeds), engine.config.prediction, engine.schedule)
    served = sample_swiftbrush(model, z, [999], engine.schedule, [])
    assert torch.allclose(served, want, atol=1e-4)


@pytest.mark.slow
def test_the_lora_teacher_can_take_several_updates_per_student_update(tiny_teacher_dir, tmp_path):
    """DMD2's two time-scale rule: `lora_updates` LoRA optimizer steps for each student step."""
    cfg = replace(TINY, steps=2, save_every=2, lora_updates=3)
    report = train_swiftbrush(cfg, tmp_path / "run", None, teacher_dir=tiny_teacher_dir, progress=False)
    assert report["config"]["lora_updates"] == 3
    with safe_open(str(tmp_path / "run" / TRAIN_STATE), framework="pt") as f:
        assert f.get_tensor("optim.student.state.0.step").item() == 2
        assert f.get_tensor("optim.lora.state.0.step").item() == 6
    with pytest.raises(ValueError, match="lora_updates"):
        SwiftBrushTrainConfig(lora_updates=0)


@pytest.mark.slow
def test_a_lora_warmup_trains_only_the_lora_teacher_in_its_first_steps(tiny_teacher_dir, tmp_path):
    """From a warm start the LoRA teacher (the teacher at first) must fit the student's samples before VSD moves it."""
    cfg = replace(TINY, steps=3, save_every=3, lora_updates=1, lora_warmup=2)
    train_swiftbrush(cfg, tmp_path / "run", None, teacher_dir=tiny_teacher_dir, progress=False)
    with safe_open(str(tmp_path / "run" / TRAIN_STATE), framework="pt") as f:
        assert f.get_tensor("optim.lora.state.0.step").item() == 3
        assert f.get_tensor("optim.student.state.0.step").item() == 1
