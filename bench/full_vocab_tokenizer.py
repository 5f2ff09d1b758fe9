"""A tokenizer of a real model's full vocabulary size, built offline in about two seconds.

Benchmarks run on dummy weights, so the model's tokens are random ids. With a tiny vocabulary most
of them decode to nothing, the detokenizer's window never advances and its cost is not what it is
in production. This writes a byte-level BPE (the kind Llama 3, Qwen2 and GPT-2 use) whose vocabulary
and merges are constructed programmatically: the 256 byte tokens, bos/eos, and merged tokens of
2-10 bytes (mean ~6.5), mostly word-like (an optional leading space, then letters). Any id then
decodes to a few bytes of text, and any text round-trips.

    from full_vocab_tokenizer import write_full_vocab_tokenizer
    write_full_vocab_tokenizer("model_dir", vocab_size=128256)   # then AutoTokenizer.from_pretrained
"""

from __future__ import annotations

import random
import string
from pathlib import Path

BOS_TOKEN, EOS_TOKEN = "<|begin_of_text|>", "<|end_of_text|>"

# Share of merged tokens of each byte length (2..10): mostly word pieces of 4-8 bytes, mean ~6.5.
_LENGTH_WEIGHTS = {2: 4, 3: 10, 4: 14, 5: 15, 6: 15, 7: 13, 8: 11, 9: 9, 10: 9}
# Bytes that merged tokens are made of: a word is an optional space, then letters.
_LETTERS = string.ascii_lowercase * 10 + string.ascii_uppercase  # capitals a tenth as often
_OTHER = string.digits + ".,;:!?()[]{}=+-*/_'\"<>#\n"


def write_full_vocab_tokenizer(path, vocab_size: int = 128256, seed: int = 0) -> Path:
    """Save a HF fast tokenizer of exactly `vocab_size` tokens (bos/eos included) to `path`.

    Token ids: 0-255 the bytes, 256 bos, 257 eos, then merged tokens. Encoding prepends bos, as
    Llama 3's tokenizer does. Deterministic for a given `seed`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # GPT-2's byte-to-unicode table: the one the ByteLevel pre-tokenizer and decoder use.
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    if vocab_size < 256 + 2:
        raise ValueError(f"vocab_size {vocab_size} is too small: it needs at least 258 tokens "
                         "(the 256 bytes, bos and eos)")
    vocab = {byte_char[b]: b for b in range(256)}
    vocab[BOS_TOKEN], vocab[EOS_TOKEN] = 256, 257
    merges = _merges(vocab_size - len(vocab), byte_char, random.Random(seed))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    assert len(vocab) == vocab_size, (len(vocab), vocab_size)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                       special_tokens=[(BOS_TOKEN, 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=EOS_TOKEN)
    path = Path(path)
    fast.save_pretrained(path)
    return path


def _merges(count: int, byte_char: dict[int, str], rng: random.Random) -> list[tuple[str, str]]:
    """`count` distinct merges; each joins two tokens already made (or bytes).

    Words: a head (half of them opening with a space) and a tail of letters, so spaces only open
    words, as the ByteLevel pre-tokenizer splits text. A few tokens are pairs of digits and
    punctuation instead, as in code and numbers.
    """
    space = byte_char[ord(" ")]
    letters = [byte_char[ord(c)] for c in _LETTERS]  # repeats weight the random choice
    others = [byte_char[ord(c)] for c in _OTHER]
    # Word pieces by byte length: `spaced` open with a space, `plain` are letters only.
    spaced: dict[int, list[str]] = {2: [space + c for c in sorted(set(letters))]}
    plain: dict[int, list[str]] = {1: letters}
    merges = [(space, c) for c in sorted(set(letters))][:count]  # every spaced word starts from one
    made = {a + b for a, b in merges}
    lengths, weights = list(_LENGTH_WEIGHTS), list(_LENGTH_WEIGHTS.values())
    tries = 0
    while len(merges) < count:
        tries += 1
        assert tries < 100 * count, "no new tokens left to make at these lengths"
        if rng.random() < 0.03:
            left, right = rng.choice(others), rng.choice(others)
        else:
            length = rng.choices(lengths, weights)[0]
            cut = rng.randrange(1, length)
            heads = spaced if rng.random() < 0.5 else plain
            if cut not in heads or length - cut not in plain:
                continue
            left, right = rng.choice(heads[cut]), rng.choice(plain[length - cut])
        token = left + right
        if token in made:
            continue
        made.add(token)
        merges.append((left, right))
        if left not in others:
            (spaced if token.startswith(space) else plain).setdefault(len(token), []).append(token)
    return merges
