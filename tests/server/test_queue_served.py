"""The bounded waiting queue through model.py (fake triton_python_backend_utils, the real engine on the tiny Llama):
a burst beyond max_waiting_requests gets UNAVAILABLE at once, the rest is served, and the engine ends idle.
"""

import time

import numpy as np
import pytest

import fake_pb_utils
from test_model_py import FakeRequest, model_module, start_model  # noqa: F401 (model_module is a fixture)


@pytest.fixture
def small_queue_model(model_module, tiny_zoo, tmp_path):  # noqa: F811 (the fixture imported above)
    m = start_model(model_module, tiny_zoo, tmp_path, max_num_seqs=1, max_waiting_requests=2)
    yield m
    m.finalize()


def test_a_burst_beyond_the_queue_gets_unavailable_and_the_rest_is_served(small_queue_model):
    requests = [FakeRequest(text_input="Hello, world!", stream=True, max_tokens=np.int32(8), ignore_eos=True,
                            temperature=np.float32(0))
                for _ in range(12)]
    small_queue_model.execute(requests)
    for r in requests:
        assert r.sender.done.wait(60)
        assert [f for _, f in r.sender.sent].count(1) == 1
    refused = [r for r in requests if r.sender.sent[-1][0].error is not None]
    assert refused, "a burst of 12 on a queue of 2 refused nothing"
    for r in refused:
        [(response, _)] = r.sender.sent                 # one response, the error, and no tokens before it
        assert response.error.code == fake_pb_utils.TritonError.UNAVAILABLE
        assert "max_waiting_requests 2" in response.error.message and "retry later" in response.error.message
    served = [r for r in requests if r not in refused]
    assert len(served) >= 2
    texts = {b"".join(resp.output_tensors[0].as_numpy()[0] for resp, _ in r.sender.sent if resp.output_tensors)
             for r in served}
    assert len(texts) == 1                              # the same greedy text for every served request
    deadline = time.monotonic() + 10
    while (stats := small_queue_model._engine.stats()).num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
