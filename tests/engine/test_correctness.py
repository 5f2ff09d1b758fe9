"""End to end: every request's greedy tokens equal HF transformers + PEFT's, float32.

Each scenario mixes base and adapter requests in one batch and is run for a
tiny Llama, Qwen2 and Mistral model: a plain batch, more adapters than GPU
slots (adapters evicted and reloaded), too few KV blocks (preemption), and
prompts longer than the step's token budget (chunked prefill).
"""

import itertools
import json
import math
import random
import shutil

import pytest

from helpers.engine_runs import assert_idle, drain, greedy, make_llm
from helpers.tiny_models import BOS_ID, EOS_ID
from helpers.zoo import ADAPTERS, SHORT_PROMPTS, long_prompt

KINDS = ("llama", "qwen2", "mistral")
ALL_KINDS = ("llama", "llama3rope", "qwen2", "mistral")
N = 10  # new tokens per request


def mixed(prompts, adapters=(None, *ADAPTERS)):
    """Every prompt with every adapter (None = base), in a fixed shuffled order."""
    pairs = [(p, a) for p in prompts for a in adapters]
    random.Random(0).shuffle(pairs)
    return pairs


def check_outputs(zoo, kind, requests, outs, max_tokens=N):
    """Each output equals the reference for its (prompt, adapter), with its metadata."""
    tok = zoo.tokenizer(kind)
    assert len(outs) == len(requests)
    for (prompt, adapter), out in zip(requests, outs):
        expected = zoo.reference(kind, adapter, prompt, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == expected, f"{kind} adapter={adapter} prompt={prompt!r}"
        assert got.finish_reason == "length"
        assert out.finished
        assert out.prompt_token_ids == zoo.prompt_ids(kind, prompt)
        assert (out.lora_request.lora_name if out.lora_request else None) == adapter
        # Text only where the ids decode to whole characters: an incremental
        # detokenizer may legitimately hold back a partial UTF-8 sequence.
        text = tok.decode(expected, skip_special_tokens=True)
        if "\ufffd" not in text and not {EOS_ID, BOS_ID} & set(expected):
            assert got.text == text


def generate(llm, zoo, kind, requests, max_tokens=N):
    prompts = [p for p, _ in requests]
    loras = [None if a is None else zoo.lora_request(kind, a) for _, a in requests]
    return llm.generate(prompts, greedy(max_tokens), lora_request=loras)


# ---------------------------------------------------------------- the references themselves


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_references_differ_between_adapters(tiny_zoo, kind):
    """Without this the comparisons below could pass with adapters ignored."""
    for prompt in SHORT_PROMPTS:
        refs = {a: tuple(tiny_zoo.reference(kind, a, prompt, N)) for a in (None, *ADAPTERS)}
        assert len(set(refs.values())) == len(refs), f"{kind} {prompt!r}: {refs}"
        assert all(len(set(r)) > 1 for r in refs.values()), f"{kind} {prompt!r}: degenerate {refs}"


def test_saved_checkpoints_have_the_expected_shape(tiny_zoo):
    """The files the engine reads: a sharded index, hub-style rope fields, PEFT adapters."""
    llama = tiny_zoo.model_dir("llama")
    index = json.loads((llama / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    rope = json.loads((tiny_zoo.model_dir("llama3rope") / "config.json").read_text())
    assert rope["rope_scaling"]["rope_type"] == "llama3" and rope["rope_theta"] == 500000.0
    assert json.loads((tiny_zoo.model_dir("qwen2") / "config.json").read_text())["tie_word_embeddings"]
    code = json.loads((tiny_zoo.adapter_dir("llama", "code") / "adapter_config.json").read_text())
    assert code["use_rslora"] and code["r"] == 16 and len(code["target_modules"]) == 7


# ---------------------------------------------------------------- engine scenarios


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_mixed_batch_matches_hf_peft(tiny_zoo, kind):
    llm = make_llm(tiny_zoo, kind, max_loras=4)
    requests = mixed(SHORT_PROMPTS)
    check_outputs(tiny_zoo, kind, requests, generate(llm, tiny_zoo, kind, requests))
    assert_idle(llm.llm_engine)


@pytest.mark.parametrize("kind", KINDS)
def test_more_adapters_than_slots(tiny_zoo, kind):
    """4 adapters in flight, 2 GPU slots and 2 host entries: slots reused, adapters reloaded."""
    llm = make_llm(tiny_zoo, kind, max_loras=2, max_cpu_loras=2)
    engine = llm.llm_engine
    requests = mixed(SHORT_PROMPTS[:2])
    run_checked_with_two_slots(tiny_zoo, engine, kind, requests)
    first = engine.stats()
    assert first.adapter_loads >= 4 and first.adapter_evictions >= 2, first
    assert_idle(engine)

    # Again: at most 2 adapters stayed on the host, so at least 2 are read from disk again.
    check_outputs(tiny_zoo, kind, requests, generate(llm, tiny_zoo, kind, requests))
    again = engine.stats()
    assert again.adapter_loads >= first.adapter_loads + 2, (first, again)
    assert_idle(engine)


@pytest.mark.parametrize("kind", KINDS)
def test_kv_preemption(tiny_zoo, kind):
    """6 requests of up to 7 blocks each over 16 blocks: running requests must be preempted."""
    max_tokens = 12
    llm = make_llm(tiny_zoo, kind, block_size=4, num_kv_blocks=16)
    engine = llm.llm_engine
    prompts = [*SHORT_PROMPTS, long_prompt(9, seed=1), long_prompt(11, seed=2)]
    requests = list(zip(prompts, itertools.cycle((None, *ADAPTERS))))
    for i, (prompt, adapter) in enumerate(requests):
        assert len(tiny_zoo.prompt_ids(kind, prompt)) + max_tokens <= 28  # fits 7 blocks
        lora = None if adapter is None else tiny_zoo.lora_request(kind, adapter)
        engine.add_request(f"r{i}", prompt, greedy(max_tokens), lora)

    waiting = []
    finals = drain(engine, on_step=lambda e: waiting.append(e.stats().num_waiting)).finals
    check_outputs(tiny_zoo, kind, requests, [finals[f"r{i}"] for i in range(len(requests))], max_tokens)
    # All requests arrived first, so the waiting queue grows again only through preemption.
    requeued = any(b > a for a, b in zip(waiting, waiting[1:]))
    preemptions = getattr(engine.stats(), "num_preemptions", None)
    assert requeued or (preemptions or 0) > 0, waiting
    if preemptions is not None:
        assert preemptions > 0
    assert_idle(engine)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill(tiny_zoo, kind):
    """Prompts up to 4x the step's token budget, mixed with short ones and adapters."""
    budget = 16
    llm = make_llm(tiny_zoo, kind, max_num_batched_tokens=budget, max_num_seqs=4, block_size=8, num_kv_blocks=64)
    engine = llm.llm_engine
    prompts = [long_prompt(40, seed=5), SHORT_PROMPTS[0], long_prompt(57, seed=4), long_prompt(70, seed=7),
               SHORT_PROMPTS[3]]
    requests = list(zip(prompts, ("code", None, "sql", "chat", "kv")))
    for i, (prompt, adapter) in enumerate(requests):
        lora = None if adapter is None else tiny_zoo.lora_request(kind, adapter)
        engine.add_request(f"r{i}", prompt, greedy(N), lora)

    seen = drain(engine)
    check_outputs(tiny_zoo, kind, requests, [seen.finals[f"r{i}"] for i in range(len(requests))])
    # A prompt of L tokens needs at least ceil(L / budget) steps before its first token.
    for i, (prompt, _) in enumerate(requests):
        assert seen.first_token_step[f"r{i}"] + 1 >= math.ceil(len(tiny_zoo.prompt_ids(kind, prompt)) / budget)
    assert_idle(engine)


def test_stops_at_any_eos_of_generation_config(tiny_zoo, tmp_path):
    """A token listed as eos in generation_config.json ends the request, and is its last token."""
    prompt, adapter = SHORT_PROMPTS[1], "chat"
    expected = tiny_zoo.reference("llama", adapter, prompt, N)
    stop_at = next(i for i in range(2, N) if expected[i] not in expected[:i])  # first occurrence
    assert EOS_ID not in expected[: stop_at + 1]
    model = shutil.copytree(tiny_zoo.model_dir("llama"), tmp_path / "llama-eos")
    gen_config = json.loads((model / "generation_config.json").read_text())
    gen_config["eos_token_id"] = [EOS_ID, expected[stop_at]]
    (model / "generation_config.json").write_text(json.dumps(gen_config))

    from multilora import LLM, SamplingParams

    from helpers.engine_runs import ENGINE_DEFAULTS

    llm = LLM(model=str(model), **ENGINE_DEFAULTS)
    lora = tiny_zoo.lora_request("llama", adapter)
    (out,) = llm.generate([prompt], SamplingParams(max_tokens=N, temperature=0.0), lora_request=lora)
    assert out.outputs[0].token_ids == expected[: stop_at + 1]
    assert out.outputs[0].finish_reason == "stop"
    # ignore_eos runs on to max_tokens through the same token.
    (out,) = llm.generate([prompt], greedy(N), lora_request=lora)
    assert out.outputs[0].token_ids == expected
    assert_idle(llm.llm_engine)


@pytest.mark.parametrize("kind", KINDS)
def test_slots_preemption_and_chunked_prefill_together(tiny_zoo, kind):
    """All pressures at once: 2 slots for 4 adapters, 24 KV blocks, a 16-token step budget."""
    llm = make_llm(tiny_zoo, kind, max_loras=2, max_cpu_loras=2, block_size=4, num_kv_blocks=24,
                   max_num_batched_tokens=16, max_num_seqs=6)
    engine = llm.llm_engine
    prompts = [long_prompt(40, seed=5), long_prompt(57, seed=4), *SHORT_PROMPTS, long_prompt(11, seed=2)]
    requests = list(zip(prompts, itertools.cycle(("chat", "code", None, "sql", "kv"))))
    run_checked_with_two_slots(tiny_zoo, engine, kind, requests)
    stats = engine.stats()
    assert stats.adapter_evictions >= 2, stats
    assert getattr(stats, "num_preemptions", 1) > 0, stats  # the counter is optional in the API
    assert_idle(engine)


def run_checked_with_two_slots(tiny_zoo, engine, kind, requests) -> None:
    """Runs (prompt, adapter) requests to the end, never more than 2 adapters in a step; checks every output."""
    for i, (prompt, adapter) in enumerate(requests):
        lora = None if adapter is None else tiny_zoo.lora_request(kind, adapter)
        engine.add_request(f"r{i}", prompt, greedy(N), lora)

    def at_most_two_adapters(engine):
        assert len(engine.stats().running_adapters) <= 2, engine.stats()

    finals = drain(engine, on_step=at_most_two_adapters).finals
    check_outputs(tiny_zoo, kind, requests, [finals[f"r{i}"] for i in range(len(requests))])
