"""The learned CLIP-format tokenizer: whole words for the world's vocabulary, any text accepted."""

import pytest
from transformers import CLIPTokenizer

from flashstep.training.shapes import ATTRIBUTES
from flashstep.training.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    build_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


def test_round_trip(tokenizer):
    text = "a large red circle on the left , white background"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_every_attribute_value_is_one_token(tokenizer):
    for values in ATTRIBUTES.values():
        for word in values:
            assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_unknown_words_still_tokenize(tokenizer):
    ids = tokenizer("a zebra!", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "a zebra !"


def test_padding_to_model_max_length(tokenizer):
    assert tokenizer.model_max_length == 32
    out = tokenizer("red", padding="max_length", max_length=32, truncation=True).input_ids
    assert len(out) == 32
