"""The shared-memory, logging and model-repository APIs need the admin header; inference does not."""

import urllib.error
import urllib.request

import pytest

RESTRICTED = [("POST", "/v2/repository/index"), ("GET", "/v2/logging"), ("GET", "/v2/systemsharedmemory/status"),
              ("GET", "/v2/cudasharedmemory/status")]


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
