"""Timing shared by the kernel benchmarks: median milliseconds, eager or replayed from a CUDA graph."""

from __future__ import annotations

import statistics
import time

import torch


class Timer:
    """Median milliseconds of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: str, warmup: int, iters: int):
        self.cuda = device == "cuda"
        self.warmup, self.iters = warmup, iters

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        return statistics.median(self._once(fn) for _ in range(max(1, self.iters)))

    def _once(self, fn) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def graph(self, calls: list) -> float | None:
        """Per-call time of `calls` (one callable each) replayed from one CUDA graph (no launch cost)."""
        if not self.cuda:
            return None
        for fn in calls[:2]:
            fn()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in calls:
                fn()
        ms = self(graph.replay) / len(calls)
        del graph
        return ms


def to_us(ms: float | None) -> float | None:
    return None if ms is None else ms * 1e3
