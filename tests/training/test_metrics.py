"""ShapesBench formulas on hand-made inputs."""

import numpy as np
import pytest

from flashstep.training import metrics


def test_adherence_needs_every_named_attribute():
    named = [{"shape": "circle", "color": "red"}, {"shape": "star"}, {}]
    judged = [{"shape": "circle", "color": "blue"}, {"shape": "star", "color": "red"}, {"shape": "square"}]
    assert metrics.adherence(named, judged) == pytest.approx(2 / 3)
    assert metrics.adherence([], []) is None


def test_attribute_accuracy_counts_each_attribute_over_the_prompts_that_name_it():
    named = [{"shape": "circle", "color": "red"}, {"shape": "star"}, {"position": "left"}]
    judged = [
        {"shape": "circle", "color": "blue", "position": "top"},
        {"shape": "square", "color": "red", "position": "top"},
        {"shape": "star", "color": "red", "position": "left"},
    ]
    assert metrics.attribute_accuracy(named, judged) == {"color": 0.0, "position": 1.0, "shape": 0.5}
    assert metrics.attribute_accuracy([], []) == {}


def test_confusions_rank_each_attributes_misses_by_count_and_skip_hits():
    named = [{"color": "orange", "shape": "circle"}] * 3 + [{"color": "blue"}] * 2 + [{"color": "red"}]
    judged = [
        {"color": "yellow", "shape": "circle"},
        {"color": "yellow", "shape": "square"},
        {"color": "red", "shape": "circle"},
        {"color": "cyan"},
        {"color": "blue"},
        {"color": "red"},
    ]
    assert metrics.confusions(named, judged) == {
        "color": [("orange", "yellow", 2), ("blue", "cyan", 1), ("orange", "red", 1)],
        "shape": [("circle", "square", 1)],
    }
    assert metrics.confusions(named, judged, top=1)["color"] == [("orange", "yellow", 2)]
    assert metrics.confusions(named[-1:], judged[-1:]) == {}


def test_frechet_distance_of_identical_gaussians_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 6))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = a + np.array([3.0, 0, 0, 0, 0, 0])
    assert metrics.frechet_distance(a, shifted) == pytest.approx(9.0, rel=1e-6)


def test_frechet_distance_matches_closed_form_for_scaled_covariance():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20000, 3))
    b = 2.0 * rng.normal(size=(20000, 3))
    # Tr(I + 4I - 2 * sqrt(4I)) = 3 * (1 + 4 - 4) = 3
    assert metrics.frechet_distance(a, b) == pytest.approx(3.0, rel=0.05)


def test_normalised_entropy():
    ref = ["red", "blue", "green", "cyan"] * 4
    assert metrics.normalised_entropy(ref, ref) == pytest.approx(1.0)
    assert metrics.normalised_entropy(["red"] * 16, ref) == pytest.approx(0.0)
    assert metrics.normalised_entropy(["red", "blue"] * 8, ref) == pytest.approx(0.5)
    assert metrics.normalised_entropy(["red"] * 4, ["red"] * 4) is None


def test_negative_efficacy_counts_images_without_the_negated_value():
    negated = [{"color": "red"}, {"color": "red"}, {"shape": "circle"}]
    judged = [{"color": "red"}, {"color": "blue"}, {"shape": "star"}]
    assert metrics.negative_efficacy(negated, judged) == pytest.approx(2 / 3)
