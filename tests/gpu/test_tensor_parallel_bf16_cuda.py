"""On two CUDA GPUs: tensor_parallel_size=2 in bfloat16 gives the greedy tokens of HF + PEFT in bfloat16
(issue 10), on a mixed batch of the base model and every adapter. Skipped elsewhere.

bf16 logits of these tiny models are off from float32 by 0.04-1.3 (HF's own error), so the float32 rule
of the other tests (exact tokens, each reference step won by zoo.MIN_MARGIN) cannot hold: near-ties swap.
Instead every engine token is checked against HF + PEFT fed the engine's own tokens before it (so one
swap does not shift the later steps): its bf16 logit must be within 4 x HF's bf16 error at that step of
HF's top logit. That is the most an engine whose logits are, like HF's bf16 ones, within that error of
float32 can miss by. Measured with gloo on the CPU (bfloat16): at most 0.9 x, 96% of the steps exact;
the base model's tokens judged against an adapter's reference miss by more than 4 logits.
"""

import pytest
import torch

from helpers.engine_runs import assert_idle, greedy, make_llm
from helpers.tiny_models import load_reference_model
from helpers.zoo import ADAPTERS, SHORT_PROMPTS, long_prompt

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

N = 10
ERROR_FACTOR = 4


@torch.no_grad()
def _logits(model, prompt_ids: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the logits each of `tokens` was picked from, the tokens before it fed in."""
    return model(torch.tensor([prompt_ids + tokens[:-1]])).logits[0, len(prompt_ids) - 1:].float()


def check_bf16_greedy(zoo, kind: str, adapter, prompt, tokens: list[int]) -> None:
    """`tokens` are HF + PEFT's greedy tokens in bfloat16, up to ties within its bf16 error (module doc)."""
    ids = zoo.prompt_ids(kind, prompt)
    model = load_reference_model(zoo.model_dir(kind), adapter and zoo.adapter_dir(kind, adapter))
    exact = _logits(model, ids, tokens)
    bf16 = _logits(model.to(torch.bfloat16), ids, tokens)     # base and adapter weights cast to bf16
    error = (bf16 - exact).abs().max(-1).values
    miss = bf16.max(-1).values - bf16.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    assert (miss <= ERROR_FACTOR * error).all(), (kind, adapter, prompt, tokens, miss.tolist(), error.tolist())


@pytest.mark.parametrize("kind", ["llama-8h2kv", "llama-8h1kv"])      # KV heads split / replicated
def test_two_gpus_in_bf16_give_the_hf_peft_bf16_tokens(tiny_zoo, kind, monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")       # NVLink multicast off (the workers set it too)
    requests = [(p, a) for p in [*SHORT_PROMPTS, long_prompt(40, seed=1)] for a in (None, *ADAPTERS)]
    llm = make_llm(tiny_zoo, kind, device="cuda", dtype="bfloat16", tensor_parallel_size=2)
    try:
        outs = llm.generate([p for p, _ in requests], greedy(N),
                            lora_request=[a and tiny_zoo.lora_request(kind, a) for _, a in requests])
        assert_idle(llm.llm_engine)
    finally:
        llm.llm_engine.shutdown()
    for (prompt, adapter), out in zip(requests, outs):
        assert len(out.outputs[0].token_ids) == N
        check_bf16_greedy(tiny_zoo, kind, adapter, prompt, out.outputs[0].token_ids)
