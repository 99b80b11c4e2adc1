"""Hyper-SD TSCD: the segment and jump arithmetic by hand, the recipe end to end on a tiny teacher."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from flashstep.models.denoiser import Conditioning, Denoiser
from flashstep.models.engine import Engine
from flashstep.models.families.hypersd import sample_tcd
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.models.schedule import NoiseSchedule
from flashstep.training.checkpointing import TRAIN_STATE
from flashstep.training.distill import DEFAULT_TEACHER, PromptSampler, ddim_jump, load_teacher, unet_eps
from flashstep.training.distribution_matching import DistributionMatchingConfig
from flashstep.training.recipes.hypersd import train_hypersd
from flashstep.training.recipes.hypersd_refine import (
    HyperSDRefineConfig,
    PairRegression,
    PairRegressionConfig,
    SelfRegression,
    SelfRegressionConfig,
    SourceRegression,
    SourceRegressionConfig,
    refine_hypersd,
)
from flashstep.training.rectified_flow import one_step
from flashstep.training.teacher_refinement import TeacherRefinement, refine_with_teacher
from flashstep.training.tscd import (
    LORA_WEIGHT_NAME,
    HyperSDTrainConfig,
    base_reference,
    load_lora_student,
    lora_student,
    low_rank_lora,
    one_step_sample,
    segment_boundaries,
    segment_start,
    solver_timesteps,
    stage_of,
)

TINY = HyperSDTrainConfig(latents=8, stage_steps=(2, 1, 1, 1), rank=4, batch_size=2, warmup=1, save_every=2)
ATOL = 1e-4  # float32 UNet outputs of the tiny model, fused vs. PEFT-wrapped


def test_four_segments_end_at_the_served_trailing_timesteps():
    assert segment_boundaries(4).tolist() == [0, 249, 499, 749]
    t = torch.tensor([19, 249, 250, 499, 500, 749, 750, 999])
    # A t on a boundary belongs to the segment below it: the 4-step sampler calls the model at
    # 749 and jumps to 499.
    assert segment_start(t, 4).tolist() == [0, 0, 249, 249, 499, 499, 749, 749]
    assert segment_start(t, 1).tolist() == [0] * 8
    assert segment_start(torch.tensor([139, 999]), 8).tolist() == [124, 874]


def test_solver_grid_and_stages():
    grid = solver_timesteps(50)
    assert grid[:2].tolist() == [19, 39] and grid[-1].item() == 999 and len(grid) == 50
    assert stage_of(0, (2, 1, 1, 1)) == (0, 0)
    assert stage_of(2, (2, 1, 1, 1)) == (1, 0)
    assert stage_of(4, (2, 1, 1, 1)) == (3, 0)
    with pytest.raises(ValueError, match="stage_steps"):
        stage_of(5, (2, 1, 1, 1))


def test_ddim_jump_matches_a_hand_computation():
    x = torch.full((1, 1, 1, 1), 1.0)
    eps = torch.full((1, 1, 1, 1), 0.5)
    abar_t, abar_s = torch.tensor([0.36]), torch.tensor([0.64])
    # x0 = (1 - 0.8 * 0.5) / 0.6 = 1; x_s = 0.8 * 1 + 0.6 * 0.5 = 1.1.
    assert torch.allclose(ddim_jump(x, eps, abar_t, abar_s), torch.tensor(1.1))
    # abar_s = 1 is the x0 prediction; s = t is the identity.
    assert torch.allclose(ddim_jump(x, eps, abar_t, torch.tensor([1.0])), torch.tensor(1.0))
    assert torch.allclose(ddim_jump(x, eps, abar_t, abar_t), x)
    # With one eps, jumps compose: t -> u -> s equals t -> s.
    via = ddim_jump(ddim_jump(x, eps, abar_t, torch.tensor([0.5])), eps, torch.tensor([0.5]), abar_s)
    assert torch.allclose(via, ddim_jump(x, eps, abar_t, abar_s), atol=1e-6)


def test_base_is_named_when_a_models_root_resolves_it(tmp_path):
    assert base_reference(DEFAULT_TEACHER, tmp_path / "shapes-hypersd") == "shapes-teacher"
    elsewhere = tmp_path / "a" / "teacher"
    elsewhere.mkdir(parents=True)
    (elsewhere / "model_index.json").write_text("{}")
    assert base_reference(elsewhere, tmp_path / "a" / "shapes-hypersd") == "teacher"
    assert base_reference(elsewhere, tmp_path / "b" / "shapes-hypersd") == str(elsewhere.resolve())


@pytest.mark.slow
def test_hypersd_recipe_trains_resumes_and_exports_a_lora_folder(tiny_teacher_dir, tmp_path):
    run, out = tmp_path / "run", tmp_path / "shapes-hypersd"
    first = train_hypersd(TINY, run, None, teacher_dir=tiny_teacher_dir, progress=False)
    assert first["steps_run"] == 5
    assert set(first["losses"]) == {"k=8", "k=4", "k=2", "k=1"}
    assert all(torch.isfinite(torch.tensor(v)) for v in first["losses"].values())
    cached = load_file(str(run / "latents" / "latents.safetensors"))
    assert cached["latents"].shape == (8, 4, 8, 8) and torch.isfinite(cached["latents"]).all()

    # Lengthening the last stage resumes there (LoRA and optimizer restored) and trains only the rest.
    longer = dataclasses.replace(TINY, stage_steps=(2, 1, 1, 2))
    resumed = train_hypersd(longer, run, out, teacher_dir=tiny_teacher_dir, progress=False)
    assert resumed["steps_run"] == 1 and set(resumed["losses"]) == {"k=1"}

    # A finished run trains nothing and exports the same LoRA.
    again = train_hypersd(longer, run, tmp_path / "again", teacher_dir=tiny_teacher_dir, progress=False)
    assert again["steps_run"] == 0
    lora, lora_again = (
        load_file(str(out / LORA_WEIGHT_NAME)),
        load_file(str(tmp_path / "again" / LORA_WEIGHT_NAME)),
    )
    assert lora.keys() == lora_again.keys() and all(torch.equal(lora[k], lora_again[k]) for k in lora)

    # The folder holds only flashstep.json and a diffusers/PEFT LoRA file on the teacher as base.
    assert sorted(p.name for p in out.iterdir()) == sorted(["flashstep.json", LORA_WEIGHT_NAME])
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    assert any(".resnets.0.conv1." in k for k in lora) and any(".attn2.to_k." in k for k in lora)
    config = FlashstepConfig.load(out)
    assert (config.family, config.lora, config.lora_scale) == ("hypersd", LORA_WEIGHT_NAME, 1.0)
    assert config.base == str(tiny_teacher_dir.resolve())
    assert config.hybrid_guidance_scale == 1.0  # the teacher's hybrid step runs without CFG
    assert (config.default_steps, config.allowed_steps, config.default_guidance_scale) == (
        2,
        (1, 2, 4, 8),
        0.0,
    )
    assert config.timesteps["2"] == [999, 499] and config.timesteps["4"] == [999, 749, 499, 249]
    assert config.provenance["recipe"] == "tscd-lora" and config.provenance["teacher"] == "tiny-teacher"
    assert json.loads((run / "hypersd_report.json").read_text())["steps_run"] == 0

    # The engine borrows the teacher's pieces, fuses the LoRA and samples at 1 and 2 steps.
    engine = Engine.load(out, models_root=tmp_path)
    for sampler in (None, "ddim"):
        engine = engine if sampler is None else Engine.load(out, sampler=sampler)
        for steps in (1, 2):
            result = engine.generate(
                [GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=steps)]
            )
            assert result.unet_evals == steps
            assert result.images[0].size == (64, 64)

    # Vanilla diffusers loads the same file onto the teacher; it changes the UNet exactly as the
    # engine's fused weights do (alpha = rank, no scale hidden anywhere).
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir, torch_dtype=torch.float32)
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 499])
    embeds = torch.randn((2, pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size))
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        pipe.load_lora_weights(out, weight_name=LORA_WEIGHT_NAME)
        after = pipe.unet(x, t, encoder_hidden_states=embeds).sample
        fused = engine.unet(x, t, encoder_hidden_states=embeds).sample
    assert (after - before).abs().max() > 1e-3
    assert torch.allclose(after, fused, atol=ATOL)


def test_the_one_step_sample_refinement_trains_is_the_served_one_step_tcd_sample():
    class ConstantEps(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states, added_cond_kwargs=None):
            return type("Out", (), {"sample": torch.full_like(x, 0.3)})()

    alphas = torch.linspace(0.999, 0.0047, 1000, dtype=torch.float64)
    schedule = NoiseSchedule(alphas)
    z, embeds = torch.tensor([2.0, -1.0]).view(1, 2, 1, 1), torch.zeros(1, 3, 8)
    model = Denoiser(ConstantEps(), Conditioning(prompt_embeds=embeds), "epsilon", schedule)
    served = sample_tcd(model, z, [999], schedule, [])
    assert torch.allclose(one_step_sample(ConstantEps(), z, embeds, alphas.float()), served.float(), atol=1e-4)
    # Pure noise fed at 800 (Hyper-SD's one-step timestep): x0 = (z - sqrt(1 - abar_800) eps) / sqrt(abar_800),
    # then the jump to timestep 0.
    at_800 = one_step_sample(ConstantEps(), z, embeds, alphas.float(), timestep=800)
    assert torch.allclose(at_800, served_800 := sample_tcd(model, z, [800], schedule, []).float(), atol=1e-4)
    abar, abar_0 = alphas[800].float(), alphas[0].float()
    x0 = (z - (1 - abar).sqrt() * 0.3) / abar.sqrt()
    assert torch.allclose(served_800, abar_0.sqrt() * x0 + (1 - abar_0).sqrt() * 0.3, atol=1e-4)


@pytest.mark.slow
def test_score_distillation_refines_an_exported_lora_and_records_the_leg(tiny_teacher_dir, tmp_path):
    student = tmp_path / "shapes-hypersd"
    train_hypersd(TINY, tmp_path / "run", student, teacher_dir=tiny_teacher_dir, progress=False)
    teacher = load_teacher(tiny_teacher_dir)

    # The student reloads as trained: rank and modules from the file's metadata, weights as the engine fuses them.
    unet, base = load_lora_student(teacher, student)
    assert (base.rank, base.lora_targets) == (TINY.rank, TINY.lora_targets)
    fused = Engine.load(student).unet
    x, t = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)), torch.tensor([999, 499])
    embeds = teacher.encode_prompts(["a red circle", "a blue star"])
    with torch.no_grad():
        assert torch.allclose(unet_eps(unet, x, t, embeds), unet_eps(fused, x, t, embeds), atol=ATOL)

    cfg = HyperSDRefineConfig(steps=2, latents=8, batch_size=2, save_every=1,
                              matching=DistributionMatchingConfig(fake_warmup=1, lora_rank=4))  # fmt: skip
    report = refine_hypersd(cfg, tmp_path / "refine", student, tmp_path / "refined", teacher_dir=tiny_teacher_dir,
                            progress=False)  # fmt: skip
    assert report["refine_seconds"] >= 0
    before, after = load_file(str(student / LORA_WEIGHT_NAME)), load_file(str(tmp_path / "refined" / LORA_WEIGHT_NAME))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    config, old = FlashstepConfig.load(tmp_path / "refined"), FlashstepConfig.load(student)
    assert dataclasses.replace(config, provenance={}) == dataclasses.replace(old, provenance={})
    (leg,) = config.provenance["refinements"]
    assert (leg["student"], leg["steps"], leg["distribution_matching"]["fake_warmup"]) == ("shapes-hypersd", 2, 1)
    assert leg["one_step_timestep"] == 999  # the student's own, from its flashstep.json
    for steps in (1, 2):
        result = Engine.load(tmp_path / "refined").generate(
            [GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=steps)]
        )
        assert result.unet_evals == steps and result.images[0].size == (64, 64)


@pytest.mark.slow
def test_a_refinement_can_move_the_one_step_timestep_and_the_export_serves_one_step_there(tiny_teacher_dir, tmp_path):
    student = tmp_path / "shapes-hypersd"
    train_hypersd(TINY, tmp_path / "run", student, teacher_dir=tiny_teacher_dir, progress=False)
    cfg = HyperSDRefineConfig(steps=1, latents=8, batch_size=2, save_every=1, one_step_timestep=800,
                              matching=DistributionMatchingConfig(fake_warmup=1, lora_rank=4))  # fmt: skip
    refine_hypersd(cfg, tmp_path / "refine", student, tmp_path / "refined", teacher_dir=tiny_teacher_dir, progress=False)
    config = FlashstepConfig.load(tmp_path / "refined")
    assert config.timesteps["1"] == [800] and config.timesteps["2"] == FlashstepConfig.load(student).timesteps["2"]
    assert config.provenance["refinements"][-1]["one_step_timestep"] == 800

    engine = Engine.load(tmp_path / "refined")
    calls = []
    engine.unet.register_forward_pre_hook(lambda module, args: calls.append(float(args[1].flatten()[0])))
    engine.generate([GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=1)])
    assert calls == [800.0]

    # A further leg keeps the timestep the student was exported with.
    again = dataclasses.replace(cfg, one_step_timestep=None)
    refine_hypersd(again, tmp_path / "refine2", tmp_path / "refined", tmp_path / "refined2", teacher_dir=tiny_teacher_dir,
                   progress=False)  # fmt: skip
    assert FlashstepConfig.load(tmp_path / "refined2").timesteps["1"] == [800]


@pytest.mark.slow
def test_a_leg_with_an_ema_exports_the_lora_average_its_train_state_keeps_not_the_last_weights(tiny_teacher_dir, tmp_path):
    student = tmp_path / "shapes-hypersd"
    train_hypersd(TINY, tmp_path / "run", student, teacher_dir=tiny_teacher_dir, progress=False)
    cfg = HyperSDRefineConfig(steps=3, latents=8, batch_size=2, save_every=1, lr=1e-2, warmup=1, ema_decay=0.9,
                              matching=DistributionMatchingConfig(fake_warmup=1, lora_rank=4))  # fmt: skip
    refine_hypersd(cfg, tmp_path / "refine", student, tmp_path / "refined", teacher_dir=tiny_teacher_dir, progress=False)

    state = load_file(str(tmp_path / "refine" / "refine" / TRAIN_STATE))
    exported = load_file(str(tmp_path / "refined" / LORA_WEIGHT_NAME))

    def stored(module: str) -> dict[str, torch.Tensor]:
        """The train state's copy of one module, under the LoRA file's key names (fp16, as exported)."""
        prefix = f"module.{module}."
        return {"unet." + k[len(prefix):].replace("__", ".").replace(".default", ""): v.half()
                for k, v in state.items() if k.startswith(prefix)}  # fmt: skip

    average, last = stored("ema"), stored("lora")
    assert average.keys() == exported.keys() == last.keys()
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    assert any(not torch.equal(exported[k], last[k]) for k in exported)
    assert FlashstepConfig.load(tmp_path / "refined").provenance["refinements"][-1]["ema_decay"] == 0.9


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_an_ema_decay_outside_zero_to_one_is_refused_by_name(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        HyperSDRefineConfig(ema_decay=decay)


@pytest.mark.slow
def test_widening_a_lora_keeps_what_it_computes_and_a_widened_refinement_exports_the_new_rank(tiny_teacher_dir, tmp_path):
    student = tmp_path / "shapes-hypersd"
    train_hypersd(TINY, tmp_path / "run", student, teacher_dir=tiny_teacher_dir, progress=False)
    teacher = load_teacher(tiny_teacher_dir)
    narrow, _ = load_lora_student(teacher, student)
    wide, base = load_lora_student(teacher, student, rank=2 * TINY.rank)
    assert base.rank == 2 * TINY.rank
    x, t = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)), torch.tensor([800, 249])
    embeds = teacher.encode_prompts(["a red circle", "a blue star"])
    with torch.no_grad():
        assert torch.allclose(unet_eps(wide, x, t, embeds), unet_eps(narrow, x, t, embeds), atol=ATOL)
    # The added directions are live: their A rows are random, so B's new columns get gradients at once.
    a = next(p for n, p in wide.named_parameters() if "lora_A" in n)
    assert a.shape[0] == 2 * TINY.rank and a[TINY.rank :].abs().sum() > 0
    with pytest.raises(ValueError, match="would narrow .* rank-4 LoRA"):
        load_lora_student(teacher, student, rank=2)

    cfg = HyperSDRefineConfig(steps=1, latents=8, batch_size=2, save_every=1, rank=2 * TINY.rank,
                              matching=DistributionMatchingConfig(fake_warmup=1, lora_rank=4))  # fmt: skip
    refine_hypersd(cfg, tmp_path / "refine", student, tmp_path / "wide", teacher_dir=tiny_teacher_dir, progress=False)
    weights = load_file(str(tmp_path / "wide" / LORA_WEIGHT_NAME))
    assert {v.shape[0] for k, v in weights.items() if "lora_A" in k} == {2 * TINY.rank}
    assert FlashstepConfig.load(tmp_path / "wide").provenance["refinements"][-1]["rank"] == 2 * TINY.rank
    assert load_lora_student(teacher, tmp_path / "wide")[1].rank == 2 * TINY.rank  # the file's metadata says so
    result = Engine.load(tmp_path / "wide").generate([GenerationRequest(prompt="a red circle", seed=3, num_inference_steps=1)])
    assert result.unet_evals == 1 and result.images[0].size == (64, 64)

    # Trained wide, stored narrow: the finished run re-exports at the student's own rank without training again.
    narrowed = dataclasses.replace(cfg, export_rank=TINY.rank)
    refine_hypersd(narrowed, tmp_path / "refine", student, tmp_path / "narrow", teacher_dir=tiny_teacher_dir, progress=False)
    stored = load_file(str(tmp_path / "narrow" / LORA_WEIGHT_NAME))
    assert {v.shape[0] for k, v in stored.items() if "lora_A" in k} == {TINY.rank}
    leg = FlashstepConfig.load(tmp_path / "narrow").provenance["refinements"][-1]
    assert (leg["rank"], leg["export_rank"]) == (2 * TINY.rank, TINY.rank)
    assert load_lora_student(teacher, tmp_path / "narrow")[1].rank == TINY.rank
    with pytest.raises(ValueError, match="`export_rank` 16 is above the rank 8 the leg trains at"):
        refine_hypersd(dataclasses.replace(cfg, export_rank=16), tmp_path / "refine", student, tmp_path / "x",
                       teacher_dir=tiny_teacher_dir, progress=False)  # fmt: skip


def test_a_lora_stored_at_a_lower_rank_keeps_each_layers_best_approximation():
    gen = torch.Generator().manual_seed(0)
    layers = {  # a linear and a 3x3 conv module, rank 6, PEFT's key names
        "a.lora_A.weight": torch.randn(6, 10, generator=gen), "a.lora_B.weight": torch.randn(12, 6, generator=gen),
        "c.lora_A.weight": torch.randn(6, 4, 3, 3, generator=gen), "c.lora_B.weight": torch.randn(5, 6, 1, 1, generator=gen),
    }  # fmt: skip

    def update(state, name):
        a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
        return b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)

    full = low_rank_lora(layers, 6)  # at its own rank: the same updates
    for name in ("a", "c"):
        assert torch.allclose(update(full, name), update(layers, name), atol=1e-4)
    cut = low_rank_lora(layers, 2)
    assert cut["c.lora_A.weight"].shape == (2, 4, 3, 3) and cut["c.lora_B.weight"].shape == (5, 2, 1, 1)
    for name in ("a", "c"):
        delta, approx = update(layers, name), update(cut, name)
        assert torch.linalg.matrix_rank(approx) == 2
        tail = torch.linalg.svdvals(delta)[2:]  # Eckart-Young: no rank-2 matrix is closer
        assert torch.allclose((delta - approx).pow(2).sum(), tail.pow(2).sum(), rtol=1e-3)
    with pytest.raises(ValueError, match="`rank` 7 is above the LoRA's own rank 6"):
        low_rank_lora(layers, 7)


def test_the_regression_term_is_dmds_mse_from_a_pairs_noise_to_the_teachers_endpoint(tiny_teacher_dir, random_judge, tmp_path):
    teacher = load_teacher(tiny_teacher_dir)
    cfg = PairRegressionConfig(pairs=4, weight=0.5, perceptual_weight=0.0)
    regression = PairRegression(teacher, cfg, tmp_path / "pairs", random_judge, progress=False)
    assert regression.z.shape == regression.x.shape == (4, *teacher.latent_shape)
    assert not torch.allclose(regression.z, regression.x)  # the teacher's ODE moved each noise to a latent

    unet = teacher.unet
    idx = np.random.default_rng(3).integers(0, 4, 2)
    embeds = teacher.encode_prompts([regression.captions[i] for i in idx])
    with torch.no_grad():
        pred = one_step_sample(unet, regression.z[idx], embeds, teacher.alphas_cumprod, 800)
        want = 0.5 * F.mse_loss(pred, regression.x[idx])
        got = regression.loss(unet, 800, np.random.default_rng(3), batch_size=2)
    assert torch.allclose(got, want)
    with_perceptual = PairRegression(teacher, dataclasses.replace(cfg, perceptual_weight=1.0), tmp_path / "pairs", random_judge, False)
    with torch.no_grad():
        assert with_perceptual.loss(unet, 800, np.random.default_rng(3), batch_size=2) > got


@pytest.mark.slow
def test_a_refinement_with_regression_records_its_pairs(tiny_teacher_dir, random_judge, tmp_path):
    student = tmp_path / "shapes-hypersd"
    train_hypersd(TINY, tmp_path / "run", student, teacher_dir=tiny_teacher_dir, progress=False)
    cfg = HyperSDRefineConfig(steps=2, latents=8, batch_size=2, save_every=1, regression=PairRegressionConfig(pairs=4),
                              matching=DistributionMatchingConfig(fake_warmup=1, lora_rank=4))  # fmt: skip
    refine_hypersd(cfg, tmp_path / "refine", student, tmp_path / "refined", teacher_dir=tiny_teacher_dir,
                   judge=random_judge, progress=False)  # fmt: skip
    leg = FlashstepConfig.load(tmp_path / "refined").provenance["refinements"][-1]
    assert (leg["regression"]["pairs"], leg["regression"]["weight"]) == (4, 0.25)
    assert (tmp_path / "refine" / "pairs" / "pairs_0000.safetensors").is_file()


def test_the_source_regression_term_is_the_mse_to_the_sources_one_step_sample_of_the_same_noise(
    tiny_teacher_dir, tiny_instaflow_dir, random_judge
):
    teacher = load_teacher(tiny_teacher_dir)
    cfg = SourceRegressionConfig(str(tiny_instaflow_dir), weight=0.5, perceptual_weight=0.0)
    regression = SourceRegression(teacher, cfg, random_judge, seed=11)
    embeds = teacher.encode_prompts(PromptSampler(11).draw(2))
    z = torch.from_numpy(np.random.default_rng(3).standard_normal((2, *teacher.latent_shape), dtype=np.float32))
    with torch.no_grad():
        want = 0.5 * F.mse_loss(one_step_sample(teacher.unet, z, embeds, teacher.alphas_cumprod, 650),
                                one_step(regression.source, z, embeds))  # fmt: skip
        got = regression.loss(teacher.unet, 650, np.random.default_rng(3), batch_size=2)
    assert torch.allclose(got, want)
    assert not any(p.requires_grad for p in regression.source.parameters())  # the target is frozen
    with pytest.raises(ValueError, match="not a one-step instaflow student"):
        SourceRegression(teacher, SourceRegressionConfig(str(tiny_teacher_dir)), random_judge, seed=11)


def test_with_a_teacher_refinement_the_target_is_the_sources_sample_touched_up_by_the_teacher(
    tiny_teacher_dir, tiny_instaflow_dir, random_judge
):
    teacher = load_teacher(tiny_teacher_dir)
    refine = TeacherRefinement(timestep=300, steps=2, guidance=2.0)
    cfg = SourceRegressionConfig(str(tiny_instaflow_dir), weight=0.5, perceptual_weight=0.0, refine=refine)
    regression = SourceRegression(teacher, cfg, random_judge, seed=11)
    embeds = teacher.encode_prompts(PromptSampler(11).draw(2))
    z = torch.from_numpy(np.random.default_rng(3).standard_normal((2, *teacher.latent_shape), dtype=np.float32))
    with torch.no_grad():
        raw = one_step(regression.source, z, embeds)
        target = refine_with_teacher(teacher, raw, z, embeds, refine)
        pred = one_step_sample(teacher.unet, z, embeds, teacher.alphas_cumprod, 650)
        got = regression.loss(teacher.unet, 650, np.random.default_rng(3), batch_size=2)
    assert torch.allclose(got, 0.5 * F.mse_loss(pred, target))
    assert not torch.allclose(got, 0.5 * F.mse_loss(pred, raw))  # the touch-up changed the target
    assert cfg.recipe == "regression on tiny-instaflow's one-step samples, refined by the teacher (t=300, 2 DDIM steps, CFG 2)"


def test_the_self_regression_target_is_the_loras_own_sample_touched_up_by_the_teacher_and_detached(
    tiny_teacher_dir, random_judge
):
    teacher = load_teacher(tiny_teacher_dir)
    unet = lora_student(teacher, TINY)
    refine = TeacherRefinement(timestep=500, steps=2, guidance=2.0)
    cfg = SelfRegressionConfig(weight=0.5, perceptual_weight=0.0, refine=refine)
    regression = SelfRegression(teacher, cfg, random_judge, seed=11)
    embeds = teacher.encode_prompts(PromptSampler(11).draw(2))
    z = torch.from_numpy(np.random.default_rng(3).standard_normal((2, *teacher.latent_shape), dtype=np.float32))
    with torch.no_grad():
        pred = one_step_sample(unet, z, embeds, teacher.alphas_cumprod, 650)
        want = 0.5 * F.mse_loss(pred, refine_with_teacher(teacher, pred, z, embeds, refine))
    got = regression.loss(unet, 650, np.random.default_rng(3), batch_size=2)
    assert torch.allclose(got, want)
    assert got > 0  # the teacher's touch-up moved the sample: there is something to learn
    got.backward()  # the gradient flows through the prediction only: the teacher is frozen, the target detached
    assert all(p.grad is None for p in teacher.unet.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters() if p.requires_grad)
    assert cfg.recipe == "regression on its own one-step samples, refined by the teacher (t=500, 2 DDIM steps, CFG 2)"


def test_a_multi_step_self_regression_trains_the_last_served_tcd_step_toward_the_touched_up_sample(
    tiny_teacher_dir, random_judge
):
    teacher = load_teacher(tiny_teacher_dir)
    unet = lora_student(teacher, TINY)
    refine = TeacherRefinement(timestep=500, steps=2, guidance=2.0)
    cfg = SelfRegressionConfig(weight=0.5, perceptual_weight=0.0, refine=refine, sample_steps=(2,))
    regression = SelfRegression(teacher, cfg, random_judge, seed=11, eta=1.0)
    embeds = teacher.encode_prompts(PromptSampler(11).draw(2))
    abar = teacher.alphas_cumprod
    rng = np.random.default_rng(3)
    z = torch.from_numpy(rng.standard_normal((2, *teacher.latent_shape), dtype=np.float32))
    fresh = torch.from_numpy(rng.standard_normal((2, *teacher.latent_shape), dtype=np.float32))
    with torch.no_grad():  # by hand: x0 at 999, re-noised to 499 with fresh noise (eta 1), x0 again at 499
        eps = unet_eps(unet, z, torch.full((2,), 999), embeds)
        x0 = (z - (1 - abar[999]).sqrt() * eps) / abar[999].sqrt()
        x_s = abar[0].sqrt() * x0 + (1 - abar[0]).sqrt() * eps
        ratio = abar[499] / abar[0]
        x_499 = ratio.sqrt() * x_s + (1 - ratio).sqrt() * fresh
        pred = one_step_sample(unet, x_499, embeds, abar, 499)
        want = 0.5 * F.mse_loss(pred, refine_with_teacher(teacher, pred, fresh, embeds, refine))
    got = regression.loss(unet, 650, np.random.default_rng(3), batch_size=2)  # 650: the one-step timestep, unused at k = 2
    assert torch.allclose(got, want, atol=1e-6)
    got.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters() if p.requires_grad)
    assert cfg.recipe == "regression on its own 2-step samples, refined by the teacher (t=500, 2 DDIM steps, CFG 2)"


def test_self_regression_step_counts_are_served_ones_and_need_the_tscd_term_beyond_one_step():
    with pytest.raises(ValueError, match="sample_steps"):
        SelfRegressionConfig(sample_steps=(3,))
    with pytest.raises(ValueError, match="sample_steps"):
        SelfRegressionConfig(sample_steps=())
    multi = SelfRegressionConfig(sample_steps=(1, 2, 4, 8))
    assert multi.recipe.startswith("regression on its own 1/2/4/8-step samples")
    with pytest.raises(ValueError, match="tscd_weight"):
        HyperSDRefineConfig(regression=multi, tscd_weight=0.0, matching=None)
    HyperSDRefineConfig(regression=SelfRegressionConfig(), tscd_weight=0.0, matching=None)  # one step alone is fine


def _source_gap(teacher, unet, source, timestep: int) -> float:
    """Latent MSE between the LoRA's and the source's one-step samples on fixed noise and prompts."""
    embeds = teacher.encode_prompts(["a red circle", "a blue square", "a green star", "a small yellow triangle"])
    z = torch.randn((4, *teacher.latent_shape), generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        return F.mse_loss(one_step_sample(unet, z, embeds, teacher.alphas_cumprod, timestep), one_step(source, z, embeds)).item()


@pytest.mark.slow
def test_a_refinement_regressing_onto_a_source_moves_the_one_step_map_onto_it_without_pairs(
    tiny_teacher_dir, tiny_instaflow_dir, random_judge, tmp_path
):
    student = tmp_path / "shapes-hypersd"
    train_hypersd(TINY, tmp_path / "run", student, teacher_dir=tiny_teacher_dir, progress=False)
    regression = SourceRegressionConfig(str(tiny_instaflow_dir), weight=1.0, perceptual_weight=0.0)
    cfg = HyperSDRefineConfig(steps=25, latents=8, batch_size=4, lr=3e-3, warmup=1, save_every=25, tscd_weight=0.0,
                              matching=None, regression=regression, one_step_timestep=650)  # fmt: skip
    refine_hypersd(cfg, tmp_path / "refine", student, tmp_path / "refined", teacher_dir=tiny_teacher_dir,
                   judge=random_judge, progress=False)  # fmt: skip
    teacher = load_teacher(tiny_teacher_dir)
    source = SourceRegression(teacher, regression, random_judge, seed=0).source
    before = _source_gap(teacher, load_lora_student(teacher, student)[0], source, 650)
    after = _source_gap(teacher, load_lora_student(teacher, tmp_path / "refined")[0], source, 650)
    assert after < 0.7 * before
    leg = FlashstepConfig.load(tmp_path / "refined").provenance["refinements"][-1]
    assert leg["recipe"] == "regression on tiny-instaflow's one-step samples"
    assert leg["regression"] == {"source": str(tiny_instaflow_dir), "weight": 1.0, "perceptual_weight": 0.0, "refine": None}
    assert not (tmp_path / "refine" / "pairs").exists()  # no teacher pairs made


def test_only_a_hypersd_lora_folder_can_be_refined(tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="not a hypersd LoRA folder"):
        refine_hypersd(HyperSDRefineConfig(steps=1), tmp_path / "run", tiny_teacher_dir, tmp_path / "out",
                       teacher_dir=tiny_teacher_dir, progress=False)  # fmt: skip
