"""bench/sd15_arch.py builds SD1.5 from the public configs; bench/sd15_cpu.py times and reports its stages."""

from __future__ import annotations

import json

import pytest
import torch

from flashstep.bench import sd15_arch, sd15_cpu


def test_modules_built_from_the_public_configs_have_sd15s_parameter_counts():
    counts = sd15_arch.parameter_counts()  # on the meta device: no weights allocated, no forward
    assert counts["unet"] == 859_520_964
    assert counts["vae"] == 83_653_863
    assert counts["text_encoder"] == 123_060_480
    assert 1_000_000 < counts["tiny_decoder"] < 1_500_000  # TAESD's decoder: about 1.2M


def _scaled_down_modules() -> tuple:
    """SD1.5's structure at toy widths, so the timing path runs in seconds."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        **{**sd15_arch.SD15_UNET, "block_out_channels": (32, 32, 64, 64), "norm_num_groups": 8,
           "cross_attention_dim": 32, "attention_head_dim": 2, "sample_size": 8}
    )  # fmt: skip
    vae = AutoencoderKL(**{**sd15_arch.SD15_VAE, "block_out_channels": (8, 16, 16, 16), "norm_num_groups": 4})
    text = CLIPTextModel(
        CLIPTextConfig(**{**sd15_arch.SD15_TEXT, "vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 32})
    )  # fmt: skip
    tiny = AutoencoderTiny(
        **{**sd15_arch.TAESD, "encoder_block_out_channels": (8, 8, 8, 8), "decoder_block_out_channels": (8, 8, 8, 8)}
    )
    return tuple(m.eval() for m in (unet, vae, text, tiny))


def test_stage_run_on_scaled_down_modules_writes_labelled_teacher_estimate_and_plot(tmp_path):
    report = sd15_cpu.run(repeats=1, modules=_scaled_down_modules(), latent_size=8, name="sd15", out_dir=tmp_path)

    saved = json.loads((tmp_path / "sd15.json").read_text())
    assert (tmp_path / "sd15.png").stat().st_size > 0
    f = saved["figures"]
    med = f["stages_median_s"]
    assert set(med) == {"text_encoder", "text_encoder_cfg", "unet_b1", "unet_b2_cfg", "vae_decode", "tiny_decode"}
    assert f["one_step_s"] == pytest.approx(med["text_encoder"] + med["unet_b1"] + med["vae_decode"])
    assert f["teacher_cfg_s"] == pytest.approx(med["text_encoder_cfg"] + 25 * med["unet_b2_cfg"] + med["vae_decode"])
    assert f["teacher_cfg_label"].startswith("estimated from measured per-step time")
    assert saved["settings"]["resolution"] == 64 and report["figures"]["one_step_speedup_vs_teacher_estimated"] > 0
