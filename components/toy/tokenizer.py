"""A local CLIP BPE tokenizer for the toy world, built from a word list (no downloads).

CLIP's tokenizer is byte-level BPE: every word is split into byte symbols (the last one
carrying the end-of-word marker `</w>`) and merged by rank. The vocabulary built here holds
every byte symbol (so any text encodes), and for each toy word the chain of left-to-right
merges that turns it into one token, so "a handwritten digit seven" is five tokens plus
start and end.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from components.toy.render import DIGIT_WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
TOY_WORDS = ["a", "handwritten", "digit", *DIGIT_WORDS,
             "in", "neon", "style", "glowing", "on", "dark", "background", "photo", "of", "the", "number"]


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP), in byte order.

    Printable latin-1 bytes stand for themselves; the others map to code points from 256 up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that build `word</w>` from its byte symbols: s e, se v, sev e, seve n</w>."""
    table = byte_symbols()
    chars = [table[b] for b in word.encode("utf-8")]
    chars[-1] += END_OF_WORD
    merges, prefix = [], chars[0]
    for symbol in chars[1:]:
        merges.append((prefix, symbol))
        prefix += symbol
    return merges


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a CLIP BPE tokenizer that encodes each of `words` as one token."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols)]
    merges: list[tuple[str, str]] = []
    for word in words:
        for pair in word_merges(word.lower()):
            if pair not in merges:
                merges.append(pair)
                tokens.append(pair[0] + pair[1])
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | Path, words: list[str] = TOY_WORDS) -> Path:
    """Write vocab.json and merges.txt for `words` into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_toy_tokenizer(folder: str | Path, words: list[str] = TOY_WORDS, max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over the toy words, its files written to `folder` (pad = end-of-text, as SD)."""
    write_tokenizer_files(folder, words)
    return CLIPTokenizer.from_pretrained(str(folder), bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                                         model_max_length=max_length)
