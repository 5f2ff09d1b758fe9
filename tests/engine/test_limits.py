"""Limits: a request that outgrows the KV cache or the context ends with "length" instead of hanging;
requests over the configured limits are refused with INVALID_ARG, before any tokenizing; the waiting
queue is bounded (UNAVAILABLE), and every case leaves the engine idle.
"""

import pytest

from helpers.engine_runs import OutputCollector, StepTracker, assert_idle, async_engine_config, greedy, make_llm
from multilora import AsyncLLMEngine, SamplingParams
from multilora.errors import LimitExceededError, QueueFullError, QueueTimeoutError


def test_output_stops_where_the_kv_cache_is_full(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama", block_size=4, num_kv_blocks=4)     # 16 tokens of KV cache
    prompt = [5, 17, 42, 99, 123, 7]
    (out,) = llm.generate([prompt], greedy(50))
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 16 - len(prompt)
    assert out.outputs[0].token_ids == tiny_zoo.reference("llama", None, prompt, 10)
    assert_idle(llm.llm_engine)


def test_output_stops_at_max_model_len(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama", max_model_len=12)
    (out,) = llm.generate([[5, 17, 42, 99]], greedy(50))
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 8


# ---- request limits (docs/limits.md) -------------------------------------------------


@pytest.fixture(scope="module")
def limited(tiny_zoo):
    """An engine with small limits: 64-byte prompts (16 token ids), 2 stop strings of 8 bytes."""
    return make_llm(tiny_zoo, "llama", max_prompt_bytes=64, max_stop_strings=2, max_stop_string_bytes=8)


def test_oversized_prompt_is_refused_before_tokenizing(limited, monkeypatch):
    engine = limited.llm_engine
    monkeypatch.setattr(engine, "_tokenize", lambda prompt: pytest.fail("tokenized an oversized prompt"))
    with pytest.raises(LimitExceededError) as info:
        engine.make_sequence("big", "x" * 10_000_000, greedy(4))
    assert info.value.code == "INVALID_ARG"
    assert str(info.value) == ("the prompt is 10000000 bytes; this server takes at most 64 (max_prompt_bytes): "
                               "send a shorter prompt")
    with pytest.raises(LimitExceededError, match="65 bytes"):
        engine.make_sequence("multibyte", "\u00e9" * 32 + "x", greedy(4))        # 33 characters, 65 bytes
    with pytest.raises(LimitExceededError, match="17 token ids; this server takes at most 16"):
        engine.make_sequence("ids", [5] * 17, greedy(4))
    assert_idle(engine)


def test_the_default_prompt_limit_follows_the_context_length(tiny_zoo):
    engine = make_llm(tiny_zoo, "llama", max_model_len=100).llm_engine
    assert engine.request_limits.max_prompt_bytes == 3200       # 32 bytes per token of context
    with pytest.raises(LimitExceededError, match="3201 bytes; this server takes at most 3200"):
        engine.make_sequence("big", "x" * 3201, greedy(4))


def test_prompts_at_the_limit_are_served(limited, tiny_zoo):
    prompt = [5, 17, 42, 99] * 4                                                 # 16 ids = 64 bytes
    (out,) = limited.generate([prompt], greedy(3))
    assert out.outputs[0].token_ids == tiny_zoo.reference("llama", None, prompt, 3)
    (text_out,) = limited.generate(["a" * 64], greedy(2))
    assert len(text_out.outputs[0].token_ids) == 2
    assert_idle(limited.llm_engine)


@pytest.mark.parametrize("stop, fragment", [
    (["a", "b", "c"], "3 stop strings; this server takes at most 2 (max_stop_strings)"),
    (["123456789"], "a stop string of 9 bytes; this server takes at most 8 per string (max_stop_string_bytes)"),
])
def test_stop_strings_over_the_limits_are_refused(limited, stop, fragment):
    with pytest.raises(LimitExceededError) as info:
        limited.generate(["hello"], greedy(4, stop=stop))
    assert str(info.value) == fragment
    assert_idle(limited.llm_engine)


def test_values_past_float32_decode_beside_other_requests(tiny_zoo):
    # Each used to reach the sampler as 0 or inf, make NaN or an empty nucleus, and fail every request in
    # the step: temperature 1e-300, temperature 1e300 with EOS banned (min_tokens), top_p 1e-300.
    llm = make_llm(tiny_zoo, "llama")
    prompts = [[5, 17, 42], [7, 8, 9], [3, 4], [11, 12, 13], [2, 9]]
    params = [SamplingParams(max_tokens=4, temperature=1e-300, ignore_eos=True), greedy(4),
              SamplingParams(max_tokens=4, temperature=1e300, min_tokens=4, seed=1),
              SamplingParams(max_tokens=4, top_p=1e-300, ignore_eos=True), greedy(4)]
    outs = llm.generate(prompts, params)
    for i in (0, 1, 3, 4):             # greedy in effect (a nucleus of the top token alone is greedy too)
        assert outs[i].outputs[0].token_ids == tiny_zoo.reference("llama", None, prompts[i], 4), i
    assert len(outs[2].outputs[0].token_ids) == 4 and outs[2].outputs[0].finish_reason == "length"
    assert_idle(llm.llm_engine)


# ---- the bounded waiting queue ------------------------------------------------------


def test_full_queue_refuses_at_once_and_the_rest_are_served(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama", max_num_seqs=1, max_waiting_requests=1)
    engine = llm.llm_engine
    tracker = StepTracker(engine)
    engine.add_request("r0", [5, 17, 42], greedy(3))
    tracker.step()                                                               # r0 runs
    engine.add_request("r1", [7, 8, 9], greedy(3))                              # r1 waits
    with pytest.raises(QueueFullError) as info:
        engine.add_request("r2", [1, 2, 3], greedy(3))
    assert info.value.code == "UNAVAILABLE" and "max_waiting_requests 1" in str(info.value)
    assert "r2" not in engine.requests
    finals = tracker.drain().finals
    assert set(finals) == {"r0", "r1"}
    assert finals["r1"].outputs[0].token_ids == tiny_zoo.reference("llama", None, [7, 8, 9], 3)
    assert_idle(engine)


def test_in_process_batches_have_no_queue_bound(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama", max_num_seqs=1)
    assert llm.llm_engine.config.max_waiting_requests is None
    outs = llm.generate([[5, i] for i in range(3)], greedy(1))
    assert [len(o.outputs[0].token_ids) for o in outs] == [1, 1, 1]


def test_request_waiting_too_long_ends_unavailable_and_frees_everything(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama", max_loras=1, max_queue_wait_s=5.0)
    engine = llm.llm_engine
    tracker = StepTracker(engine)
    engine.add_request("sql", [5, 17, 42], greedy(6), tiny_zoo.lora_request("llama", "sql"))
    tracker.step()                                                               # "sql" holds the only slot
    engine.add_request("code", [7, 8, 9], greedy(6), tiny_zoo.lora_request("llama", "code"))
    engine.requests["code"].arrival_time -= 30                                   # it has waited 30 s
    tracker.step()
    expired = tracker.finals["code"]
    assert isinstance(expired.error, QueueTimeoutError) and expired.error.code == "UNAVAILABLE"
    assert str(expired.error).startswith("the request waited 30.0 s in the queue without starting "
                                         "(max_queue_wait_s 5); the server is overloaded")
    assert expired.finished and expired.outputs[0].token_ids == []
    tracker.drain()
    assert tracker.finals["sql"].outputs[0].token_ids == tiny_zoo.reference("llama", "sql", [5, 17, 42], 6)
    assert_idle(engine)


def test_async_engine_refuses_beyond_the_queue_at_once_and_serves_the_rest(tiny_zoo):
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo, max_num_seqs=1, max_waiting_requests=2))
    try:
        accepted, refused = {}, []
        for i in range(20):             # far faster than the engine finishes one request
            collector = OutputCollector()
            try:
                engine.add_request(f"r{i}", [5, 17, i + 2], greedy(4), None, collector)
                accepted[i] = collector
            except QueueFullError as error:
                refused.append(error)
        # The scheduler's own check may refuse one that add_request let through (its counts are a step old).
        served = {i: c.final() for i, c in accepted.items()}
        assert refused, "no request was refused at once"
        refused += [final.error for final in served.values() if final.error is not None]
        assert all(isinstance(e, QueueFullError) and "max_waiting_requests 2" in str(e) for e in refused)
        for i, final in served.items():
            if final.error is None:
                assert final.outputs[0].token_ids == tiny_zoo.reference("llama", None, [5, 17, i + 2], 4)
        assert sum(final.error is None for final in served.values()) >= 2
    finally:
        engine.shutdown()
    assert_idle(engine.engine)


def test_async_engine_ends_a_request_waiting_too_long_and_serves_the_rest(tiny_zoo):
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo, max_num_seqs=1, max_queue_wait_s=10.0))
    make_sequence = engine.engine.make_sequence

    def aged(request_id, *args):        # "old" arrived 100 s ago, as if it had waited behind a long queue
        seq = make_sequence(request_id, *args)
        seq.arrival_time -= 100 if request_id == "old" else 0
        return seq

    engine.engine.make_sequence = aged
    try:
        fresh, old = OutputCollector(), OutputCollector()
        engine.add_request("fresh", [5, 17, 42], greedy(8), None, fresh)
        engine.add_request("old", [7, 8, 9], greedy(4), None, old)
        expired = old.final()
        assert isinstance(expired.error, QueueTimeoutError) and expired.error.code == "UNAVAILABLE"
        assert "the request waited 100." in str(expired.error) and "max_queue_wait_s 10" in str(expired.error)
        assert fresh.final().error is None
        assert fresh.final().outputs[0].token_ids == tiny_zoo.reference("llama", None, [5, 17, 42], 8)
    finally:
        engine.shutdown()
    assert_idle(engine.engine)
