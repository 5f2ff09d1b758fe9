"""The step-input builder and the decode-graph path, on CPU.

The graph path is exercised with a DecodeGraphs whose "capture" replays the
forward eagerly, so padding rows, the with/without-LoRA choice and mixed
steps (prefill chunk + decode rows as two forwards) run through exactly the
code the CUDA graphs capture.
"""

import torch

from helpers.engine_runs import assert_idle, greedy, make_llm
from helpers.zoo import SHORT_PROMPTS, long_prompt
from multilora.engine.cuda_graph import DecodeGraphs
from multilora.engine.scheduler import ScheduledBatch
from multilora.engine.sequence import Sequence, SequenceStatus
from multilora.engine.step_inputs import StepInputBuilder
from multilora.lora.mapping import PER_TOKEN_EXPAND_MAX_TOKENS, LoRAVariant, lora_variant
from multilora.sampling_params import SamplingParams

N = 6


class EagerGraphs(DecodeGraphs):
    """Replays run the captured forward eagerly; each replay's (size, LoRA variant) is recorded."""

    def __init__(self, *args, **kwargs):
        self.replayed: list[tuple[int, LoRAVariant | None]] = []
        super().__init__(*args, **kwargs)

    def _capture(self, size, lora, pool):
        def replay():
            self.replayed.append((size, lora))
            return self.forward(size, lora)

        return replay, None


def _llm_with_eager_graphs(zoo, **overrides):
    llm = make_llm(zoo, "llama", max_num_seqs=16, **overrides)
    runner = llm.llm_engine.runner
    runner.decode_graphs = EagerGraphs(runner.decode_forward, max_batch=16, with_lora=True)
    return llm, runner.decode_graphs


def test_padded_graph_batches_match_the_reference(tiny_zoo):
    llm, graphs = _llm_with_eager_graphs(tiny_zoo)
    names = [None, "sql", "chat", None, "code", "kv", None]
    for size in (3, 5, 7):
        requests = [(SHORT_PROMPTS[i % 4], names[i]) for i in range(size)]
        loras = [tiny_zoo.lora_request("llama", a) if a else None for _, a in requests]
        graphs.replayed.clear()
        outs = llm.generate([p for p, _ in requests], greedy(N), lora_request=loras)
        assert [o.outputs[0].token_ids for o in outs] == [tiny_zoo.reference("llama", a, p, N) for p, a in requests]
        assert {s for s, _ in graphs.replayed} == {graphs.size_for(size)}   # padded, never eager
        assert all(lora for _, lora in graphs.replayed)
    assert_idle(llm.llm_engine)


def test_lora_variant_follows_the_tokens_per_adapter():
    limit = PER_TOKEN_EXPAND_MAX_TOKENS
    assert lora_variant([(-1, 5), (-1, 1)]) is None
    assert lora_variant([(0, 1), (1, 1), (-1, 9)]) is LoRAVariant.PER_TOKEN        # base tokens do not count
    assert lora_variant([(0, limit), (1, limit)]) is LoRAVariant.PER_TOKEN
    assert lora_variant([(0, limit), (1, limit + 1)]) is LoRAVariant.TILES
    assert lora_variant([(3, 1)] * (limit + 1)) is LoRAVariant.TILES                # one adapter, many rows


def test_both_lora_variants_replay_their_graphs_and_match_the_reference(tiny_zoo):
    """Decode rows spread over adapters (one row each) replay the per-token graph; many rows of one
    adapter the slot-tile graph; both give the reference tokens."""
    llm, graphs = _llm_with_eager_graphs(tiny_zoo)
    spread = [(SHORT_PROMPTS[i], name) for i, name in enumerate(["sql", "chat", "code", None])]
    crowded = [(SHORT_PROMPTS[i % 4], "sql") for i in range(PER_TOKEN_EXPAND_MAX_TOKENS + 2)]
    for requests, variant in ((spread, LoRAVariant.PER_TOKEN), (crowded, LoRAVariant.TILES)):
        loras = [tiny_zoo.lora_request("llama", a) if a else None for _, a in requests]
        graphs.replayed.clear()
        outs = llm.generate([p for p, _ in requests], greedy(N), lora_request=loras)
        assert [o.outputs[0].token_ids for o in outs] == [tiny_zoo.reference("llama", a, p, N) for p, a in requests]
        assert {lora for _, lora in graphs.replayed} == {variant}
    assert_idle(llm.llm_engine)


