"""Every training stage runs on tiny configs and exports a folder that both diffusers and
flashstep load and sample; `flashstep eval` on it writes every key of the report."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from flashstep.cli import main as flashstep_main
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.training.architecture import ShapesArch
from flashstep.training.autoencoder import VAETrainConfig, train_vae
from flashstep.training.checkpointing import TRAIN_STATE
from flashstep.training.judge import Judge
from flashstep.training.recipes.judge import JudgeTrainConfig, train_judge
from flashstep.training.recipes.teacher import TeacherTrainConfig, train_teacher

TINY = ShapesArch.tiny()


@pytest.fixture(scope="module")
def tiny_judge(tmp_path_factory):
    out = tmp_path_factory.mktemp("judge")
    report = train_judge(JudgeTrainConfig(steps=4, batch_size=16, n_train=64, n_eval=32), out, progress=False)
    return out, report


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    _, vae_report = train_vae(VAETrainConfig(steps=3, batch_size=4, n_train=32, arch=TINY), runs / "vae", progress=False)
    export = runs / "export"
    cfg = TeacherTrainConfig(steps=3, batch_size=4, n_train=32, save_every=2, arch=TINY)
    report = train_teacher(cfg, runs / "vae" / "vae", runs / "teacher", export, progress=False)
    return export, runs, vae_report, report


def test_judge_smoke_trains_and_reloads(tiny_judge):
    folder, report = tiny_judge
    assert set(report["accuracy"]) == {"shape", "color", "size", "position", "background"}
    judge = Judge.load(folder)
    feats, preds = judge.read(torch.zeros(2, 3, 64, 64))
    assert feats.shape == (2, judge.config.feature_dim) and np.isfinite(feats).all()


@pytest.mark.slow
def test_vae_and_teacher_losses_are_finite(tiny_teacher):
    _, _, vae_report, report = tiny_teacher
    assert math.isfinite(vae_report["final_loss"]) and vae_report["scaling_factor"] > 0
    assert math.isfinite(report["final_loss"])


def test_teacher_training_resumes_from_its_state(tiny_teacher):
    _, runs, _, _ = tiny_teacher
    cfg = TeacherTrainConfig(steps=4, batch_size=4, n_train=32, save_every=2, arch=TINY)
    report = train_teacher(cfg, runs / "vae" / "vae", runs / "teacher", None, progress=False)
    meta = json.loads((runs / "teacher" / "teacher_report.json").read_text())
    assert report["steps"] == meta["steps"] == 4
    # The text encoder's attribute heads train with it and resume with it, but are never exported.
    with safe_open(str(runs / "teacher" / TRAIN_STATE), framework="pt") as f:
        assert any(k.startswith("module.model.text_heads.") for k in f.keys())
    assert report["config"]["text_attribute_weight"] == 1.0


def test_export_loads_in_vanilla_diffusers(tiny_teacher):
    export, *_ = tiny_teacher
    pipe = StableDiffusionPipeline.from_pretrained(export)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    cfg = FlashstepConfig.load(export)
    assert cfg.family == "teacher" and cfg.resolution == 64 and 25 in cfg.allowed_steps
    assert not list(export.rglob("*.bin")) and list(export.rglob("*.safetensors"))


def test_export_generates_through_flashstep(tiny_teacher, tmp_path):
    export, *_ = tiny_teacher
    out = tmp_path / "img.png"
    assert flashstep_main(["generate", "a blue star", "--model", str(export), "--steps", "2", "-o", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_eval_writes_every_report_key(tiny_teacher, tiny_judge, tmp_path):
    from flashstep.training.evaluate import EvalOptions, evaluate_model

    export, *_ = tiny_teacher
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        json.dumps({"prompt": "a red circle"}),
        json.dumps({"prompt": "a purple star"}),
        json.dumps({"prompt": "a square", "negative_prompt": "blue"}),
    ]) + "\n")
    report = evaluate_model(EvalOptions(model=str(export), prompts=prompts, seeds=2, steps=2, judge_dir=tiny_judge[0]))
    for key in ("adherence", "adherence_heldout", "fd", "diversity", "unet_evals_per_image",
                "seconds_per_image", "n_images", "negative_efficacy"):
        assert key in report and report[key] is not None, key
    assert set(report["attribute_accuracy"]) == {"shape", "color"}  # only what the positives name
    assert set(report["confusions"]) <= {"shape", "color"}
    for attr, misses in report["confusions"].items():
        assert sum(c for *_, c in misses) <= 4 * (1 - report["attribute_accuracy"][attr]) + 1e-9
    assert report["n_images"] == 2 * 2 + 2 * 2  # positives, plus negatives with and without
    assert report["unet_evals_per_image"] == 4  # 2 steps with CFG


class SeedRecorder:
    """The real engine, with the seeds of every request it generates written down."""

    def __init__(self, engine):
        self.engine, self.seeds = engine, []

    def generate(self, requests):
        self.seeds += [r.seed for r in requests]
        return self.engine.generate(requests)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_eval_first_seed_runs_a_fresh_seed_range(tiny_teacher, tiny_judge, tmp_path):
    from flashstep.models.engine import load_engine
    from flashstep.training.evaluate import EvalOptions, evaluate_model, reference_renders
    from flashstep.training.prompts import load_prompts

    export, *_ = tiny_teacher
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a red circle"}) + "\n" + json.dumps({"prompt": "a star"}) + "\n")
    engine = SeedRecorder(load_engine(str(export)))
    report = evaluate_model(
        EvalOptions(model=str(export), prompts=prompts, seeds=2, first_seed=5, steps=1, judge_dir=tiny_judge[0]), engine
    )
    assert sorted(engine.seeds) == [5, 5, 6, 6] and report["first_seed"] == 5 and report["n_images"] == 4
    # The real renders FD compares against move with the seeds: seeds 5-6 are rows 5-6 of the 0-7 range.
    specs = load_prompts(prompts)
    assert torch.equal(reference_renders(specs[:1], range(5, 7)), reference_renders(specs[:1], range(8))[5:7])


@pytest.mark.parametrize(("seeds", "first_seed"), [(0, 0), (4, -1), (4, 997)])
def test_eval_refuses_a_seed_range_outside_the_reference_renders(seeds, first_seed, tmp_path):
    from flashstep.training.evaluate import EvalOptions

    with pytest.raises(ValueError, match="seed"):
        EvalOptions(model="m", prompts=tmp_path / "p.jsonl", seeds=seeds, first_seed=first_seed)
    with pytest.raises(SystemExit, match="flashstep eval: .*seed"):
        flashstep_main(["eval", "--model", "m", "--prompts", "p.jsonl", "--seeds", str(seeds), "--first-seed", str(first_seed)])


@pytest.mark.slow
def test_cli_runs_the_two_phase_vae_recipe(tmp_path):
    assert flashstep_main(["train", "vae", "--tiny", "--train-steps", "4", "--runs", str(tmp_path)]) == 0
    assert (tmp_path / "vae" / "joint" / "train_state.safetensors").exists()
    assert (tmp_path / "vae" / "decoder" / "train_state.safetensors").exists()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tmp_path / "vae" / "vae")
    joint = AutoencoderKL.from_pretrained(tmp_path / "vae" / "joint" / "vae")
    # Phase two trains the decoder only: the latent space the teacher learns on is unchanged.
    for a, b in zip(vae.encoder.parameters(), joint.encoder.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(vae.decoder.parameters(), joint.decoder.parameters(), strict=True))


def test_an_export_names_its_source_by_folder_not_by_the_training_machines_path(tiny_teacher_dir, tmp_path):
    from flashstep.training.distill import export_student, load_teacher, student_unet

    teacher = load_teacher(tiny_teacher_dir.resolve())
    out = export_student(tmp_path / "student", teacher, student_unet(teacher), FlashstepConfig.load(tiny_teacher_dir))
    for part in ("unet", "vae"):
        written = json.loads((out / part / "config.json").read_text())["_name_or_path"]
        assert written == f"{tiny_teacher_dir.name}/{part}"


def test_the_commit_recorded_does_not_depend_on_the_working_folder(tmp_path, monkeypatch):
    from flashstep.training.export import git_commit

    here = git_commit()
    monkeypatch.chdir(tmp_path)
    assert git_commit() == here
