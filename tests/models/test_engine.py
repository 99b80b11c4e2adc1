"""The Engine's contract: loading facts, request validation, batch keys, results, caching, threads."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch

from flashstep.models.contract import EngineProtocol
from flashstep.models.engine import Engine
from flashstep.models.errors import CheckpointError, InvalidRequestError
from flashstep.models.outputs import GenerationRequest, GenerationResult
from flashstep.models.prompts import MAX_ENTRY_SHARE, PromptCache, PromptEmbedding, embedding_bytes
from flashstep.models.schedule import cpu_generators, randn_per_sample
from flashstep.models.validation import MAX_SEED


def pixels(result: GenerationResult) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


# ----- loading -----


def test_loaded_engine_describes_itself(teacher, teacher_dir):
    assert teacher.name == "shapes-teacher" and teacher.path == teacher_dir
    assert teacher.family == teacher.config.family == "teacher"
    assert re.fullmatch(r"shapes-teacher@[0-9a-f]{10}", teacher.version)
    assert teacher.device == torch.device("cpu") and teacher.dtype == torch.float32
    assert teacher.max_prompt_tokens == 30  # 32-token tokenizer minus start and end tokens
    assert teacher.sampler_name == "dpmpp_2m"


def test_version_changes_with_the_config(teacher, swiftbrush):
    assert teacher.version.split("@")[1] != swiftbrush.version.split("@")[1]


def test_memory_bytes_counts_parameters_and_buffers(teacher):
    modules = [teacher.unet, teacher.vae, *teacher.text_encoders]
    expected = sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))
    assert teacher.memory_bytes() == expected > 0


def test_engine_is_built_by_load_only():
    with pytest.raises(TypeError):
        Engine()


def test_sampler_choice(teacher_dir, models_root, teacher):
    ddim = Engine.load(teacher_dir, models_root=models_root, sampler="ddim")
    req = GenerationRequest("a red circle", seed=1)
    assert ddim.sampler_name == "ddim"
    assert np.abs(pixels(ddim.generate([req])) - pixels(teacher.generate([req]))).mean() > 0.1
    with pytest.raises(CheckpointError, match="dpmpp_2m"):
        Engine.load(teacher_dir, sampler="tcd")


def test_close_drops_modules(teacher_dir):
    engine = Engine.load(teacher_dir)
    engine.close()
    assert engine.unet is None and engine.vae is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate([GenerationRequest("a star", seed=0)])


def test_a_loaded_engine_satisfies_the_server_contract(teacher):
    assert isinstance(teacher, EngineProtocol)


# ----- validation -----


def test_validate_fills_the_checkpoint_defaults(teacher, swiftbrush):
    filled = teacher.validate(GenerationRequest("a red circle", seed=1))
    assert (filled.num_inference_steps, filled.guidance_scale, filled.nasa_alpha) == (4, 5.0, 0.1)
    assert (filled.height, filled.width) == (64, 64)
    filled = swiftbrush.validate(GenerationRequest("a red circle", seed=1))
    assert (filled.num_inference_steps, filled.guidance_scale) == (1, 0.0)


@pytest.mark.parametrize(("changes", "field", "words"), [
    (dict(prompt=""), "prompt", ["`prompt`", "''"]),
    (dict(prompt="   "), "prompt", ["`prompt`"]),
    (dict(prompt="circle " * 40), "prompt", ["`prompt`", "40 tokens", "at most 30"]),
    (dict(negative_prompt="red " * 31), "negative_prompt", ["`negative_prompt`", "31 tokens", "at most 30"]),
    (dict(num_inference_steps=3), "num_inference_steps", ["`num_inference_steps`", "[1, 2, 4]", "3"]),
    (dict(guidance_scale=-1.0), "guidance_scale", ["`guidance_scale`", "[0, 30]", "-1.0"]),
    (dict(guidance_scale=30.5), "guidance_scale", ["`guidance_scale`", "30.5"]),
    (dict(guidance_scale=float("nan")), "guidance_scale", ["`guidance_scale`", "nan"]),
    (dict(nasa_alpha=1.5), "nasa_alpha", ["`nasa_alpha`", "[0, 1]", "1.5"]),
    (dict(nasa_alpha=-0.1), "nasa_alpha", ["`nasa_alpha`", "-0.1"]),
    (dict(height=48), "height", ["`height`", "[64, 32]", "48"]),
    (dict(width=60), "width", ["`width`", "multiples of 8", "60"]),
    (dict(seed=-1), "seed", ["`seed`", str(MAX_SEED), "-1"]),
    (dict(seed=MAX_SEED + 1), "seed", ["`seed`", str(MAX_SEED + 1)]),
    (dict(seed=2**63), "seed", ["`seed`", str(2**63)]),
    (dict(hybrid=True), "hybrid", ["`hybrid`", "base"]),
    (dict(tiny_decoder=True), "tiny_decoder", ["`tiny_decoder`", "vae_tiny"]),
])  # fmt: skip
def test_invalid_requests_name_the_field_value_and_allowed_range(teacher, changes, field, words):
    request = GenerationRequest(**{"prompt": "a red circle", "seed": 1, **changes})
    with pytest.raises(InvalidRequestError) as err:
        teacher.validate(request)
    assert err.value.field == field
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_guidance_is_refused_by_families_that_ignore_it(swiftbrush, lcm):
    for engine in (swiftbrush, lcm):
        with pytest.raises(InvalidRequestError) as err:
            engine.validate(GenerationRequest("a star", seed=0, guidance_scale=4.0))
        assert err.value.field == "guidance_scale" and engine.family in str(err.value)
        assert engine.validate(GenerationRequest("a star", seed=0, guidance_scale=0.0)).guidance_scale == 0.0


@pytest.mark.parametrize(("engine_name", "changes", "why"), [
    ("swiftbrush", dict(nasa_alpha=0.0), "takes no classifier-free guidance"),
    ("lcm", dict(nasa_alpha=0), "takes no classifier-free guidance"),
    ("teacher", dict(nasa_alpha=0.0, guidance_scale=1.0), "`guidance_scale` 1 (classifier-free guidance is off at <= 1)"),
    ("hypersd", dict(nasa_alpha=0.0), "`guidance_scale` 0"),  # guided family, default scale 0
    ("instaflow", dict(nasa_alpha=0.0, guidance_scale=0.5), "`guidance_scale` 0.5"),
    ("lcm", dict(nasa_alpha=0.0, hybrid=True, guidance_scale=1.0), "`guidance_scale` 1"),  # the base's CFG, off
])  # fmt: skip
def test_a_negative_prompt_that_neither_nasa_nor_cfg_reads_is_refused(request, engine_name, changes, why):
    engine = request.getfixturevalue(engine_name)
    with pytest.raises(InvalidRequestError) as err:
        engine.validate(GenerationRequest("a star", seed=0, negative_prompt="red", **changes))
    message = str(err.value)
    assert err.value.field == "negative_prompt"
    for words in ("`negative_prompt` has no effect", engine.name, f"family {engine.family}", "`nasa_alpha` 0", why,
                  "set `nasa_alpha` in (0, 1]"):  # fmt: skip
        assert words in message, (words, message)


@pytest.mark.parametrize(("engine_name", "changes"), [
    ("swiftbrush", dict()),  # NASA at the checkpoint's default alpha 0.1
    ("swiftbrush", dict(nasa_alpha=0.3)),
    ("teacher", dict(nasa_alpha=0.0)),  # CFG at the default scale 5: the negative is the uncond prompt
    ("teacher", dict(nasa_alpha=0.0, guidance_scale=1.5)),
    ("hypersd", dict(nasa_alpha=0.0, guidance_scale=2.0)),
    ("lcm", dict(nasa_alpha=0.0, hybrid=True)),  # the base step runs CFG at the base's scale 5
])  # fmt: skip
def test_a_negative_prompt_is_accepted_where_nasa_or_cfg_reads_it(request, engine_name, changes):
    engine = request.getfixturevalue(engine_name)
    assert engine.validate(GenerationRequest("a star", seed=0, negative_prompt="red", **changes)).negative_prompt == "red"


def test_an_empty_or_absent_negative_prompt_is_always_accepted(swiftbrush):
    for negative in (None, ""):
        swiftbrush.validate(GenerationRequest("a star", seed=0, negative_prompt=negative, nasa_alpha=0.0))


def test_other_sizes_in_the_allowed_set(teacher):
    result = teacher.generate([GenerationRequest("a star", seed=0, height=32, width=64, num_inference_steps=1)])
    assert result.images[0].size == (64, 32)


# ----- batch keys and results -----


def test_batch_key_groups_what_can_share_a_forward_pass(teacher):
    key = teacher.batch_key
    a = GenerationRequest("a red circle", seed=1)
    assert key(a) == key(GenerationRequest("a blue star", seed=2, guidance_scale=8.0, nasa_alpha=0.0))
    assert key(a) != key(GenerationRequest("a red circle", seed=1, num_inference_steps=2))
    assert key(a) != key(GenerationRequest("a red circle", seed=1, height=32))
    assert key(a) != key(GenerationRequest("a red circle", seed=1, guidance_scale=1.0))  # CFG off
    assert key(a) != key(GenerationRequest("a red circle", seed=1, negative_prompt="red"))  # NASA on
    assert key(a) == key(GenerationRequest("a red circle", seed=1, negative_prompt="red", nasa_alpha=0.0))
    hash(key(a))


def test_generate_returns_images_timings_and_unet_evals(teacher, swiftbrush):
    reqs = [GenerationRequest("a red circle", seed=1), GenerationRequest("a blue square", seed=2)]
    result = teacher.generate(reqs)
    assert isinstance(result, GenerationResult)
    assert len(result.images) == result.batch_size == 2
    assert all(im.size == (64, 64) and im.mode == "RGB" for im in result.images)
    assert result.unet_evals == 4 * 2  # 4 DPM++ steps with CFG
    assert result.model_version == teacher.version
    t = result.timings
    assert t.encode > 0 and t.denoise > 0 and t.decode > 0 and t.total == pytest.approx(t.encode + t.denoise + t.decode)
    assert swiftbrush.generate(reqs).unet_evals == 1


def test_instaflow_takes_optional_cfg(instaflow):
    plain = instaflow.generate([GenerationRequest("a star", seed=1, num_inference_steps=2)])
    guided = instaflow.generate([GenerationRequest("a star", seed=1, num_inference_steps=2, guidance_scale=1.5)])
    assert (plain.unet_evals, guided.unet_evals) == (2, 4)
    assert np.abs(pixels(guided) - pixels(plain)).mean() > 0.1


def test_seed_decides_the_image(swiftbrush):
    one = pixels(swiftbrush.generate([GenerationRequest("a star", seed=5)]))
    same = pixels(swiftbrush.generate([GenerationRequest("a star", seed=5)]))
    other = pixels(swiftbrush.generate([GenerationRequest("a star", seed=6)]))
    np.testing.assert_array_equal(one, same)
    assert np.abs(one - other).mean() > 1.0


def test_requests_with_different_batch_keys_are_refused_together(teacher):
    with pytest.raises(InvalidRequestError) as err:
        teacher.generate([GenerationRequest("a", seed=1), GenerationRequest("b", seed=1, num_inference_steps=2)])
    assert err.value.field == "requests"
    with pytest.raises(InvalidRequestError):
        teacher.generate([])


def test_teacher_matches_vanilla_diffusers(teacher, teacher_dir):
    """The same folder, noise and CFG scale through StableDiffusionPipeline (its DPM++ scheduler)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = randn_per_sample(cpu_generators([21]), (4, 8, 8), torch.device("cpu"), torch.float32)
    reference = pipe("a red circle", num_inference_steps=4, guidance_scale=5.0, latents=latents, height=64, width=64,
                     output_type="np").images[0] * 255  # fmt: skip
    ours = pixels(teacher.generate([GenerationRequest("a red circle", seed=21)]))[0]
    assert np.abs(ours - reference).mean() <= 1.0  # within 1/255 on average


