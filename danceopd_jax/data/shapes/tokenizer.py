"""Word-level tokenizer over the shapes world's closed vocabulary.

The tokenizer is a `tokenizers` WordLevel model wrapped in transformers'
`PreTrainedTokenizerFast`, shipped as `tokenizer.json` next to this file.
Regenerate it with `python -m danceopd_jax.data.shapes.tokenizer`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from danceopd_jax.data.shapes import edits, prompts

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0..3; [PAD] must be 0
MAX_TEXT_LEN = 24
TOKENIZER_PATH = Path(__file__).with_name("tokenizer.json")


def world_texts() -> Iterator[str]:
    """Texts that cover the full vocabulary and the longest prompt/instruction."""
    return itertools.chain(prompts.vocabulary_texts(), edits.vocabulary_texts())


def build_tokenizer() -> Tokenizer:
    """Build the WordLevel tokenizer; raises if the longest text exceeds MAX_TEXT_LEN."""
    pre_tokenizer = pre_tokenizers.Whitespace()  # splits words from punctuation
    texts = list(world_texts())
    words = sorted({w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(text.lower())})
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # already in vocab: ids stay 0..3
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    longest = max(texts, key=lambda t: len(tokenizer.encode(t).ids))
    length = len(tokenizer.encode(longest).ids)
    if length > MAX_TEXT_LEN:
        raise ValueError(
            f"text {longest!r} needs {length} tokens > MAX_TEXT_LEN={MAX_TEXT_LEN}; raise it"
        )
    return tokenizer


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def load_tokenizer(path: str | Path = TOKENIZER_PATH) -> PreTrainedTokenizerFast:
    """Load the shipped tokenizer file (default) as a transformers tokenizer."""
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def unknown_words(tokenizer: PreTrainedTokenizerFast, text: str) -> list[str]:
    """The words of `text` the world's tokenizer maps to [UNK], in order."""
    vocab = tokenizer.get_vocab()
    words = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text.lower())
    return [w for w, _ in words if w not in vocab or w in SPECIAL_TOKENS]


def encode(
    tokenizer: PreTrainedTokenizerFast, texts: Iterable[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize to (input_ids int32 [n, MAX_TEXT_LEN], attention_mask bool), padded with [PAD].

    "" encodes to [BOS, EOS] (the unconditional prompt for classifier-free
    guidance). Too-long texts raise instead of being silently truncated.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, MAX_TEXT_LEN), np.int32), np.zeros((0, MAX_TEXT_LEN), bool)
    batch = tokenizer(texts, padding="max_length", max_length=MAX_TEXT_LEN, truncation=False)
    for text, ids in zip(texts, batch["input_ids"], strict=True):
        if len(ids) > MAX_TEXT_LEN:
            raise ValueError(
                f"text {text!r} has {len(ids)} tokens > MAX_TEXT_LEN={MAX_TEXT_LEN}; shorten it"
            )
    return np.asarray(batch["input_ids"], np.int32), np.asarray(batch["attention_mask"], bool)


if __name__ == "__main__":
    build_tokenizer().save(str(TOKENIZER_PATH), pretty=True)
    print(f"wrote {TOKENIZER_PATH}")
