"""A CLIP-format BPE tokenizer learned from the shapes world's captions.

Stable Diffusion pipelines load `CLIPTokenizer` from `vocab.json` + `merges.txt`. No pretrained
CLIP vocabulary can be downloaded here, so we learn the merges from our own captions with the
`tokenizers` BPE trainer and lay the vocabulary out exactly as CLIP's is laid out: the 256
byte-level characters, the same with the end-of-word mark `</w>`, one entry per merge, then the
start/end tokens. Words outside the world's vocabulary still tokenize (down to characters), so any
English prompt is accepted and merely unfamiliar.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from transformers import CLIPTokenizer

from flashstep.training.shapes import ATTRIBUTES, POSITION_PHRASE, sample_training_example

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _corpus(n_captions: int, seed: int) -> list[str]:
    captions = [sample_training_example(seed + i)[1] for i in range(n_captions)]
    # Every vocabulary word at least once, held-out colours and shapes included.
    words = [v for values in ATTRIBUTES.values() for v in values]
    words += list(POSITION_PHRASE.values()) + ["a", "an", "the", "shape", "object", "background", "on", "grey"]
    return captions + words


def learn_merges(n_captions: int = 4000, seed: int = 0, vocab_size: int = 700) -> list[tuple[str, str]]:
    """BPE merges in rank order, learned on sampled captions (lower-cased, split like CLIP)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    rng_order = np.random.default_rng(seed)
    corpus = _corpus(n_captions, seed)
    rng_order.shuffle(corpus)
    tok.train_from_iterator(corpus, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def save_clip_tokenizer(folder: str | Path, merges: list[tuple[str, str]], model_max_length: int = 32) -> CLIPTokenizer:
    """Write vocab.json, merges.txt and the tokenizer config; return the loaded CLIPTokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + END_OF_WORD for c in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {}
    for token in vocab_list:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    # vocab.json + merges.txt are what every transformers version reads; save_pretrained adds
    # the config (model_max_length) and the fast tokenizer file beside them.
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, pad_token=EOS)
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def build_tokenizer(folder: str | Path, model_max_length: int = 32, seed: int = 0) -> CLIPTokenizer:
    """Learn merges from the world and save a CLIP tokenizer to `folder`."""
    return save_clip_tokenizer(folder, learn_merges(seed=seed), model_max_length=model_max_length)