def test_base_only_steps_replay_the_graph_without_lora(tiny_zoo):
    llm, graphs = _llm_with_eager_graphs(tiny_zoo)
    prompts = list(SHORT_PROMPTS[:3])
    outs = llm.generate(prompts, greedy(N))
    assert [o.outputs[0].token_ids for o in outs] == [tiny_zoo.reference("llama", None, p, N) for p in prompts]
    assert graphs.replayed and not any(lora for _, lora in graphs.replayed)


def test_mixed_steps_keep_decode_rows_on_the_graph(tiny_zoo):
    """A long prompt prefilled in chunks while short ones decode: the decode rows still replay the graph."""
    llm, graphs = _llm_with_eager_graphs(tiny_zoo, max_num_batched_tokens=12)
    requests = [(SHORT_PROMPTS[0], "sql"), (SHORT_PROMPTS[1], None), (long_prompt(40, seed=3), "code")]
    loras = [tiny_zoo.lora_request("llama", a) if a else None for _, a in requests]
    decode_rows_per_step = []
    real_build = llm.llm_engine.runner.inputs.build

    def build(*args):
        step = real_build(*args)
        decode_rows_per_step.append((step.num_decode, step.num_prefill_tokens))
        return step

    llm.llm_engine.runner.inputs.build = build
    outs = llm.generate([p for p, _ in requests], greedy(N), lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == [tiny_zoo.reference("llama", a, p, N) for p, a in requests]
    assert any(d and p for d, p in decode_rows_per_step), "no mixed step happened"
    assert len(graphs.replayed) == sum(1 for d, _ in decode_rows_per_step if d)


def _seq(name: str, num_tokens: int, blocks: list[int]) -> Sequence:
    seq = Sequence(name, None, list(range(100, 100 + num_tokens)), SamplingParams(max_tokens=4))
    seq.status, seq.block_table = SequenceStatus.RUNNING, list(blocks)
    return seq


def test_builder_writes_records_and_block_rows_incrementally():
    builder = StepInputBuilder(max_decode_rows=4, max_prefill_tokens=8, max_seqs=2, max_blocks_per_seq=4,
                               block_size=2, scratch_block=9, device=torch.device("cpu"))
    a, b = _seq("a", 3, [5, 6]), _seq("b", 5, [7, 1, 2])
    a.num_computed_tokens = 2          # a decodes position 2; b prefills positions 0..4
    step = builder.build(ScheduledBatch([a, b], [1, 5]), [-1, 1], [True, True], decode_size=2)
    assert (step.num_decode, step.num_prefill_tokens, step.sample_order) == (1, 5, [0, 1])
    assert (step.decode_lora, step.prefill_lora) == (None, LoRAVariant.TILES)   # 5 tokens of one adapter
    dec = builder.decode_tensors(2)
    assert dec.input_ids.tolist() == [102, 0] and dec.positions.tolist() == [2, 0]
    assert dec.slot_mapping.tolist() == [6 * 2 + 0, 9 * 2]          # padding row writes the scratch block
    assert dec.context_lens.tolist() == [3, 1] and dec.adapter_slots.tolist() == [-1, -1]
    assert dec.block_tables[:, :2].tolist() == [[5, 6], [9, 9]]
    pre = builder.prefill_tensors(step)
    assert pre.input_ids.tolist() == [100, 101, 102, 103, 104]
    assert pre.slot_mapping.tolist() == [14, 15, 2, 3, 4]
    assert [t.tolist() for t in pre.block_tables] == [[7, 1, 2]]
    assert builder.prefill_sample_index(step).tolist() == [4]

    # b gains a block and decodes; a is preempted and readmitted with other blocks.
    b.num_computed_tokens, b.output_token_ids, b.block_table = 5, [55], [7, 1, 2, 3]
    a.num_preemptions, a.block_table, a.num_computed_tokens = 1, [8, 4], 2
    builder.build(ScheduledBatch([b, a], [1, 1]), [1, -1], [True, False], decode_size=2)
    dec = builder.decode_tensors(2)
    assert dec.input_ids.tolist() == [55, 102]
    assert dec.slot_mapping.tolist() == [2 * 2 + 1, 4 * 2 + 0]
    assert dec.block_tables.tolist() == [[7, 1, 2, 3], [8, 4, 0, 0]]
    assert builder.decode_sample_index(builder.build(ScheduledBatch([b], [1]), [1], [True], 1)).tolist() == [0]

    # a finishes: its row goes to a newcomer.
    a.status = SequenceStatus.FINISHED
    c = _seq("c", 1, [0])
    builder.build(ScheduledBatch([c], [1]), [-1], [True], decode_size=1)
    assert builder.decode_tensors(1).block_tables[0, :1].tolist() == [0]
