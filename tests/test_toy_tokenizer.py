"""The local CLIP BPE tokenizer: whole-word tokens for toy words, every byte still encodable."""

from __future__ import annotations

from components.toy.render import DIGIT_WORDS, caption_for
from components.toy.tokenizer import (
    BOS,
    EOS,
    TOY_WORDS,
    build_toy_tokenizer,
    byte_symbols,
    word_merges,
)


def test_byte_symbols_are_256_distinct_printable_characters():
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and all(s.isprintable() for s in symbols)
    assert symbols[ord("a")] == "a"


def test_word_merges_build_the_word_left_to_right():
    assert word_merges("two") == [("t", "w"), ("tw", "o</w>")]


def test_toy_words_are_single_tokens_and_unknown_text_still_encodes(tmp_path):
    tok = build_toy_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    for digit, word in enumerate(DIGIT_WORDS):
        ids = tok(caption_for(digit)).input_ids
        assert tok.convert_ids_to_tokens(ids) == [BOS, "a</w>", "handwritten</w>", "digit</w>", f"{word}</w>", EOS]
    assert len(set(TOY_WORDS)) == len(TOY_WORDS)
    ids = tok("Zebra #42!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and tok.unk_token_id not in ids[1:ids.index(tok.eos_token_id)]
