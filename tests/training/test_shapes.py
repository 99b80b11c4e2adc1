"""The shapes world: deterministic renders, captions that say what is drawn, held-out pairs."""

import numpy as np
import pytest

from flashstep.training.shapes import (
    ATTRIBUTES,
    BACKGROUND_RGB,
    COLOR_RGB,
    HELD_OUT_PAIRS,
    IMAGE_SIZE,
    is_held_out,
    parse_prompt,
    render,
    render_seed,
    sample_scene,
    sample_training_example,
)


def test_same_seed_gives_identical_pixels():
    scene_a, img_a = render_seed(1234)
    scene_b, img_b = render_seed(1234)
    assert scene_a == scene_b
    assert img_a.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img_a.dtype == np.uint8
    assert np.array_equal(img_a, img_b)


def test_different_seeds_give_different_images():
    assert not np.array_equal(render_seed(1)[1], render_seed(2)[1])


def test_render_draws_the_object_colour_on_the_background():
    scene = sample_scene(np.random.default_rng(0), {"shape": "square", "color": "blue", "size": "large",
                                                    "position": "center", "background": "white"})
    img = render(scene)
    assert tuple(img[0, 0]) == BACKGROUND_RGB["white"]
    assert tuple(img[32, 32]) == COLOR_RGB["blue"]


def test_training_examples_never_contain_a_held_out_pair():
    for seed in range(3000):
        scene, _ = sample_training_example(seed)
        assert not is_held_out(scene.shape, scene.color), (seed, scene)


def test_held_out_pairs_are_rendered_when_asked_for_eval():
    shape, color = sorted(HELD_OUT_PAIRS)[0]
    scene, _ = render_seed(5, {"shape": shape, "color": color}, allow_held_out=True)
    assert (scene.shape, scene.color) == (shape, color)
    with pytest.raises(ValueError, match="held out"):
        sample_scene(np.random.default_rng(0), {"shape": shape, "color": color})


def test_captions_name_only_what_is_drawn():
    for seed in range(500):
        scene, caption = sample_training_example(seed)
        named = parse_prompt(caption)
        attrs = scene.attributes()
        assert all(attrs[k] == v for k, v in named.items()), (caption, attrs)


def test_left_out_attributes_are_spread_uniformly():
    colors = [sample_training_example(s)[0].color for s in range(4000)]
    counts = np.array([colors.count(c) for c in ATTRIBUTES["color"]])
    assert counts.min() > 0.6 * counts.mean()


def test_unknown_attribute_value_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match="`color`"):
        sample_scene(np.random.default_rng(0), {"color": "white"})
