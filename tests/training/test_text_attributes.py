"""The text encoder's attribute heads: what a caption names becomes a class, and the loss teaches the
encoder to tell apart the words the epsilon loss alone left indistinguishable (position)."""

import numpy as np
import pytest
import torch

from flashstep.training.architecture import ShapesArch, build_text_encoder
from flashstep.training.shapes import ATTRIBUTES, POSITIONS, caption_for
from flashstep.training.text_attributes import AttributeHeads, attribute_loss, attribute_targets
from flashstep.training.tokenizer import build_tokenizer


def test_targets_are_the_named_value_or_zero_for_unnamed():
    targets = attribute_targets(["a small red circle on the left, black background", "a star", ""])
    assert targets["shape"].tolist() == [ATTRIBUTES["shape"].index("circle") + 1, ATTRIBUTES["shape"].index("star") + 1, 0]
    assert targets["color"].tolist() == [ATTRIBUTES["color"].index("red") + 1, 0, 0]
    assert targets["size"].tolist() == [ATTRIBUTES["size"].index("small") + 1, 0, 0]
    assert targets["position"].tolist() == [POSITIONS.index("left") + 1, 0, 0]
    assert targets["background"].tolist() == [ATTRIBUTES["background"].index("black") + 1, 0, 0]


def test_heads_pool_only_real_tokens():
    heads = AttributeHeads(hidden=8)
    hidden = torch.randn(1, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    padded = hidden.clone()
    padded[:, 3:] = 100.0  # padding positions must not change the logits
    a, b = heads(hidden, mask), heads(padded, mask)
    assert all(torch.allclose(a[k], b[k]) for k in a)
    assert {k: v.shape[-1] for k, v in a.items()} == {k: len(v) + 1 for k, v in ATTRIBUTES.items()}


@pytest.mark.slow
def test_the_loss_teaches_a_text_encoder_to_tell_left_from_right(tmp_path):
    torch.manual_seed(0)
    arch = ShapesArch.tiny()
    tokenizer = build_tokenizer(tmp_path / "tok", model_max_length=arch.text_max_length)
    encoder = build_text_encoder(arch, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    heads = AttributeHeads(arch.text_hidden)
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=3e-3)
    rng = np.random.default_rng(0)

    def encode(captions):
        tokens = tokenizer(captions, padding="max_length", max_length=arch.text_max_length, return_tensors="pt")
        return encoder(tokens.input_ids).last_hidden_state, tokens.attention_mask

    def position_accuracy():
        captions = [caption_for({"shape": "circle", "position": p}, rng) for p in POSITIONS]
        with torch.no_grad():
            logits = heads(*encode(captions))["position"]
        return (logits.argmax(-1) == attribute_targets(captions)["position"]).float().mean().item()

    before = position_accuracy()
    for _ in range(150):
        captions = [
            caption_for({name: values[rng.integers(len(values))] for name, values in ATTRIBUTES.items() if rng.random() < 0.6}, rng)
            for _ in range(32)
        ]
        loss = attribute_loss(heads, *encode(captions), captions)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 1.0 and position_accuracy() == 1.0
