"""IncrementalDetokenizer against full decodes, on tiny tokenizers built here (no downloads)."""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from multilora.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Hello world! Héllo wörld, café crème brûlée.",
    "😀 emoji 🎉 party, 日本語のテキスト and naïve façade",
    "SELECT name FROM users WHERE id = 42; -- done",
]


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE tokenizer (the Llama 3 / Qwen2 / GPT-2 kind), trained on CORPUS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style BPE with byte fallback (the Llama 2 / Mistral kind).

    Its decoder strips one leading space from whatever it decodes, so a
    window that starts at a lone "▁" or after a skipped special token
    decodes differently from the full output.
    """
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "a", "b", "c", "é", "s", "t", "o", "p", "▁a", "▁b", "ab", "▁ab", "▁c", "▁s", "▁st", "op"]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [("▁", "a"), ("▁", "b"), ("a", "b"), ("▁a", "b"), ("▁", "c"), ("▁", "s"), ("▁s", "t"), ("o", "p")]
    model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def full_decode(tokenizer, ids, skip=True):
    return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def stream(tokenizer, ids, stop=(), skip=True):
    """Feed ids one by one; return (detokenizer, deltas, the stop string or None)."""
    detok = IncrementalDetokenizer(tokenizer, list(stop), skip_special_tokens=skip)
    deltas = []
    for n, token_id in enumerate(ids, start=1):
        hit = detok.append(token_id)
        finished = hit is not None or n == len(ids)
        deltas.append(detok.take_delta(finished))
        if hit is not None:
            return detok, deltas, hit
    return detok, deltas, None


def byte_token_ids(tokenizer, data: bytes) -> list[int]:
    """One token per byte: splits every multi-byte character across tokens."""
    table = bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([table[b] for b in data])


# --- exactness ---------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS + ["ünïcödé 🎉🎉 日本", "a😀b🎉c"])
def test_text_equals_full_decode_at_every_step(byte_bpe, text):
    ids = byte_bpe.encode(text)
    detok = IncrementalDetokenizer(byte_bpe, [])
    for n, token_id in enumerate(ids, start=1):
        assert detok.append(token_id) is None
        assert detok.text == full_decode(byte_bpe, ids[:n])
    assert detok.text == text


def test_fixture_really_splits_characters_across_tokens(byte_bpe):
    ids = byte_bpe.encode("日本語 😀")
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)


def test_emoji_split_into_single_bytes_is_held_back_until_complete(byte_bpe):
    ids = byte_token_ids(byte_bpe, "x😀".encode())
    detok = IncrementalDetokenizer(byte_bpe, [])
    deltas = []
    for token_id in ids:
        detok.append(token_id)
        deltas.append(detok.take_delta(finished=False))
    assert deltas == ["x", "", "", "", "😀"]
    assert detok.text == "x😀"


def test_incomplete_character_at_the_end_comes_out_when_finished(byte_bpe):
    ids = byte_token_ids(byte_bpe, "ab😀".encode()[:-1])  # output cut mid-emoji (max_tokens)
    detok = IncrementalDetokenizer(byte_bpe, [])
    for token_id in ids:
        detok.append(token_id)
    assert detok.text == full_decode(byte_bpe, ids)
    assert detok.text.endswith("\ufffd")
    assert detok.take_delta(finished=False) == "ab"
    assert detok.take_delta(finished=True) == full_decode(byte_bpe, ids)[2:]


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_random_token_streams_match_full_decode(byte_bpe, metaspace, skip, seed, caplog):
    # Random ids make invalid UTF-8, lone spaces and special tokens between
    # words: everything that can throw a decoding window out of step.
    rng = random.Random(seed)
    for tokenizer in (byte_bpe, metaspace):
        ids = [rng.randrange(len(tokenizer)) for _ in range(60)]
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        deltas = []
        for n, token_id in enumerate(ids, start=1):
            detok.append(token_id)
            assert detok.text == full_decode(tokenizer, ids[:n], skip)
            deltas.append(detok.take_delta(finished=n == len(ids)))
        assert "".join(deltas) == detok.text
    assert not caplog.records  # never had to rewrite text it had called final


@pytest.mark.parametrize("seed", range(6))
def test_random_token_streams_with_stop_strings(byte_bpe, metaspace, seed):
    rng = random.Random(100 + seed)
    cases = [(byte_bpe, ["or", "é", "!", "lo w"]), (metaspace, ["ab", "é", " c", "a\ufffdb"])]
    for tokenizer, stop in cases:
        common = [i for i in range(len(tokenizer)) if not tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
        ids = [rng.choice(common) if rng.random() < 0.7 else rng.randrange(len(tokenizer)) for _ in range(40)]
        detok, deltas, hit = stream(tokenizer, ids, stop=stop)
        n = len(detok.token_ids)
        full = full_decode(tokenizer, ids[:n])
        found = sorted((i, k) for k, s in enumerate(stop) if (i := full.rstrip("\ufffd").find(s)) != -1)
        if hit is None:
            assert n == len(ids) and not found and detok.text == full
        else:
            assert found and hit == stop[found[0][1]] and detok.text == full[: found[0][0]]
            shorter = full_decode(tokenizer, ids[: n - 1]).rstrip("\ufffd")
            assert not any(s in shorter for s in stop)  # it stopped at the first chance
        assert "".join(deltas) == detok.text


def test_metaspace_space_after_skipped_special_token_is_kept(metaspace):
    v = metaspace.get_vocab()
    ids = [v["a"], v["</s>"], v["▁b"], v["▁"], v["▁c"], v["<s>"], v["<s>"], v["▁ab"]]
    _, deltas, _ = stream(metaspace, ids)
    assert "".join(deltas) == full_decode(metaspace, ids) == "a b  c ab"


def test_byte_fallback_run_that_turns_invalid_is_not_streamed_early(metaspace):
    # A run of byte tokens decodes as one group: valid "nw" turns into U+FFFDs
    # when an incomplete byte joins the run, so "nw" must not be streamed yet.
    v = metaspace.get_vocab()
    ids = [v["<0x6E>"], v["<0x77>"], v["<0xE2>"], v["▁ab"]]
    assert full_decode(metaspace, ids[:2]) == "nw"
    assert "nw" not in full_decode(metaspace, ids)
    detok, deltas, _ = stream(metaspace, ids)
    assert deltas[:3] == ["", "", ""]
    assert "".join(deltas) == detok.text == full_decode(metaspace, ids)


def test_byte_fallback_run_continues_across_a_skipped_special_token(metaspace, caplog):
    v = metaspace.get_vocab()
    ids = [v["<0x6E>"], v["</s>"], v["<0xE2>"], v["▁ab"]]
    assert full_decode(metaspace, ids[:2]) == "n" and full_decode(metaspace, ids[:3]) == "\ufffd\ufffd"
    detok, deltas, _ = stream(metaspace, ids)
    assert "".join(deltas) == detok.text == full_decode(metaspace, ids)
    assert not caplog.records


def test_byte_fallback_character_streams_once_its_run_ends(metaspace):
    v = metaspace.get_vocab()
    ids = [v["▁ab"]] + [v[f"<0x{b:02X}>"] for b in "日".encode()] + [v["▁c"]]
    detok, deltas, _ = stream(metaspace, ids)
    assert deltas == ["ab", "", "", "", "日 c"]
    assert detok.text == "ab日 c"


def test_window_stays_short(byte_bpe):
    # Cheap per token: each decode covers a few tokens, not the whole output.
    calls = []

    class Spy:
        def decode(self, ids, **kwargs):
            calls.append(len(ids))
            return byte_bpe.decode(ids, **kwargs)

        def convert_ids_to_tokens(self, token_id):
            return byte_bpe.convert_ids_to_tokens(token_id)

    ids = byte_bpe.encode(" ".join(CORPUS) * 4)
    detok = IncrementalDetokenizer(Spy(), [])
    for token_id in ids:
        detok.append(token_id)
    assert len(ids) > 100
    assert detok.text == full_decode(byte_bpe, ids)
    assert max(calls) <= 8
    assert len(calls) <= 2 * len(ids)


# --- deltas and stop strings --------------------------------------------------


@pytest.mark.parametrize("text", CORPUS)
def test_deltas_concatenate_to_text(byte_bpe, text):
    detok, deltas, hit = stream(byte_bpe, byte_bpe.encode(text))
    assert hit is None
    assert "".join(deltas) == detok.text == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_spanning_token_boundaries(byte_bpe):
    ids = byte_bpe.encode("Hello world! Héllo wörld, café crème")
    stop = "lo wö"
    texts = [byte_bpe.decode(ids[:n]) for n in range(len(ids) + 1)]
    completed_at = next(n for n, t in enumerate(texts) if stop in t)
    assert texts[completed_at - 1].endswith("lo")  # the stop began in an earlier token
    detok, deltas, hit = stream(byte_bpe, ids, stop=[stop])
    assert hit == stop
    assert detok.text == "Hello world! Hél"
    assert "".join(deltas) == detok.text
    assert detok.stop_reason == stop
    assert detok.token_ids == ids[:completed_at]
    assert completed_at < len(ids)


def test_possible_stop_prefix_is_held_back_then_released(byte_bpe):
    ids = byte_token_ids(byte_bpe, b"ab#cd")
    detok = IncrementalDetokenizer(byte_bpe, ["#!"])
    deltas = []
    for token_id in ids:
        assert detok.append(token_id) is None
        deltas.append(detok.take_delta(finished=False))
    assert deltas == ["a", "b", "", "#c", "d"]
    assert detok.text == "ab#cd"


def test_stop_at_the_very_first_token(byte_bpe):
    ids = byte_bpe.encode("Hello world")
    first = byte_bpe.decode(ids[:1])
    detok, deltas, hit = stream(byte_bpe, ids, stop=[first[:1]])
    assert hit == first[:1]
    assert detok.text == ""
    assert deltas == [""]
    assert detok.token_ids == ids[:1]


def test_earliest_stop_string_wins(byte_bpe):
    ids = byte_token_ids(byte_bpe, b"xxABCDyy")
    detok, _, hit = stream(byte_bpe, ids, stop=["CD", "BCD", "Z"])
    assert hit == "BCD"
    assert detok.text == "xxA"


def test_stop_inside_a_multibyte_text(byte_bpe):
    text = "😀 emoji 🎉 party"
    detok, deltas, hit = stream(byte_bpe, byte_bpe.encode(text), stop=["🎉"])
    assert hit == "🎉"
    assert detok.text == "".join(deltas) == "😀 emoji "


def test_stop_with_metaspace_tokenizer(metaspace):
    ids = metaspace.encode("ab stop c", add_special_tokens=False)
    detok, deltas, hit = stream(metaspace, ids, stop=["stop"])
    assert hit == "stop"
    assert detok.text == "".join(deltas) == "ab "


def test_append_after_stop_is_a_bug(byte_bpe):
    detok = IncrementalDetokenizer(byte_bpe, ["H"])
    assert detok.append(byte_bpe.encode("H")[0]) == "H"
    with pytest.raises(AssertionError):
        detok.append(byte_bpe.encode("H")[0])


def test_special_tokens_kept_when_not_skipped(byte_bpe):
    ids = byte_bpe.encode("Hello") + [byte_bpe.eos_token_id]
    assert stream(byte_bpe, ids, skip=True)[0].text == "Hello"
    assert stream(byte_bpe, ids, skip=False)[0].text == "Hello<eos>"


def test_fast_tokenizers_decode_through_their_backend(byte_bpe, metaspace):
    """The per-token decode skips transformers' Python layers; every equality test here then checks that path."""
    from multilora.detokenizer import _exact_backend

    for tokenizer in (byte_bpe, metaspace):
        assert _exact_backend(tokenizer) is tokenizer.backend_tokenizer
