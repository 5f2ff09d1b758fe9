"""The admin-like APIs (shared memory, logging, model repository, trace) need the admin header; inference does not."""

import urllib.error
import urllib.request

import pytest

RESTRICTED = [("POST", "/v2/repository/index"), ("GET", "/v2/logging"), ("GET", "/v2/systemsharedmemory/status"),
              ("GET", "/v2/cudasharedmemory/status"), ("GET", "/v2/trace/setting"),
              ("GET", "/v2/models/multilora/trace/setting")]


def status(url: str, method: str, headers: dict) -> int:
    request = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("method, path", RESTRICTED)
def test_restricted_api_needs_the_admin_key(server, method, path):
    assert status(server.http_url + path, method, {}) == 403
    assert status(server.http_url + path, method, {"multilora-admin-key": "wrong"}) == 403
    assert status(server.http_url + path, method, {"multilora-admin-key": server.admin_key}) != 403


def test_inference_and_health_are_open(server):
    assert status(server.http_url + "/v2/models/multilora/ready", "GET", {}) == 200
    assert status(server.http_url + "/v2/models/multilora", "GET", {}) == 200


def test_grpc_admin_apis_need_the_key_too(server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for call in (client.get_trace_settings, client.get_log_settings, client.get_system_shared_memory_status):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
            # Triton server's gRPC frontend prefixes the header it expects.
            call(headers={"triton-grpc-protocol-multilora-admin-key": server.admin_key})
        assert client.is_model_ready("multilora")       # health and inference stay open
    finally:
        client.close()
