"""What ships in the repository: the judge and the default models load and do their job."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from flashstep.models.engine import load_engine
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from flashstep.models.registry import SHIPPED_MODELS_DIR, discover
from flashstep.training.data import render_dataset
from flashstep.training.judge import Judge
from flashstep.training.shapes import ATTRIBUTES
from flashstep.training.shared_weights import unique_weight_bytes

JUDGE_MIN_ACCURACY = 0.99  # per attribute, the bar ShapesBench rests on
SHIPPED_BUDGET_BYTES = 40 * 10**6  # every shipped checkpoint and the judge together under 40 MB
# The distilled students: name -> (family, default steps).
STUDENTS = {
    "shapes-swiftbrush": ("swiftbrush", 1),
    "shapes-instaflow": ("instaflow", 1),
    "shapes-2rf": ("instaflow", 2),
    "shapes-hypersd": ("hypersd", 2),  # 1 step is allowed; 2 is the default it draws well at
    "shapes-hypersd-1step": ("hypersd", 1),  # Hyper-SD's one-step LoRA beside the unified one
}
COLOUR_PROMPTS = [f"a {c} {s}" for c, s in [("red", "circle"), ("blue", "square"), ("green", "triangle"),
                  ("yellow", "star"), ("purple", "diamond"), ("orange", "circle"), ("cyan", "star"), ("pink", "square")]]


def test_shipped_judge_reads_fresh_renders():
    judge = Judge.load()
    data = render_dataset(400, seed=123_456_789, allow_held_out=True, progress=False)
    x, labels, _ = data.batch(np.arange(len(data)))
    _, preds = judge.read(x)
    for i, name in enumerate(ATTRIBUTES):
        accuracy = float((preds[name] == labels[:, i].numpy()).mean())
        assert accuracy >= JUDGE_MIN_ACCURACY, (name, accuracy)


def test_teacher_is_shipped_and_listed():
    assert "shapes-teacher" in discover()
    cfg = FlashstepConfig.load(SHIPPED_MODELS_DIR / "shapes-teacher")
    assert cfg.family == "teacher" and cfg.resolution == 64 and cfg.default_steps == 25


def test_shipped_teacher_generates_in_flashstep_and_vanilla_diffusers():
    engine = load_engine("shapes-teacher")
    result = engine.generate([GenerationRequest(prompt="a red circle", seed=0, num_inference_steps=4)])
    assert result.images[0].size == (64, 64) and result.unet_evals == 8
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODELS_DIR / "shapes-teacher")
    image = pipe("a red circle", num_inference_steps=4, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth", ".pkl"])
def test_nothing_pickled_ships(suffix):
    assert not list(SHIPPED_MODELS_DIR.rglob(f"*{suffix}"))


def test_shipped_weights_stay_small():
    from flashstep.training.judge import JUDGE_DIR

    assert unique_weight_bytes(SHIPPED_MODELS_DIR, JUDGE_DIR) < SHIPPED_BUDGET_BYTES


def test_shipped_links_stay_inside_the_shipped_folder():
    """The students' VAE and text encoder are links to the teacher's (`flashstep link-weights`): each must
    resolve to a real file inside the shipped folder, relatively, so a copy of the folder keeps them."""
    links = [p for p in SHIPPED_MODELS_DIR.rglob("*") if p.is_symlink()]
    for link in links:
        assert not link.readlink().is_absolute(), link
        assert link.resolve().is_file() and link.resolve().is_relative_to(SHIPPED_MODELS_DIR.resolve()), link


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_distilled_student_is_shipped_and_draws_the_colour_it_is_asked_for(name):
    """Each student serves at its own step count and is no colour-mush: the judge reads the colour
    asked for in at least 0.4 of 64 images, over three times chance (1/8)."""
    family, steps = STUDENTS[name]
    cfg = FlashstepConfig.load(SHIPPED_MODELS_DIR / name)
    assert (cfg.family, cfg.default_steps, cfg.resolution) == (family, steps, 64)
    assert cfg.provenance["teacher"] == "shapes-teacher"
    engine = load_engine(name)
    requests = [GenerationRequest(prompt=p, seed=s) for p in COLOUR_PROMPTS for s in range(8)]
    result = engine.generate(requests)
    assert result.unet_evals == steps * (2 if cfg.default_guidance_scale > 1 else 1)  # a CFG step counts two
    x = torch.from_numpy(np.stack([np.asarray(im) for im in result.images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    _, preds = Judge.load().read(x)
    wanted = [ATTRIBUTES["color"].index(p.split()[1]) for p in COLOUR_PROMPTS for _ in range(8)]
    assert float((preds["color"] == np.array(wanted)).mean()) >= 0.4  # chance is 1/8


@pytest.mark.parametrize("name", ["shapes-swiftbrush", "shapes-instaflow", "shapes-2rf"])
def test_full_students_load_in_vanilla_diffusers(name):
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODELS_DIR / name)
    assert pipe.unet.config.sample_size * 8 == 64


def test_hypersd_lora_loads_with_diffusers_load_lora_weights():
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODELS_DIR / "shapes-teacher")
    x, t, text = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999]), pipe.encode_prompt(
        "a red circle", "cpu", 1, False)[0]
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(SHIPPED_MODELS_DIR / "shapes-hypersd")
        after = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert (after - before).abs().max() > 1e-3, "the LoRA did not change the UNet"
