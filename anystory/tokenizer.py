"""A real CLIP tokenizer built offline from the BPE vocabulary that ships inside ``open_clip_torch``.

SDXL's tokenizers are CLIP's BPE (49,408 tokens). No hub is reachable here, so tests and the miniature rebuild
the exact vocabulary and merges from ``bpe_simple_vocab_16e6.txt.gz``, the way OpenAI's tokenizer derives them.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile


def _byte_alphabet() -> list:
    """The 256 printable stand-ins CLIP uses for raw bytes, in CLIP's order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    order = keep + [b for b in range(256) if b not in keep]
    by_byte = dict(zip(range(256), chars))
    return [by_byte[b] for b in order]


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple:
    """(vocab dict, merges list) identical to openai/clip-vit-large-patch14's tokenizer files."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def offline_clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A ``transformers.CLIPTokenizer`` with CLIP's full vocabulary; ``pad_token="!"`` matches SDXL's second one."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as d:
        vocab_file, merges_file = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(vocab_file, merges_file, pad_token=pad_token, model_max_length=model_max_length)
