"""docker-compose.yml: valid for Compose, on a patched Triton release, local-only ports, a health check."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def test_compose_file_is_valid_for_docker_compose():
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {**os.environ, "MULTILORA_ADMIN_KEY": "test-key"}
    run = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=60)
    assert run.returncode == 0, run.stderr
    # Without an admin key it must refuse to start rather than leave the admin APIs open.
    env.pop("MULTILORA_ADMIN_KEY")
    run = subprocess.run([binary, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=60)
    assert run.returncode != 0 and "MULTILORA_ADMIN_KEY" in run.stderr


def test_compose_service_is_patched_local_and_health_checked():
    service = yaml.safe_load(COMPOSE.read_text())["services"]["multilora"]
    release = re.search(r"tritonserver:\$\{TRITON_RELEASE:-(\d+)\.(\d+)\}-py3", service["image"])
    assert release and (int(release[1]), int(release[2])) >= (26, 5)   # docs/serving.md: the fixes it needs
    # docker stop reaches the launcher, which needs its whole shutdown timeout before the kill.
    assert service["init"] is True
    timeout = int(re.search(r":-(\d+)\}", service["environment"]["MULTILORA_SHUTDOWN_TIMEOUT"])[1])
    assert int(service["stop_grace_period"].rstrip("s")) > timeout
    assert all(port.startswith("${MULTILORA_PUBLISH:-127.0.0.1}:") for port in service["ports"])
    assert "/v2/models/multilora/ready" in " ".join(service["healthcheck"]["test"])
    assert any(v.endswith(":/models/base:ro") for v in service["volumes"])
    assert service["environment"]["MULTILORA_MODEL"] == "/models/base"
    assert "scripts/serve.py" in service["command"][-1]