# ----- prompt cache -----


def test_prompt_cache_is_a_bounded_lru_with_the_empty_prompt_pinned():
    emb = PromptEmbedding(torch.zeros(1, 1))
    texts = [f"t{i:02d}" for i in range(MAX_ENTRY_SHARE + 2)]  # keys of one length: every entry costs the same
    cache = PromptCache(max_bytes=MAX_ENTRY_SHARE * embedding_bytes(texts[0], emb))  # room for MAX_ENTRY_SHARE
    cache.put("", emb)
    for text in texts[:-1]:
        cache.put(text, emb)
    assert "" in cache and texts[0] not in cache and texts[1] in cache and texts[-2] in cache
    cache.get(texts[1])  # now the most recent; the next put evicts texts[2]
    cache.put(texts[-1], emb)
    assert texts[1] in cache and texts[2] not in cache and len(cache) == MAX_ENTRY_SHARE + 1


def test_generate_serves_repeated_prompts_from_the_cache(swiftbrush):
    swiftbrush.generate([GenerationRequest("a cached yellow star", seed=0)])
    assert "a cached yellow star" in swiftbrush.prompts.cache
    hits = swiftbrush.prompts.cache.hits
    swiftbrush.generate([GenerationRequest("a cached yellow star", seed=1)])
    assert swiftbrush.prompts.cache.hits == hits + 1


