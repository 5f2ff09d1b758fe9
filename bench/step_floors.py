"""The hardware floors of an engine step, measured on this machine, in the run that compares against them.

A decode step at batch B must at least read every linear weight once (as a chain of cuBLAS GEMMs at
batch B, replayed from one CUDA graph, so no launch cost) and read the batch's whole KV cache. A
prefill must at least do 2 x linear params x tokens FLOPs at the matrix rate a large matmul reaches
here. Nothing of the engine is used: these are what any engine could reach on this GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from timing import Timer


@dataclass(frozen=True)
class ModelShapes:
    """The dimensions of a Llama-style decoder that its floors depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelShapes":
        heads = config["num_attention_heads"]
        return cls(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], heads,
                   config["num_key_value_heads"], config.get("head_dim") or config["hidden_size"] // heads,
                   config["vocab_size"])

    def layer_linears(self, fused: bool) -> list[tuple[int, int]]:
        """(in, out) of one layer's projections: q/k/v and gate/up stacked or apart."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if fused:
            return [(self.hidden, q + 2 * kv), (q, self.hidden), (self.hidden, 2 * self.intermediate),
                    (self.intermediate, self.hidden)]
        return [(self.hidden, q), (self.hidden, kv), (self.hidden, kv), (q, self.hidden),
                (self.hidden, self.intermediate), (self.hidden, self.intermediate), (self.intermediate, self.hidden)]

    @property
    def linear_params(self) -> int:
        """Parameters of the decoder layers' projections (the lm_head not counted)."""
        return self.layers * sum(i * o for i, o in self.layer_linears(fused=True))

    def kv_bytes_per_token(self, itemsize: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


def matmul_tflops(device: str, dtype: torch.dtype, n: int, timer: Timer) -> float:
    """The matrix rate (TFLOP/s) of one n x n x n matmul on random data."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    ms = timer(lambda: torch.matmul(a, b, out=out))
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def decode_floors(shapes: ModelShapes, batch: int, context: int, dtype: torch.dtype, device: str,
                  timer: Timer) -> dict:
    """Milliseconds of the decode step's floor pieces at `batch` rows of `context` tokens each.

    `floor_ms` is one graph doing what a step must: per layer its GEMMs then a read of its KV cache,
    then the lm_head. The pieces alone (fused or unfused GEMM chain, the KV read) are kept to show
    where the floor comes from. On CPU nothing is captured and the times are eager.
    """
    gen = dict(device=device, dtype=dtype)
    layers = [[torch.empty(o, i, **gen).normal_(0, 0.02) for i, o in shapes.layer_linears(fused=True)]
              for _ in range(shapes.layers)]
    lm_head = torch.empty(shapes.vocab, shapes.hidden, **gen).normal_(0, 0.02)
    inputs = {i: torch.randn(batch, i, **gen) for i in {i for i, _ in shapes.layer_linears(fused=False)}}
    kv_elems = 2 * batch * context * shapes.kv_heads * shapes.head_dim
    kv = torch.empty(shapes.layers, kv_elems, **gen).normal_()

    def gemms(weights):
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    def step():
        for layer, weights in enumerate(layers):
            gemms(weights)
            kv[layer].sum(dtype=torch.float32)
        torch.nn.functional.linear(inputs[shapes.hidden], lm_head)

    def graph_ms(fn) -> float:
        ms = timer.graph([fn])
        return timer(fn) if ms is None else ms

    floors = {"floor_ms": graph_ms(step),
              "gemm_chain_ms": graph_ms(lambda: [gemms(w) for w in layers]),
              "lm_head_ms": graph_ms(lambda: torch.nn.functional.linear(inputs[shapes.hidden], lm_head)),
              "kv_read_ms": graph_ms(lambda: [kv[layer].sum(dtype=torch.float32) for layer in range(shapes.layers)])}
    del layers
    unfused = [[torch.empty(o, i, **gen).normal_(0, 0.02) for i, o in shapes.layer_linears(fused=False)]
               for _ in range(shapes.layers)]
    floors["gemm_chain_unfused_ms"] = graph_ms(lambda: [gemms(w) for w in unfused])
    weight_bytes = (shapes.linear_params + shapes.vocab * shapes.hidden) * dtype.itemsize
    kv_bytes = kv.numel() * dtype.itemsize
    floors.update(batch=batch, context=context, weight_bytes=weight_bytes, kv_bytes=kv_bytes,
                  weight_read_tb_s=weight_bytes / (floors["gemm_chain_ms"] + floors["lm_head_ms"]) / 1e9,
                  kv_read_tb_s=kv_bytes / floors["kv_read_ms"] / 1e9)
    return floors


def prefill_floor_ms(shapes: ModelShapes, tokens: int, tflops: float) -> float:
    """2 x linear params x tokens at `tflops`: the projections alone (attention and lm_head left out)."""
    return 2 * shapes.linear_params * tokens / (tflops * 1e12) * 1e3
