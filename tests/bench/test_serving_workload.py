"""bench/serving.py's workload conventions and report arithmetic, on made-up records (no engine)."""

import dataclasses
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from serving_report import RequestRecord, decode_rate, summarize   # noqa: E402
from serving_workload import Workload, make_requests, parse_range  # noqa: E402


def test_same_seed_same_requests_other_seed_others():
    wl = Workload(num_adapters=16, prompt_len=(4, 9), output_len=(2, 5), num_requests=50, seed=3)
    a, b = make_requests(wl, 1000), make_requests(wl, 1000)
    assert a == b
    other = make_requests(dataclasses.replace(wl, seed=4), 1000)
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in a]
    assert all(4 <= len(r.prompt_ids) <= 9 and 2 <= r.output_len <= 5 for r in a)
    assert all(3 <= t < 1000 for r in a for t in r.prompt_ids)


def test_zipf_popularity_and_base_share():
    wl = Workload(num_adapters=16, alpha=1.0, base_share=0.25, prompt_len=(1, 1), output_len=(1, 1),
                  num_requests=8000)
    requests = make_requests(wl, 100)
    base = sum(r.adapter_index is None for r in requests)
    counts = [sum(r.adapter_index == k for r in requests) for k in range(16)]
    assert 0.22 < base / len(requests) < 0.28
    # P(k) ~ 1 / (k + 1): the top adapter twice as popular as the second, 16 times the last.
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.15)
    assert counts[0] / counts[15] == pytest.approx(16.0, rel=0.3)
    assert counts[0] > counts[1] > counts[2] > counts[3]


def test_poisson_arrivals_have_the_asked_rate():
    wl = Workload(num_adapters=4, prompt_len=(1, 1), output_len=(1, 1), num_requests=4000, concurrency=None,
                  rate=20.0)
    arrivals = [r.arrival_s for r in make_requests(wl, 100)]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert all(g > 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 20.0, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean.
    mean = sum(gaps) / len(gaps)
    std = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert std == pytest.approx(mean, rel=0.1)


def test_ranks_cycle_over_adapters_and_specs_parse():
    wl = Workload(num_adapters=6, ranks=(8, 16, 64))
    assert [wl.rank_of(k) for k in range(6)] == [8, 16, 64, 8, 16, 64]
    assert parse_range("128") == (128, 128) and parse_range("64:512") == (64, 512)
    for bad in ("0", "9:3", "x"):
        with pytest.raises(ValueError):
            parse_range(bad)
    with pytest.raises(ValueError):
        Workload(num_adapters=4, concurrency=8, rate=2.0)


def _record(index, send, token_times, end, output_len=None):
    r = RequestRecord(index, None, 4, output_len or sum(n for _, n in token_times), send_s=send)
    for t, n in token_times:
        r.on_tokens(t, n)
    r.end_s = end
    return r


def test_summary_definitions_on_known_times():
    records = [_record(0, 0.0, [(0.5, 1), (0.7, 1), (0.9, 1)], 0.9),     # TTFT 0.5, TPOT 0.2
               _record(1, 1.0, [(1.1, 2), (1.5, 2)], 1.5)]                 # TTFT 0.1, TPOT 0.4 / 2 = 0.2
    s = summarize(records, load_windows=[(0.6, 0.65)])
    assert (s["requests"], s["finished"], s["errors"], s["output_tokens"]) == (2, 2, 0, 7)
    assert s["seconds"] == pytest.approx(1.5)
    assert s["output_tok_s"] == pytest.approx(7 / 1.5)
    assert s["ttft_s"]["max"] == pytest.approx(0.5) and s["ttft_s"]["p50"] == pytest.approx(0.3)
    assert s["tpot_s"]["p50"] == pytest.approx(0.2)
    # One gap overlaps the load window (0.5 -> 0.7): cold; the others are warm.
    assert s["itl_cold_s"]["count"] == 1 and s["itl_warm_s"]["count"] == 2
    # Steady state ends at the last send (t = 1.0): the 3 tokens of request 0 over 1 s.
    assert s["steady_output_tok_s"] == pytest.approx(3.0) and s["steady_req_s"] == pytest.approx(1.0)


def test_decode_only_gaps_leave_out_steps_that_finished_a_prompt():
    """A gap whose closing step also finished another stream's prompt (its first token lands there)
    is slower for reasons a load does not cause: the decode-only figures leave it out."""
    records = [_record(0, 0.0, [(0.5, 1), (0.7, 1), (0.9, 1), (1.1, 1)], 1.1),
               _record(1, 0.55, [(0.7, 1), (0.9, 1)], 0.9)]          # its prompt ran in the step ending at 0.7
    s = summarize(records, load_windows=[(0.95, 1.0)])
    assert (s["itl_warm_s"]["count"], s["itl_cold_s"]["count"]) == (3, 1)
    # 0.5 -> 0.7 (request 1's first token at its end) is out; 0.7 -> 0.9 twice warm, 0.9 -> 1.1 cold.
    assert (s["itl_warm_decode_s"]["count"], s["itl_cold_decode_s"]["count"]) == (2, 1)
    assert s["itl_cold_over_warm_decode"] == pytest.approx(1.0)


def test_errors_and_unfinished_requests_are_counted():
    failed = _record(0, 0.0, [(0.2, 1)], 0.3, output_len=4)
    failed.error = "NOT_FOUND: unknown adapter"
    hung = RequestRecord(1, None, 4, 4, send_s=0.0)
    s = summarize([failed, hung, _record(2, 0.0, [(0.1, 4)], 0.1)])
    assert (s["finished"], s["errors"], s["unfinished"]) == (1, 1, 1)
    assert s["error_kinds"] == {"NOT_FOUND: unknown adapter": 1}


def test_decode_rate_counts_only_while_every_row_decodes():
    rows = [_record(0, 0.0, [(1.0, 1), (2.0, 1), (3.0, 1), (4.0, 1)], 4.0),
            _record(1, 0.0, [(1.5, 1), (2.0, 1), (3.0, 1)], 3.0)]
    # From the last first token (1.5) to the first end (3.0): 4 tokens at t = 2 and 3, over 1.5 s.
    assert decode_rate(rows) == pytest.approx(4 / 1.5)
