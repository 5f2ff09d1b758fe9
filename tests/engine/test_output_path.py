"""The output path: token events -> RequestOutputs off the engine thread, stop strings, failed sampler rows."""

import threading

import pytest
import torch

from helpers.engine_runs import OutputCollector, assert_idle, async_engine_config, greedy, make_llm
from helpers.zoo import SHORT_PROMPTS
from multilora import AsyncLLMEngine
from multilora.engine.output_processor import EndedRequest, OutputProcessor, TokenEvent
from multilora.engine.sequence import Sequence
from multilora.errors import NonFiniteLogitsError

FREE = 12


def _stop_string(tokenizer, ids) -> str:
    """The visible text of a token in the middle of `ids`: generation must stop there."""
    for k in range(2, len(ids)):
        text = tokenizer.decode(ids[k:k + 1]).strip()
        if text:
            return text
    pytest.skip("no visible token in the free output")


def _settled(engine):
    for _ in range(300):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0:
            return stats
        threading.Event().wait(0.01)
    return engine.stats()


def test_async_stop_strings_give_what_the_synchronous_engine_gives(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama", max_loras=2)
    prompts = [SHORT_PROMPTS[0], SHORT_PROMPTS[2]]
    free = llm.generate(prompts, greedy(FREE))
    params = [greedy(FREE, stop=[_stop_string(llm.get_tokenizer(), o.outputs[0].token_ids)]) for o in free]
    sync = llm.generate(prompts, params)
    assert all(o.outputs[0].finish_reason == "stop" and len(o.outputs[0].token_ids) < FREE for o in sync)

    engine = AsyncLLMEngine(async_engine_config(tiny_zoo))
    try:
        collectors = [OutputCollector() for _ in prompts]
        for i, (prompt, p, collector) in enumerate(zip(prompts, params, collectors)):
            engine.add_request(f"stop{i}", prompt, p, None, collector)
        for want, collector in zip(sync, collectors):
            got = collector.final().outputs[0]
            expected = want.outputs[0]
            assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
                (expected.token_ids, expected.text, expected.finish_reason, expected.stop_reason)
            assert collector.text_from_deltas == got.text
        stats = _settled(engine)        # the engine freed what the stop strings ended
        assert (stats.num_running, stats.kv_blocks_used) == (0, 0)
        engine.shutdown()
        assert engine._processor.num_requests == 0      # and the output thread forgot them
    finally:
        engine.shutdown()


def test_processor_drops_tokens_after_a_stop_string(tiny_zoo):
    tokenizer = tiny_zoo.tokenizer("llama")
    ids = tokenizer.encode("the quick brown fox jumps", add_special_tokens=False)
    stop = tokenizer.decode(ids[:2]).split()[-1]
    seq = Sequence("r", "p", [1, 2], greedy(20, stop=[stop]))
    processor = OutputProcessor(tokenizer)
    outputs, ended = processor.process([TokenEvent(seq, [ids[0]]), TokenEvent(seq, [ids[1]]),
                                        TokenEvent(seq, [ids[2]])])
    assert [o.finished for o in outputs] == [False, True]
    final = outputs[-1].outputs[0]
    assert (final.token_ids, final.finish_reason, final.stop_reason) == (ids[:2], "stop", stop)
    assert ended == [EndedRequest("r", "stop", stop)]
    # The engine confirms it freed the request: no more outputs, no state left.
    assert processor.process([TokenEvent(seq, [], "stop")]) == ([], [])
    assert processor.num_requests == 0


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "device_tensor"])
def test_a_failed_sampler_row_ends_its_request_alone(tiny_zoo, monkeypatch, as_tensor):
    llm = make_llm(tiny_zoo, "llama", max_loras=2)
    runner = llm.llm_engine.runner
    real = runner.sampler

    def sampler(logits, rows):
        tokens = [-1 if row.params.max_tokens == 7 else t for row, t in zip(rows, real(logits, rows))]
        return torch.tensor(tokens, dtype=torch.long, device=logits.device) if as_tensor else tokens

    monkeypatch.setattr(runner, "sampler", sampler)
    lora = tiny_zoo.lora_request("llama", "sql")
    outs = llm.generate([SHORT_PROMPTS[0], SHORT_PROMPTS[1]], [greedy(6), greedy(7)], lora_request=[None, lora])
    assert outs[0].error is None
    assert outs[0].outputs[0].token_ids == tiny_zoo.reference("llama", None, SHORT_PROMPTS[0], 6)
    failed = outs[1]
    assert isinstance(failed.error, NonFiniteLogitsError) and failed.error.code == "INTERNAL"
    assert "non-finite logits" in str(failed.error) and "'sql'" in str(failed.error)
    assert failed.finished and failed.outputs[0].finish_reason == "abort"
    assert_idle(llm.llm_engine)
