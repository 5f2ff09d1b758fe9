"""A stand-in for triton_python_backend_utils: just enough of it to run model.py and ServerMetrics in-process."""

import threading
import types
from typing import Optional

# Metric calls made off `FakeMetric.only_thread`. python_backend's Metric is not thread-safe: two threads
# in one metric hand tritonserver a freed shared-memory message and it segfaults (docs/serving.md).
METRIC_MISUSES: list[str] = []


class FakeMetric:
    only_thread: Optional[str] = None   # the name of the one thread allowed to count; None = any

    def __init__(self, family, labels, buckets=None):
        self.family, self.labels, self.buckets = family, labels, buckets
        self.value, self.observations = 0.0, []

    def _check_thread(self, call):
        thread = threading.current_thread().name
        if self.only_thread is not None and thread != self.only_thread:
            METRIC_MISUSES.append(f"{self.family.name}.{call}() on thread {thread!r}")

    def increment(self, value):
        self._check_thread("increment")
        assert value >= 0, "Triton counters only go up"
        self.value += value

    def set(self, value):
        self._check_thread("set")
        self.value = value

    def observe(self, value):
        self._check_thread("observe")
        self.observations.append(value)


class FakeMetricFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    registry: dict = {}

    def __init__(self, name, description, kind):
        self.name, self.kind, self.metrics = name, kind, []
        FakeMetricFamily.registry[name] = self

    def Metric(self, labels, buckets=None):  # noqa: N802 (Triton's name)
        assert (buckets is not None) == (self.kind == self.HISTOGRAM), "histograms and only they take buckets"
        metric = FakeMetric(self, labels, buckets)
        self.metrics.append(metric)
        return metric


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message, code=INTERNAL):
        self.message, self.code = message, code


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error = list(output_tensors), error


class Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Logger:
    log_info = log_warn = log_error = staticmethod(lambda message: None)


def module() -> types.ModuleType:
    fake = types.ModuleType("triton_python_backend_utils")
    fake.MetricFamily, fake.TritonError = FakeMetricFamily, TritonError
    fake.InferenceResponse, fake.Tensor, fake.Logger = InferenceResponse, Tensor, _Logger
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    return fake
