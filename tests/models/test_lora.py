"""Hyper-SD-style LoRA files: public key formats parsed, fused at load as W + scale * (alpha/r) * B @ A."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flashstep.models.engine import Engine
from flashstep.models.errors import CheckpointError
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.lora import _lookup, fuse_lora, read_lora
from flashstep.models.outputs import GenerationRequest

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # (32, 32) Linear
CROSS = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"  # (32, 32) Linear from 32-d text
CONV = "down_blocks.0.resnets.0.conv1"  # (32, 32, 3, 3) Conv2d
TEXT = "text_model.encoder.layers.0.self_attn.q_proj"  # (32, 32) Linear in the text encoder, public naming
RANK = 4


def lora_pair(out_features: int, in_shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((RANK, *in_shape), generator=g) * 0.1  # A
    up = torch.randn((out_features, RANK, *([1, 1] if len(in_shape) == 3 else [])), generator=g) * 0.1  # B
    return down, up


@pytest.fixture(scope="module")
def pairs():
    return {
        ATTN: lora_pair(32, (32,), 0),
        CROSS: lora_pair(32, (32,), 1),
        CONV: lora_pair(32, (32, 3, 3), 2),
        TEXT: lora_pair(32, (32,), 3),
    }


def peft_file(path, pairs) -> None:
    """The diffusers/PEFT key format of the public Hyper-SD and LCM-LoRA files."""
    state = {}
    for module, (down, up) in pairs.items():
        prefix = "text_encoder" if module.startswith("text_model") else "unet"
        state[f"{prefix}.{module}.lora_A.weight"] = down.contiguous()
        state[f"{prefix}.{module}.lora_B.weight"] = up.contiguous()
    save_file(state, str(path))


def kohya_file(path, pairs, alpha: float) -> None:
    """kohya's format: underscored module names, lora_down/lora_up, a per-layer alpha."""
    state = {}
    for module, (down, up) in pairs.items():
        prefix = "lora_te_" if module.startswith("text_model") else "lora_unet_"
        key = prefix + module.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, str(path))


def expected_delta(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if down.ndim == 4:
        return (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])
    return up @ down


def hypersd_folder(tmp_path, teacher_dir, lora_name: str, **config) -> FlashstepConfig:
    """A LoRA-only checkpoint: flashstep.json + the LoRA file; every other piece comes from its base."""
    folder = tmp_path / "hypersd"
    folder.mkdir(exist_ok=True)
    FlashstepConfig(
        family="hypersd", default_steps=1, allowed_steps=(1, 2, 4, 8), resolution=64, base=str(teacher_dir),
        lora=lora_name, **config,
    ).save(folder)  # fmt: skip
    return folder


def test_peft_lora_fuses_onto_the_base_unet(tmp_path, teacher_dir, teacher, pairs):
    folder = hypersd_folder(tmp_path, teacher_dir, "Hyper-SD15-1step-lora.safetensors", lora_scale=0.7)
    peft_file(folder / "Hyper-SD15-1step-lora.safetensors", pairs)
    engine = Engine.load(folder)
    base = dict(teacher.unet.named_modules())
    fused = dict(engine.unet.named_modules())
    for module in (ATTN, CROSS, CONV):
        down, up = pairs[module]
        expected = base[module].weight + 0.7 * expected_delta(down, up)
        torch.testing.assert_close(fused[module].weight, expected, rtol=1e-6, atol=1e-6)
    # Untouched layers stay the base's; the text encoder's LoRA is fused too.
    untouched = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    torch.testing.assert_close(fused[untouched].weight, base[untouched].weight, rtol=0, atol=0)
    text_base = _lookup(dict(teacher.text_encoders[0].named_modules()), TEXT).weight
    text_fused = _lookup(dict(engine.text_encoders[0].named_modules()), TEXT).weight
    torch.testing.assert_close(text_fused, text_base + 0.7 * expected_delta(*pairs[TEXT]), rtol=1e-6, atol=1e-6)
    # The hybrid's base is the unfused teacher, not this fused copy.
    assert not torch.equal(dict(engine.base_engine().unet.named_modules())[ATTN].weight, fused[ATTN].weight)
    out = engine.generate([GenerationRequest("a red circle", seed=1, num_inference_steps=2)])
    assert out.unet_evals == 2 and out.images[0].size == (64, 64)


