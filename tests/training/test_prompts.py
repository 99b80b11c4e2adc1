"""Prompt parsing and prompt files."""

import json

import pytest

from flashstep.training.prompts import PROMPTS_DIR, load_prompts, prompt_sets
from flashstep.training.shapes import is_held_out, parse_prompt


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a large red circle on the left, white background",
         {"size": "large", "color": "red", "shape": "circle", "position": "left", "background": "white"}),
        ("red circle", {"color": "red", "shape": "circle"}),
        ("a star on a black background", {"shape": "star", "background": "black"}),
        ("a small blue square at the top", {"size": "small", "color": "blue", "shape": "square", "position": "top"}),
        ("An orange Triangle in the centre on a grey background",
         {"color": "orange", "shape": "triangle", "position": "center", "background": "gray"}),
        ("two stars", {"shape": "star"}),
        ("a zebra", {}),
    ],
)
def test_parse_prompt_reads_the_world_vocabulary(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_text_and_jsonl_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\nred circle\n\n  blue star  \n")
    assert [s.prompt for s in load_prompts(text)] == ["red circle", "blue star"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a circle", "negative_prompt": "red"}) + "\n")
    (spec,) = load_prompts(jsonl)
    assert (spec.prompt, spec.negative_prompt) == ("a circle", "red")


def test_bad_prompt_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('red circle\n{"negative_prompt": "x"}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_prompts(bad)


def test_shipped_sets_match_their_generator_and_split_held_out_pairs():
    sets = prompt_sets()
    for name, specs in sets.items():
        assert [s.prompt for s in load_prompts(PROMPTS_DIR / f"{name}.jsonl")] == [s.prompt for s in specs]
    seen_pairs = [parse_prompt(s.prompt) for s in sets["seen"]]
    assert not any(is_held_out(p["shape"], p["color"]) for p in seen_pairs)
    assert all(is_held_out(parse_prompt(s.prompt)["shape"], parse_prompt(s.prompt)["color"]) for s in sets["heldout"])
    assert all(s.negative_prompt for s in sets["negative"])
