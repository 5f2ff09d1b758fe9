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
    assert 4 <= sum(lengths) / len(lengths) <= 8  # word pieces, as in large BPE vocabularies
    assert sum(p.startswith(" ") for p in pieces) > len(pieces) // 4  # word-opening tokens


def test_full_vocab_tokenizer_is_deterministic_and_sized(tmp_path):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(write_full_vocab_tokenizer(tmp_path / "a", vocab_size=1000))
    b = AutoTokenizer.from_pretrained(write_full_vocab_tokenizer(tmp_path / "b", vocab_size=1000))
    assert len(a) == 1000 and a.get_vocab() == b.get_vocab()
    with pytest.raises(ValueError, match="too small"):
        write_full_vocab_tokenizer(tmp_path / "c", vocab_size=100)


def test_decode_step_tiny_runs_every_case(tmp_path):
    import json
    import math

    import decode_step

    report = decode_step.main(["--tiny", "--profile", "--out", str(tmp_path)])
    size = decode_step.SIZES["tiny"]
    few, many = size.adapter_counts

    assert json.loads((tmp_path / "decode_step.json").read_text()).keys() == report.keys()
    assert {"device", "dtype", "model", "tokenizer_vocab", "size", "engine", "floors", "cases", "targets",
            "profile", "date"} <= report.keys()
    assert report["tokenizer_vocab"] == report["model_vocab"] == decode_step.TINY_MODEL["vocab_size"]
    assert report["engine"]["max_num_batched_tokens"] >= size.prompt_len + size.batch - 1

    floors = report["floors"]
    for key in ("floor_ms", "gemm_chain_ms", "gemm_chain_unfused_ms", "lm_head_ms", "kv_read_ms"):
        assert floors["decode"][key] > 0, key
    assert floors["decode"]["batch"] == size.batch
    assert floors["matmul_tflops"] > 0 and floors["chunk_ms"] > 0
    assert floors["prefill_ms"] == pytest.approx(floors["chunk_ms"] * size.batch)

    cases = report["cases"]
    assert set(cases) == {"prefill", "decode_base", "decode_sampled", f"decode_{few}_adapters",
                          f"decode_{many}_adapters", "chunk_plus_decode", "closed_base", f"closed_{many}_adapters"}
    for name in ("decode_base", "decode_sampled", f"decode_{few}_adapters", f"decode_{many}_adapters"):
        case = cases[name]
        assert case["steps"] == size.steps and case["rows"] == size.batch, name
        assert math.isfinite(case["step_ms"]) and case["step_ms"] > 0, name
        assert case["synced_step_ms"] > 0, name
    assert cases["decode_sampled"]["sampled"] is True
    assert (cases[f"decode_{few}_adapters"]["adapters"], cases[f"decode_{many}_adapters"]["adapters"]) == (few, many)
    chunk = cases["chunk_plus_decode"]
    assert chunk["windows"] == size.chunk_windows and chunk["decode_rows"] == size.batch - 1
    assert chunk["chunk_tokens"] == size.prompt_len and math.isfinite(chunk["step_ms"])
    assert chunk["decode_step_ms"] > 0
    # The engine thread's CPU time for the chunk step: it ran the chunk's layers, so some, and it cannot
    # exceed the step's window (3 steps) of wall time by more than rounding.
    assert 0 < chunk["host_cpu_ms"] <= chunk["window_steps"] * (chunk["step_ms"] + chunk["decode_step_ms"]) + 1
    assert chunk["chunk_requests_unfinished_after_window"] == 0
    base = cases["decode_base"]
    assert size.prompt_len < base["context"] < size.prompt_len + size.decode_tokens
    assert floors["decode"]["context"] == round(base["context"])
    assert cases["prefill"]["reps"] == size.prefill_reps and cases["prefill"]["tokens"] == size.batch * size.prompt_len
    for name, adapters in (("closed_base", 0), (f"closed_{many}_adapters", many)):
        closed = cases[name]
        assert closed["output_tokens"] == size.batch * size.output_len and closed["adapters"] == adapters
        assert closed["tokens_per_s"] > 0
        # Random ids of the full-vocab tokenizer decode to real text, several bytes a token.
        assert closed["text_bytes_per_token"] > 2

    assert [t["bound"] for t in report["targets"]] == ["same run, full", "<= 1.2x", "<= base + 0.4 ms",
                                                        "<= base + 1.0 ms", "<= 1.05x", "<= 1.3x", "<= 1.3x", ">= 2x",
                                                        ">= 0.85x"]
    assert all(isinstance(t["met"], bool) and t["figure"] for t in report["targets"])
    assert report["targets"][0]["met"]  # the floor is measured here, the tokenizer has the model's vocabulary

    assert [p["case"] for p in report["profile"]] == ["decode step with 0 adapters", f"decode step with {many} adapters",
                                                      "chunk + decode pair", "prefill of the batch"]
    assert [p["steps"] for p in report["profile"]] == [size.profile_steps, size.profile_steps, 2, 1]
    for p in report["profile"]:
        assert p["launches_per_step"] > 0 and p["top"]
    assert len(report["profile"][2]["step_intervals_ms"]) == 2


def test_decode_step_engine_args_are_json_values_or_strings():
    import decode_step

    assert decode_step.engine_arg("max_num_batched_tokens=4096") == ("max_num_batched_tokens", 4096)
    assert decode_step.engine_arg("enforce_eager=true") == ("enforce_eager", True)
    assert decode_step.engine_arg("tokenizer=/models/x") == ("tokenizer", "/models/x")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        decode_step.engine_arg("enforce_eager")
