"""bench/full_vocab_tokenizer.py and bench/decode_step.py --tiny: every case runs, the report has its keys.

Values checked, never times: the benchmark's figures are for the H200, these tests only keep it working.
"""

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from full_vocab_tokenizer import BOS_TOKEN, EOS_TOKEN, write_full_vocab_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def full_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    path = write_full_vocab_tokenizer(tmp_path_factory.mktemp("full_vocab"))
    return AutoTokenizer.from_pretrained(path)


def test_full_vocab_tokenizer_has_exactly_the_vocab_size(full_tokenizer):
    assert len(full_tokenizer) == 128256
    assert len(full_tokenizer.get_vocab()) == 128256
    assert full_tokenizer.bos_token == BOS_TOKEN and full_tokenizer.bos_token_id == 256
    assert full_tokenizer.eos_token == EOS_TOKEN and full_tokenizer.eos_token_id == 257


def test_full_vocab_tokenizer_round_trips_text(full_tokenizer):
    text = "Hello, world! SELECT name FROM users WHERE id = 42;\n\tdéjà vu, 日本語 🙂"
    ids = full_tokenizer(text)["input_ids"]
    assert ids[0] == full_tokenizer.bos_token_id
    assert full_tokenizer.decode(ids, skip_special_tokens=True) == text
    # Merged tokens are used: far fewer ids than bytes.
    assert len(ids) < len(text.encode()) * 0.8


def test_full_vocab_tokenizer_decodes_random_ids_to_text_of_realistic_length(full_tokenizer):
    rng = random.Random(0)
    ids = [rng.randrange(258, len(full_tokenizer)) for _ in range(256)]
    pieces = [full_tokenizer.decode([i]) for i in ids]
    assert all(pieces)
    lengths = [len(p.encode()) for p in pieces]
    assert max(lengths) <= 10
    assert 4 <= sum(lengths) / len(lengths) <= 8  # Llama 3's merged tokens average ~6 bytes
    assert sum(p.startswith(" ") for p in pieces) > len(pieces) // 4  # word-opening tokens


def test_full_vocab_tokenizer_is_deterministic_and_sized(tmp_path):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(write_full_vocab_tokenizer(tmp_path / "a", vocab_size=1000))
    b = AutoTokenizer.from_pretrained(write_full_vocab_tokenizer(tmp_path / "b", vocab_size=1000))
    assert len(a) == 1000 and a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="too small"):
        write_full_vocab_tokenizer(tmp_path / "c", vocab_size=100)
