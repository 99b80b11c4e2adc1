"""Loading a folder: safetensors only, missing pieces named, families checked, public folders accepted."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flashstep.models.engine import Engine
from flashstep.models.errors import CheckpointError, InvalidRequestError, UnknownFamilyError
from flashstep.models.flashstep_config import FAMILIES, FlashstepConfig
from flashstep.models.outputs import GenerationRequest


@pytest.fixture
def copy_of(tmp_path, teacher_dir):
    def make(name: str = "copy"):
        return shutil.copytree(teacher_dir, tmp_path / name)

    return make


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never run on checkpoint files")

    monkeypatch.setattr(torch, "load", refuse)


def test_pickled_unet_weights_are_refused_with_the_conversion(copy_of, no_unpickling):
    folder = copy_of()
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError) as err:
        Engine.load(folder)
    message = str(err.value)
    assert "diffusion_pytorch_model.bin" in message and "unet" in message
    assert "safetensors" in message and "save_pretrained" in message


def test_a_pickled_single_file_checkpoint_is_refused(tmp_path, no_unpickling):
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    FlashstepConfig(family="swiftbrush").save(tmp_path)
    with pytest.raises(CheckpointError, match="model.ckpt.*safetensors"):
        Engine.load(tmp_path)


@pytest.mark.parametrize("piece", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_a_missing_piece_is_named(copy_of, piece):
    folder = copy_of()
    shutil.rmtree(folder / piece)
    with pytest.raises(CheckpointError, match=f"`{piece}/`"):
        Engine.load(folder)


def test_missing_weights_are_named(copy_of):
    folder = copy_of()
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="`text_encoder/`.*no \\*.safetensors"):
        Engine.load(folder)


def test_missing_model_index_is_named(copy_of):
    folder = copy_of()
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json"):
        Engine.load(folder)


def test_unknown_family_lists_the_known_ones(copy_of):
    folder = copy_of()
    data = json.loads((folder / "flashstep.json").read_text())
    (folder / "flashstep.json").write_text(json.dumps({**data, "family": "sdturbo"}))
    with pytest.raises(UnknownFamilyError) as err:
        Engine.load(folder)
    assert "sdturbo" in str(err.value) and all(f in str(err.value) for f in FAMILIES)
    with pytest.raises(UnknownFamilyError, match="swiftbrush"):
        Engine.load(copy_of("other"), family="sdturbo")


def test_a_public_folder_needs_a_family(copy_of):
    folder = copy_of()
    (folder / "flashstep.json").unlink()
    with pytest.raises(CheckpointError, match="pass `family`"):
        Engine.load(folder)
    engine = Engine.load(folder, family="swiftbrush")
    assert engine.config.allowed_steps == (1,) and engine.config.resolution == 64  # 8x8 latents x 8
    assert engine.generate([GenerationRequest("a star", seed=0)]).images[0].size == (64, 64)
    teacher = Engine.load(folder, family="teacher")
    assert teacher.config.default_guidance_scale == 7.5 and teacher.config.default_steps == 25


def test_the_family_argument_overrides_flashstep_json(teacher_dir):
    engine = Engine.load(teacher_dir, family="lcm")
    assert engine.family == "lcm" and engine.sampler_name == "lcm"


def test_swiftbrush_must_be_one_step(copy_of):
    folder = copy_of()
    FlashstepConfig(family="swiftbrush", default_steps=1, allowed_steps=(1, 2), resolution=64).save(folder)
    with pytest.raises(CheckpointError, match="allowed_steps"):
        Engine.load(folder)


def test_a_flow_velocity_belongs_to_instaflow_and_to_swiftbrush_students_at_the_noise_end(copy_of):
    folder = copy_of()
    FlashstepConfig(family="swiftbrush", prediction="flow", conditioning_timestep=1000, resolution=64).save(folder)
    assert Engine.load(folder).config.prediction == "flow"
    FlashstepConfig(family="swiftbrush", prediction="flow", conditioning_timestep=999, resolution=64).save(folder)
    with pytest.raises(CheckpointError, match="`conditioning_timestep` must be 1000 but is 999"):
        Engine.load(folder)
    FlashstepConfig(family="teacher", prediction="flow", default_steps=25, allowed_steps=(25,), resolution=64).save(folder)
    with pytest.raises(CheckpointError, match="'flow' belongs to families \\['instaflow', 'swiftbrush'\\] only"):
        Engine.load(folder)
    FlashstepConfig(family="instaflow", prediction="epsilon", resolution=64).save(folder)
    with pytest.raises(CheckpointError, match=r"`prediction` must be one of \['flow', 'flow_match'\]"):
        Engine.load(folder)


def test_fp16_weights_are_upcast_on_cpu(copy_of):
    from diffusers import UNet2DConditionModel

    folder = copy_of()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    shutil.rmtree(folder / "unet")
    unet.half().save_pretrained(folder / "unet", safe_serialization=True)
    engine = Engine.load(folder)
    assert engine.unet.dtype == torch.float32
    assert engine.generate([GenerationRequest("a star", seed=0, num_inference_steps=1)]).images


def test_a_missing_base_only_disables_the_hybrid(copy_of):
    folder = copy_of()
    FlashstepConfig(family="lcm", default_steps=4, allowed_steps=(4,), resolution=64, base="no-such-model").save(folder)
    engine = Engine.load(folder)
    with pytest.raises(InvalidRequestError, match="no-such-model"):
        engine.validate(GenerationRequest("a star", seed=0, hybrid=True))