def test_kohya_lora_with_alpha_scales_by_alpha_over_rank(tmp_path, teacher_dir, teacher, pairs):
    folder = hypersd_folder(tmp_path, teacher_dir, "lora.safetensors")
    kohya_file(folder / "lora.safetensors", pairs, alpha=2.0)
    engine = Engine.load(folder)
    base, fused = dict(teacher.unet.named_modules()), dict(engine.unet.named_modules())
    for module in (ATTN, CROSS, CONV):
        expected = base[module].weight + (2.0 / RANK) * expected_delta(*pairs[module])
        torch.testing.assert_close(fused[module].weight, expected, rtol=1e-6, atol=1e-6)


def test_fusion_matches_diffusers_load_lora_weights(tmp_path, teacher_dir, pairs):
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    path = tmp_path / "lora.safetensors"
    peft_file(path, {k: v for k, v in pairs.items() if k != TEXT})
    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.5)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers

    ours = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, requires_safety_checker=False).unet
    fuse_lora({"unet": ours}, read_lora(path), scale=0.5)
    reference = dict(pipe.unet.named_modules())
    for module in (ATTN, CROSS, CONV):
        torch.testing.assert_close(dict(ours.named_modules())[module].weight, reference[module].weight,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_old_diffusers_attention_processor_keys_are_read(tmp_path, pairs):
    down, up = pairs[ATTN]
    attn = ATTN.rsplit(".", 1)[0]
    path = tmp_path / "old.safetensors"
    save_file({f"unet.{attn}.processor.to_q_lora.down.weight": down, f"unet.{attn}.processor.to_q_lora.up.weight": up},
              str(path))  # fmt: skip
    (layer,) = read_lora(path)
    assert (layer.target, layer.module) == ("unet", ATTN)


def test_a_lora_for_another_architecture_is_refused(tmp_path, teacher_dir, pairs):
    folder = hypersd_folder(tmp_path, teacher_dir, "lora.safetensors")
    peft_file(folder / "lora.safetensors", {"down_blocks.7.attentions.0.proj_in": pairs[ATTN]})
    with pytest.raises(CheckpointError, match="down_blocks.7"):
        Engine.load(folder)


def test_lora_needs_its_base(tmp_path, pairs):
    folder = tmp_path / "orphan"
    folder.mkdir()
    FlashstepConfig(family="hypersd", base="no-such-base", lora="lora.safetensors", resolution=64).save(folder)
    peft_file(folder / "lora.safetensors", pairs)
    with pytest.raises(CheckpointError, match="no-such-base"):
        Engine.load(folder)


def test_hypersd_lora_model_samples_with_tcd_and_ddim(tmp_path, teacher_dir, pairs):
    folder = hypersd_folder(tmp_path, teacher_dir, "lora.safetensors", eta=1.0)
    peft_file(folder / "lora.safetensors", pairs)
    tcd = Engine.load(folder)
    ddim = Engine.load(folder, sampler="ddim")
    assert (tcd.sampler_name, ddim.sampler_name) == ("tcd", "ddim")
    req = GenerationRequest("a star", seed=3, num_inference_steps=4)
    a = np.asarray(tcd.generate([req]).images[0], dtype=float)
    b = np.asarray(ddim.generate([req]).images[0], dtype=float)
    assert np.abs(a - b).mean() > 0.1  # eta 1 re-noises between steps, DDIM does not
    assert json.loads((folder / "flashstep.json").read_text())["lora"] == "lora.safetensors"


def test_a_public_base_folder_with_a_hyper_sd_lora_file_loads_with_family_given(tmp_path, teacher_dir, teacher, pairs):
    import shutil

    folder = shutil.copytree(teacher_dir, tmp_path / "sd15-with-hyper-lora")
    (folder / "flashstep.json").unlink()
    peft_file(folder / "Hyper-SD15-1step-lora.safetensors", pairs)
    engine = Engine.load(folder, family="hypersd")
    assert engine.config.lora == "Hyper-SD15-1step-lora.safetensors" and engine.sampler_name == "tcd"
    fused, base = dict(engine.unet.named_modules()), dict(teacher.unet.named_modules())
    torch.testing.assert_close(fused[ATTN].weight, base[ATTN].weight + expected_delta(*pairs[ATTN]), rtol=1e-6, atol=1e-6)
