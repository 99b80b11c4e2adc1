"""NASA negative prompts: cross-attention only, exact at alpha 0, the SNOOPI formula otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from flashstep.models.denoiser import Conditioning, Denoiser
from flashstep.models.nasa import NasaAttnProcessor, install_nasa_processors, nasa_context
from flashstep.models.outputs import GenerationRequest


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


def test_only_cross_attention_processors_are_replaced(teacher):
    for name, module in teacher.unet.named_modules():
        if not isinstance(module, Attention):
            continue
        if module.is_cross_attention:
            assert isinstance(module.processor, NasaAttnProcessor), name
            assert name.endswith("attn2")
        else:
            assert not isinstance(module.processor, NasaAttnProcessor), name
            assert name.endswith("attn1")


def test_install_counts_cross_attention_modules(tiny_unet):
    import copy

    unet = copy.deepcopy(tiny_unet)
    cross = [m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
    assert install_nasa_processors(unet) == len(cross) > 0


def test_processor_matches_the_snoopi_formula():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, pos, neg = torch.randn(3, 10, 16), torch.randn(3, 7, 12), torch.randn(3, 5, 12)
    alphas = (0.0, 0.3, 0.7)
    attn.set_processor(NasaAttnProcessor())
    with torch.no_grad(), nasa_context(neg, alphas):
        out = attn(x, encoder_hidden_states=pos)

    def heads(t):  # (B, L, H*D) -> (B, H, L, D)
        return t.view(t.shape[0], t.shape[1], 2, 8).transpose(1, 2)

    with torch.no_grad():
        q = heads(attn.to_q(x))
        z_pos = torch.softmax(q @ heads(attn.to_k(pos)).transpose(-1, -2) / 8**0.5, -1) @ heads(attn.to_v(pos))
        z_neg = torch.softmax(q @ heads(attn.to_k(neg)).transpose(-1, -2) / 8**0.5, -1) @ heads(attn.to_v(neg))
        z = z_pos - torch.tensor(alphas).view(3, 1, 1, 1) * z_neg  # subtracted before to_out
        expected = attn.to_out[0](z.transpose(1, 2).reshape(3, 10, 16))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_processor_without_context_equals_diffusers_default(tiny_unet):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, pos = torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        reference = attn(x, encoder_hidden_states=pos)
        attn.set_processor(NasaAttnProcessor())
        torch.testing.assert_close(attn(x, encoder_hidden_states=pos), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("engine_name", ["swiftbrush", "teacher", "lcm", "instaflow", "hypersd"])
def test_alpha_changes_the_image(request, engine_name):
    engine = request.getfixturevalue(engine_name)
    steps = min(engine.config.allowed_steps)
    no_cfg = {"guidance_scale": 0.0} if engine_name == "teacher" else {}  # the uncond would differ under CFG
    common = dict(prompt="a red circle", seed=3, num_inference_steps=steps, **no_cfg)
    plain = engine.generate([GenerationRequest(**common)])
    steered = engine.generate([GenerationRequest(**common, negative_prompt="blue", nasa_alpha=0.5)])
    assert np.abs(pixels(steered) - pixels(plain)).mean() > 0.5


def test_an_alpha_zero_row_of_a_nasa_batch_is_the_plain_prediction(swiftbrush):
    # Requests with a negative prompt and alpha 0 are refused (nothing would read the negative), but
    # rows at alpha 0 still reach the processors: CFG's uncond half under NASA.
    reqs = [swiftbrush.validate(GenerationRequest("a red circle", seed=3, negative_prompt="blue", nasa_alpha=0.5))] * 2
    cond = swiftbrush._conditioning(reqs, cfg=False)
    cond.nasa_alpha = (0.0, 0.5)
    plain = Conditioning(prompt_embeds=cond.prompt_embeds[:1])
    x = torch.randn(2, swiftbrush.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, C, h, w)
    t = swiftbrush.config.conditioning_timestep
    with torch.no_grad():
        mixed = Denoiser(swiftbrush.unet, cond, swiftbrush.config.prediction, swiftbrush.schedule)(x, t)
        reference = Denoiser(swiftbrush.unet, plain, swiftbrush.config.prediction, swiftbrush.schedule)(x[:1], t)
    torch.testing.assert_close(mixed[:1], reference, rtol=1e-5, atol=1e-6)
    assert (mixed[1] - reference[0]).abs().mean() > 1e-3  # the steered row does move


def test_alpha_defaults_to_the_checkpoint_value(swiftbrush):
    filled = swiftbrush.validate(GenerationRequest("a star", seed=0, negative_prompt="red"))
    assert filled.nasa_alpha == swiftbrush.config.nasa_alpha == 0.1
    default = swiftbrush.generate([GenerationRequest("a star", seed=0, negative_prompt="red")])
    explicit = swiftbrush.generate([GenerationRequest("a star", seed=0, negative_prompt="red", nasa_alpha=0.1)])
    np.testing.assert_array_equal(pixels(default), pixels(explicit))


def test_teacher_with_cfg_keeps_the_classic_negative_prompt(teacher):
    # alpha 0: the negative prompt still replaces CFG's empty uncond prompt, so the image changes.
    base = dict(prompt="a red circle", seed=4, num_inference_steps=2, guidance_scale=5.0, nasa_alpha=0.0)
    plain = teacher.generate([GenerationRequest(**base)])
    negative = teacher.generate([GenerationRequest(**base, negative_prompt="blue")])
    assert np.abs(pixels(negative) - pixels(plain)).mean() > 0.5
    assert negative.unet_evals == 4  # CFG: two UNet passes per step, NASA adds none


def test_mixed_alphas_in_one_batch_equal_each_alone(swiftbrush):
    reqs = [GenerationRequest("a red circle", seed=s, negative_prompt="red", nasa_alpha=a)
            for s, a in [(1, 0.2), (2, 0.6), (3, 0.2)]]  # fmt: skip
    batched = pixels(swiftbrush.generate(reqs))
    alone = np.concatenate([pixels(swiftbrush.generate([r])) for r in reqs])
    assert np.abs(batched - alone).mean() <= 1.0
