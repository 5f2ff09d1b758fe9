"""A request that outgrows the KV cache or the context ends with "length" instead of hanging."""

from helpers.engine_runs import assert_idle, greedy, make_llm


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
