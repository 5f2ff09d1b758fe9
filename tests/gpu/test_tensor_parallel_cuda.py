"""On one CUDA GPU: the tensor-parallel worker path at size 1, and NCCL collectives inside a CUDA graph
(skipped elsewhere). With two or more GPUs, tests/engine/test_tensor_parallel.py runs on them as well.
"""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from helpers.engine_runs import check_staggered_generate, make_llm
from helpers.zoo import ADAPTERS, SHORT_PROMPTS, long_prompt
from multilora.engine import llm_engine
from multilora.engine.tp_runner import TensorParallelRunner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_one_worker_on_the_gpu_gives_the_hf_peft_tokens(tiny_zoo, monkeypatch):
    """The whole worker path (a spawned worker, its NCCL group, its CUDA graphs, answers pipelined behind
    launches, async scheduling) with one rank, where the engine would otherwise keep the model in process."""
    monkeypatch.setattr(llm_engine, "ModelRunner", TensorParallelRunner)
    llm = make_llm(tiny_zoo, "llama", device="cuda", max_loras=4, max_num_seqs=16)
    try:
        runner = llm.llm_engine.runner
        assert isinstance(runner, TensorParallelRunner) and runner.on_gpu and llm.llm_engine.async_scheduling
        assert runner._graph_sizes            # the worker captured decode graphs
        pairs = [(p, a) for p in [*SHORT_PROMPTS, long_prompt(40, seed=1)] for a in (None, *ADAPTERS)]
        check_staggered_generate(llm, tiny_zoo, pairs, 10)
    finally:
        llm.llm_engine.shutdown()


def test_nccl_all_reduce_is_captured_and_replayed_in_a_cuda_graph(tmp_path):
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1,
                            timeout=timedelta(seconds=60), device_id=torch.device("cuda", 0))
    try:
        x, y = torch.ones(64, 128, device="cuda"), torch.empty(64, 128, device="cuda")
        dist.all_reduce(x)                     # the communicator is set up outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y.copy_(x)
            dist.all_reduce(y)
            y.add_(1)
        x.fill_(3)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, torch.full_like(y, 4))
    finally:
        dist.destroy_process_group()
