"""scripts/supervisor.py against a fake tritonserver: restarts, giving up, draining, cleaning up (no Triton server).

The fake speaks the model's side of launcher_link.py (health.json, drain.json)
and fails in the ways a real server does; the real server's shutdown and
restart are in test_shutdown.py.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from model_dir import import_model_module

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import supervisor  # noqa: E402

launcher_link = import_model_module("launcher_link")

FAKE_SERVER = r'''
import json, os, signal, sys, time
mode, shm, control = sys.argv[1], sys.argv[2], os.environ["MULTILORA_CONTROL_DIR"]
signal.signal(signal.SIGTERM, signal.SIG_IGN)   # as tritonserver 2.51 with a client's stream open
open(shm, "w").close()                          # the Python backend's shared-memory region
if mode == "stub_dies" and os.fork() != 0:
    while True:                                 # "tritonserver" lives on; its child, the "stub", dies
        time.sleep(1)
if mode == "segfault" and os.fork() == 0:
    with open(os.path.join(control, "stubs"), "a") as f:   # the "stub": outlives its crashed parent unless killed
        f.write(f"{os.getpid()}\n")
    while True:
        time.sleep(1)
started = time.time()
while True:
    late = time.time() - started > 1.5          # healthy first, so that the supervisor sees it ready
    if mode == "crash" and late:
        sys.exit(3)
    if mode == "segfault" and late:
        os.kill(os.getpid(), signal.SIGSEGV)
    if mode == "stub_dies" and late:
        os._exit(0)
    if mode == "hang" and late:
        time.sleep(0.1)
        continue
    draining = os.path.exists(os.path.join(control, "drain.json"))
    dead = mode == "engine_dies" and late
    with open(os.path.join(control, "h.tmp"), "w") as f:
        json.dump({"pid": os.getpid(), "time": time.time(), "engine_alive": not dead,
                   "engine_failure": "RuntimeError: boom" if dead else None,
                   "unanswered": 0 if draining else 3, "draining": draining}, f)
    os.replace(os.path.join(control, "h.tmp"), os.path.join(control, "health.json"))
    time.sleep(0.1)
'''


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_tritonserver.py"
    script.write_text(FAKE_SERVER)
    control = tmp_path / "control"
    prefix = f"multilora_test_{os.getpid()}_{tmp_path.name}_"
    shm = f"/dev/shm/{prefix}region"

    def make(mode: str, **overrides) -> supervisor.Supervisor:
        config = supervisor.SupervisorConfig(
            command=[sys.executable, str(script), mode, shm], env={**os.environ, "MULTILORA_CONTROL_DIR": str(control)},
            control_dir=str(control), shm_prefix=prefix,
            is_ready=lambda: (control / "health.json").exists(),
            ready_timeout=30, shutdown_timeout=overrides.pop("shutdown_timeout", 10),
            health_timeout=overrides.pop("health_timeout", 30), max_restarts=overrides.pop("max_restarts", 2))
        readies = []
        sup = supervisor.Supervisor(config, on_ready=lambda proc, restarts: readies.append((proc.pid, restarts)))
        sup.readies, sup.shm = readies, shm
        return sup
    yield make
    assert not os.path.exists(shm), "the supervisor must remove its shared-memory regions"


def test_a_dead_engine_is_restarted_and_endless_failures_give_up(fake, capsys):
    sup = fake("engine_dies", max_restarts=2)
    assert sup.run() == 1
    err = capsys.readouterr().err
    assert err.count("the engine thread died (RuntimeError: boom)") == 3
    assert "restart 1;" in err and "restart 2;" in err and "giving up: 3 restarts" in err
    assert [r for _, r in sup.readies] == [0, 1, 2]
    assert not any(supervisor.process_alive(pid) for pid, _ in sup.readies)


def test_a_crashed_server_is_restarted(fake, capsys):
    sup = fake("crash", max_restarts=1)
    assert sup.run() == 1
    assert capsys.readouterr().err.count("tritonserver exited unexpectedly with code 3") == 2


def test_a_segfaulted_server_is_restarted_and_its_orphaned_stub_killed(fake, capsys):
    sup = fake("segfault", max_restarts=1)
    assert sup.run() == 1
    assert capsys.readouterr().err.count("tritonserver exited unexpectedly with code -11") == 2
    stubs = [int(pid) for pid in (Path(sup.config.control_dir) / "stubs").read_text().split()]
    # Their parent gone, the stubs were no children of tritonserver's any more, but in its process group.
    assert len(stubs) == 2 and not any(supervisor.process_alive(pid) for pid in stubs)
    assert all(supervisor.group_members(pid) == [] for pid, _ in sup.readies)


def test_a_dead_stub_is_noticed(fake, capsys):
    sup = fake("stub_dies", max_restarts=0)
    assert sup.run() == 1
    assert "the Python backend stub (pid " in capsys.readouterr().err


def test_a_hung_stub_is_restarted(fake, capsys):
    sup = fake("hang", max_restarts=0, health_timeout=1.5)
    assert sup.run() == 1
    assert "has not reported its health" in capsys.readouterr().err


def test_sigterm_drains_then_kills_a_server_that_does_not_exit(fake, capsys):
    sup = fake("serve", shutdown_timeout=20)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", sup.run()))
    thread.start()
    deadline = time.monotonic() + 30
    while not sup.readies:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.05)
    drain_file = Path(sup.config.control_dir) / "drain.json"
    sup.request_stop(signal.SIGTERM)
    thread.join(30)
    assert not thread.is_alive() and result["code"] == 0
    abort_at = launcher_link._read(str(drain_file))["abort_at"]
    assert abort_at > time.time() - 20          # the model was given its drain deadline
    assert "every request had its final response" in capsys.readouterr().err
    assert not supervisor.process_alive(sup.readies[0][0])


def test_drain_leaves_time_to_answer_before_the_kill():
    assert supervisor.drain_seconds(30) == 20 and supervisor.drain_seconds(8) == 4


def test_process_alive_sees_zombies_as_dead():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    deadline = time.monotonic() + 10
    while supervisor.process_alive(pid):        # a zombie until reaped: dead already
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.waitpid(pid, 0)
    assert not supervisor.process_alive(pid) and supervisor.process_alive(os.getpid())
