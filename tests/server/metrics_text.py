"""Read one sample out of Prometheus text exposition (what Triton's /metrics serves)."""

import time

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str, name: str) -> list[tuple[dict, float]]:
    """Every (labels, value) of metric `name`."""
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def sample(text: str, name: str, **labels) -> float:
    """The value of the one sample of `name` whose labels include `labels`; 0 when there is none yet."""
    matching = [v for lbl, v in samples(text, name) if all(lbl.get(k) == v2 for k, v2 in labels.items())]
    assert len(matching) <= 1, f"{name}{labels} matches {len(matching)} samples"
    return matching[0] if matching else 0.0


def eventually(predicate, timeout: float = 20.0, what: str = "a condition"):
    """Wait for `predicate()`: gauges and pool counters refresh twice a second, not per request."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
