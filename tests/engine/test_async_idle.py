"""The async engine back to idle (issue 9, "Done when"): after requests that end every way (length, a stop
string found on the output thread, a client abort, a refused adapter) nothing is left: no KV block or
adapter hold, no live request, no output-processor state, and after shutdown no engine thread.

assert_idle() checks the engine; this checks what only AsyncLLMEngine holds (its live table, the
output processor's per-request detokenizers, its threads), which would otherwise grow with every request.
"""

import json
import shutil
import threading
import time

from helpers.engine_runs import OutputCollector, assert_idle, async_engine_config, greedy
from helpers.zoo import SHORT_PROMPTS
from multilora import AsyncLLMEngine, LoRARequest
from multilora.errors import AdapterScalingError, RequestCancelledError


def _engine_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("multilora")}


def _stop_string_in(engine, prompt, max_tokens: int) -> str:
    """A stop string that greedy decoding of `prompt` is sure to produce, past its first token."""
    probe = OutputCollector()
    engine.add_request("probe", prompt, greedy(max_tokens), None, probe)
    text = probe.final().outputs[0].text
    first = engine.tokenizer.decode(probe.final().outputs[0].token_ids[:1])
    stop = text[len(first):].strip()[:2]
    assert stop, f"no text to stop at in {text!r}"
    return stop


def test_every_way_of_ending_leaves_the_async_engine_idle(tiny_zoo, tmp_path):
    before = _engine_threads()
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo, max_num_seqs=4))
    try:
        stop = _stop_string_in(engine, SHORT_PROMPTS[1], 12)
        hostile = shutil.copytree(tiny_zoo.adapter_dir("llama", "sql"), tmp_path / "nan-alpha")
        config = json.loads((hostile / "adapter_config.json").read_text())
        (hostile / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": float("nan")}))

        c = {name: OutputCollector() for name in ("base", "sql", "stopped", "aborted", "hostile")}
        engine.add_request("base", SHORT_PROMPTS[0], greedy(8), None, c["base"])
        engine.add_request("sql", SHORT_PROMPTS[2], greedy(8), tiny_zoo.lora_request("llama", "sql"), c["sql"])
        engine.add_request("stopped", SHORT_PROMPTS[1], greedy(12, stop=[stop]), None, c["stopped"])
        engine.add_request("aborted", SHORT_PROMPTS[3], greedy(200), None, c["aborted"])
        engine.add_request("hostile", SHORT_PROMPTS[0], greedy(8), LoRARequest("nan-alpha", 900, str(hostile)),
                           c["hostile"])
        engine.abort("aborted")

        base, sql, stopped = c["base"].final(), c["sql"].final(), c["stopped"].final()
        assert base.error is None
        assert base.outputs[0].token_ids == tiny_zoo.reference("llama", None, SHORT_PROMPTS[0], 8)
        assert sql.error is None
        assert sql.outputs[0].token_ids == tiny_zoo.reference("llama", "sql", SHORT_PROMPTS[2], 8)
        assert (stopped.error, stopped.outputs[0].finish_reason, stopped.outputs[0].stop_reason) == (None, "stop", stop)
        assert stop not in stopped.outputs[0].text      # the stop string itself is not part of the output
        assert isinstance(c["aborted"].final().error, RequestCancelledError)
        hostile_final = c["hostile"].final()
        assert isinstance(hostile_final.error, AdapterScalingError) and "'nan-alpha'" in str(hostile_final.error)
        for collector in c.values():
            assert [o.finished for o in collector.outputs].count(True) == 1

        # The stop string's "ended" message reaches the engine thread after the final output: wait for it.
        for _ in range(200):
            stats = engine.stats()
            if not engine.engine.has_unfinished_requests() and stats.kv_blocks_used == 0:
                break
            time.sleep(0.05)
        assert_idle(engine.engine)
        assert engine._live == {}
        assert engine._processor.num_requests == 0      # no detokenizer kept for an ended request
    finally:
        engine.shutdown()
    assert _engine_threads() - before == set()          # engine, output and prepare threads all gone
