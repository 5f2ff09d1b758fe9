"""Adapter loads in worker processes (engine/load_workers.py, `adapter_load_workers`): the same tokens and
host images as loads on the preparing threads, the loader's typed errors for that request alone, and a
killed worker costs no request (its loads are tried again in fresh workers)."""

import os
import signal
import time

import pytest
import torch

from helpers.engine_runs import assert_idle, make_llm
from multilora.errors import AdapterCorruptError, AdapterNotFoundError
from multilora.lora.request import LoRARequest
from test_correctness import check_outputs, generate, mixed
from helpers.zoo import ADAPTERS, SHORT_PROMPTS

FIRST, SECOND = list(ADAPTERS)[:2]


@pytest.fixture(scope="module")
def llm_with_workers(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama", max_loras=2, max_cpu_loras=2, adapter_load_workers=2)
    yield llm
    llm.llm_engine.shutdown()


def test_tokens_equal_hf_peft_with_adapters_read_in_workers(tiny_zoo, llm_with_workers):
    engine = llm_with_workers.llm_engine
    assert engine.load_workers is not None and engine.load_workers.num_workers == 2
    requests = mixed(SHORT_PROMPTS[:2])
    check_outputs(tiny_zoo, "llama", requests, generate(llm_with_workers, tiny_zoo, "llama", requests))
    # More adapters than host entries: some were read twice, every read in a worker.
    assert engine.stats().adapter_loads >= len(ADAPTERS)
    assert_idle(engine)


def test_a_workers_image_equals_the_one_built_in_process(tiny_zoo, llm_with_workers):
    engine = llm_with_workers.llm_engine
    request = tiny_zoo.lora_request("llama", FIRST)
    adapter, image = engine.load_workers.load(request)
    assert (adapter.name, adapter.adapter_id, adapter.weights) == (request.lora_name, request.lora_int_id, {})
    in_process = engine.runner.model.adapter_slot_weights
    from multilora.lora.adapter import load_adapter

    local = load_adapter(request, engine.lora_spec, engine.config.max_lora_rank, dtype=engine.runner.dtype)
    assert adapter.rank == local.rank and torch.equal(image, in_process.host_image(local))


def test_typed_errors_cross_from_the_worker_without_paths(tiny_zoo, llm_with_workers, tmp_path):
    workers = llm_with_workers.llm_engine.load_workers
    with pytest.raises(AdapterNotFoundError, match="was not found") as missing:
        workers.load(LoRARequest("gone", 91, str(tmp_path / "gone")))
    broken = tmp_path / "broken"
    broken.mkdir()
    source = tiny_zoo.adapter_dir("llama", FIRST)
    (broken / "adapter_config.json").write_text((source / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(AdapterCorruptError, match="cannot be parsed") as corrupt:
        workers.load(LoRARequest("broken", 92, str(broken)))
    for error in (missing.value, corrupt.value):
        assert str(tmp_path) not in str(error)


def test_a_killed_worker_fails_its_load_alone_and_the_workers_start_again(tiny_zoo, llm_with_workers):
    engine = llm_with_workers.llm_engine
    workers = engine.load_workers
    pids = list(workers._pool._processes)
    assert pids, "the workers start with the engine"
    os.kill(pids[0], signal.SIGKILL)
    request = tiny_zoo.lora_request("llama", SECOND)
    adapter, image = workers.load(request)      # whether the pool has noticed the death yet or not
    assert adapter.name == request.lora_name and image.numel() > 0
    deadline = time.monotonic() + 30
    while pids[0] in workers._pool._processes and time.monotonic() < deadline:
        time.sleep(0.02)
        workers.load(request)                   # the load that finds the pool broken starts a new one
    assert workers._pool._processes and pids[0] not in workers._pool._processes
    # The engine still serves every adapter, read by the new workers.
    requests = mixed(SHORT_PROMPTS[:1])
    check_outputs(tiny_zoo, "llama", requests, generate(llm_with_workers, tiny_zoo, "llama", requests))
    assert_idle(engine)
