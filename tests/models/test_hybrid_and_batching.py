"""The diversity hybrid's UNet budget, and batch invariance: a request's image ignores its batch-mates."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest

from flashstep.models.engine import Engine
from flashstep.models.errors import InvalidRequestError
from flashstep.models.flashstep_config import FlashstepConfig
from flashstep.models.outputs import GenerationRequest
from tests.models.conftest import derive

# Mean absolute pixel difference allowed between a request served alone and inside a batch, in
# 0..255 units: 1/255 of the range (CPU fp32; batched matmuls may round differently).
BATCH_TOLERANCE = 1.0


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


@contextlib.contextmanager
def recording(unet):
    """Record (batch size, timestep) of every forward call of `unet`."""
    calls = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.shape[0], float(timestep.flatten()[0])))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# ----- hybrid -----


@pytest.mark.parametrize(("engine_name", "steps", "distilled_ts"), [
    ("lcm", 4, [749, 499, 249]),
    ("hypersd", 2, [499]),
    ("instaflow", 4, [750, 500, 250]),
])  # fmt: skip
def test_hybrid_base_takes_the_first_step_and_the_distilled_model_the_rest(request, engine_name, steps, distilled_ts):
    engine = request.getfixturevalue(engine_name)
    base = engine.base_engine()
    reqs = [GenerationRequest("a red circle", seed=s, num_inference_steps=steps, hybrid=True) for s in (1, 2, 3)]
    with recording(base.unet) as base_calls, recording(engine.unet) as distilled_calls:
        result = engine.generate(reqs)
    # Base: one UNet call at t=999 with CFG, i.e. uncond+cond rows (2 evaluations per image).
    assert base_calls == [(2 * len(reqs), 999.0)]
    # Distilled: the remaining steps, guidance 0 (one row per image).
    assert distilled_calls == [(len(reqs), t) for t in distilled_ts]
    assert result.unet_evals == 2 + (steps - 1)


def test_hybrid_without_base_cfg_evaluates_the_base_once(lcm):
    reqs = [GenerationRequest("a square", seed=1, num_inference_steps=2, hybrid=True, guidance_scale=0.0)]
    with recording(lcm.base_engine().unet) as base_calls:
        result = lcm.generate(reqs)
    assert base_calls == [(1, 999.0)]
    assert result.unet_evals == 1 + 1


def test_hybrid_changes_the_image_and_is_seeded(lcm):
    common = dict(prompt="a red circle", seed=9, num_inference_steps=4)
    plain = pixels(lcm.generate([GenerationRequest(**common)]))
    hybrid = pixels(lcm.generate([GenerationRequest(**common, hybrid=True)]))
    again = pixels(lcm.generate([GenerationRequest(**common, hybrid=True)]))
    assert np.abs(hybrid - plain).mean() > 0.5
    np.testing.assert_array_equal(hybrid, again)


def test_hybrid_guidance_defaults_to_the_base_models(lcm):
    filled = lcm.validate(GenerationRequest("a star", seed=0, hybrid=True))
    assert filled.guidance_scale == lcm.base_engine().config.default_guidance_scale == 5.0


def test_a_checkpoint_can_set_its_own_hybrid_guidance(lcm_dir, models_root, tmp_path):
    config = replace(FlashstepConfig.load(lcm_dir), hybrid_guidance_scale=1.0)
    engine = Engine.load(derive(lcm_dir, tmp_path / "shapes-lcm-cfg1", config), models_root=models_root)
    filled = engine.validate(GenerationRequest("a star", seed=0, hybrid=True))
    assert filled.guidance_scale == 1.0  # not the base's 5.0
    assert engine.validate(GenerationRequest("a star", seed=0, hybrid=True, guidance_scale=3.0)).guidance_scale == 3.0
    reqs = [GenerationRequest("a star", seed=0, num_inference_steps=2, hybrid=True)]
    with recording(engine.base_engine().unet) as base_calls:
        engine.generate(reqs)
    assert base_calls == [(1, 999.0)]  # guidance 1 is no CFG: one row, not two


def test_hybrid_is_refused_without_a_base_or_with_one_step(teacher, lcm, swiftbrush):
    with pytest.raises(InvalidRequestError) as err:
        teacher.validate(GenerationRequest("a star", seed=0, hybrid=True))
    assert err.value.field == "hybrid" and "base" in str(err.value)
    with pytest.raises(InvalidRequestError) as err:
        lcm.validate(GenerationRequest("a star", seed=0, hybrid=True, num_inference_steps=1))
    assert err.value.field == "hybrid" and "2 steps" in str(err.value)
    with pytest.raises(InvalidRequestError):
        swiftbrush.validate(GenerationRequest("a star", seed=0, hybrid=True))


# ----- batch invariance -----

PROMPTS = ["a red circle", "a blue square on the left", "a star", "green triangle", "a small pink diamond",
           "a large yellow star at the top", "a circle on a black background", "purple square"]  # fmt: skip


def mixed_requests(*, nasa: bool, **common) -> list[GenerationRequest]:
    """8 requests with one batch_key but different prompts, seeds, negatives (and NASA strengths)."""
    if nasa:  # every request steers away from its own negative, each with its own alpha
        negatives = ["red", "blue", "white background", "a circle", "green", "a star", "yellow", "black background"]
        alphas = [0.1, 0.5, 0.1, 0.2, 0.9, 0.1, 0.3, 0.05]
    else:  # negatives only as CFG's uncond prompt
        negatives = ["red", "blue", "", None, "green", "a star", None, "black background"]
        alphas = [0.0] * 8
    return [
        GenerationRequest(prompt=p, seed=1000 + 7 * i, negative_prompt=n, nasa_alpha=a, **common)
        for i, (p, n, a) in enumerate(zip(PROMPTS, negatives, alphas, strict=True))
    ]


@pytest.mark.parametrize(("engine_name", "common"), [
    ("teacher", dict(nasa=False, num_inference_steps=4)),  # DPM++ with CFG, negatives as uncond
    ("swiftbrush", dict(nasa=True)),
    ("hypersd", dict(nasa=True, num_inference_steps=4)),  # TCD, eta 1: fresh noise every step
    ("lcm", dict(nasa=True, num_inference_steps=4, hybrid=True)),  # base step with CFG, then re-noising
])  # fmt: skip
def test_eight_mixed_requests_match_each_alone(request, engine_name, common):
    engine = request.getfixturevalue(engine_name)
    reqs = mixed_requests(**common)
    if engine_name == "teacher":
        reqs = [GenerationRequest(**{**r.__dict__, "guidance_scale": 3.0 + i}) for i, r in enumerate(reqs)]
    assert len({engine.batch_key(r) for r in reqs}) == 1
    batched = pixels(engine.generate(reqs))
    alone = np.concatenate([pixels(engine.generate([r])) for r in reqs])
    per_image = np.abs(batched - alone).mean(axis=(1, 2, 3))
    assert per_image.max() <= BATCH_TOLERANCE, per_image


def test_nasa_batch_with_mixed_negatives_matches_each_alone(swiftbrush):
    reqs = [GenerationRequest(p, seed=50 + i, negative_prompt=n, nasa_alpha=a)
            for i, (p, n, a) in enumerate([("a red circle", "red", 0.1), ("a square", "blue", 0.4),
                                           ("a star", "a star", 0.1), ("a diamond", "white background", 1.0)])]  # fmt: skip
    assert len({swiftbrush.batch_key(r) for r in reqs}) == 1
    batched = pixels(swiftbrush.generate(reqs))
    alone = np.concatenate([pixels(swiftbrush.generate([r])) for r in reqs])
    assert np.abs(batched - alone).mean(axis=(1, 2, 3)).max() <= BATCH_TOLERANCE