def test_a_prompt_is_tokenized_once_however_often_it_is_counted(swiftbrush):
    # validate() counts a prompt's tokens when the server takes the request, again when it keys
    # the batch and again in generate(): the count is cached so the tokenizer runs once.
    encoder = swiftbrush.prompts
    calls = []
    tokenizer = encoder.tokenizers[0]
    encoder.tokenizers[0] = lambda text, **kw: calls.append(text) or tokenizer(text, **kw)
    try:
        counts = {encoder.count_tokens("a counted green square") for _ in range(3)}
        request = GenerationRequest("a counted green square", seed=0)
        swiftbrush.validate(request)
        swiftbrush.batch_key(request)
    finally:
        encoder.tokenizers[0] = tokenizer
    assert counts == {len(tokenizer("a counted green square", add_special_tokens=False).input_ids)}
    assert calls == ["a counted green square"]


# ----- concurrency -----


def test_concurrent_generate_calls_match_sequential_ones(teacher):
    reqs = [GenerationRequest(f"a {c} circle", seed=i, num_inference_steps=2) for i, c in enumerate(
        ["red", "blue", "green", "pink", "cyan", "orange"])]  # fmt: skip
    expected = [pixels(teacher.generate([r])) for r in reqs]
    results: dict[int, np.ndarray] = {}
    errors = []

    def work(i: int) -> None:
        try:
            results[i] = pixels(teacher.generate([reqs[i]]))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for i, exp in enumerate(expected):
        np.testing.assert_allclose(results[i], exp, atol=1.0)


def test_warmup_runs(swiftbrush):
    swiftbrush.warmup()
