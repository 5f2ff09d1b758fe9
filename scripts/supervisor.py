"""Supervisor: runs tritonserver for scripts/serve.py, restarts it when it or the model dies, stops it in order.

Why a supervisor at all: Triton server 2.51 (the nvidia-pytriton wheel's)
neither ties readiness to the Python backend stub's health nor exits on
SIGTERM while a client keeps a gRPC stream open, and a stub that dies leaves
its streams hanging. So the launcher owns the server's whole life:

- tritonserver runs in its own process group (a SIGTERM to the launcher's
  group, as from a terminal or `kill -- -PGID`, reaches the launcher only,
  which then stops the server in order) and dies with the launcher
  (parent-death signal).
- Watching (every POLL_S): tritonserver exited, the stub's pid gone, the
  model's health report (launcher_link.py) older than `health_timeout`, or the
  engine thread dead -> the reason is logged, the server's process group is
  killed (open streams get a connection error instead of hanging), its
  shared-memory regions are removed and a new server is started. More than
  `max_restarts` restarts within RESTART_WINDOW_S: give up, exit 1.
- Stopping (SIGTERM or SIGINT): the model is asked to drain (new requests get
  UNAVAILABLE; requests unfinished at the drain deadline end with UNAVAILABLE)
  and tritonserver gets SIGTERM (readiness false, new requests refused). Once
  every request is answered, or at `shutdown_timeout`, whatever is left is
  killed and the shared memory removed. A second signal kills at once.
"""

import glob
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

# launcher_link.py sits beside model.py, where the stub imports it; the launcher reads the same file.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "model_repository", "multilora", "1"))
from launcher_link import (CONTROL_DIR_ENV, DRAIN_FILE, HEALTH_FILE, SHM_PREFIX_ENV,  # noqa: E402,F401 (serve.py's)
                           read_health, request_drain)

POLL_S = 0.5
RESTART_WINDOW_S = 600.0
EXIT_GRACE_S = 3.0      # after every request is answered: time for tritonserver to exit by itself
ANSWER_GRACE_S = 5.0    # after the engine thread died: time for the model to send the answers it ended
STUB_EXIT_WAIT_S = 5.0  # after a kill: how long to wait for the server's process group to be gone


def log(message: str):
    print(f"[serve.py {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def process_alive(pid: int) -> bool:
    """Alive and not a zombie (a dead stub stays a zombie until tritonserver reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def drain_seconds(shutdown_timeout: float) -> float:
    """How long unfinished requests may run after SIGTERM: all but 10 s of the timeout, at least half of it."""
    return max(shutdown_timeout / 2, shutdown_timeout - 10.0)


@dataclass(frozen=True)
class SupervisorConfig:
    command: list[str]
    env: dict
    control_dir: str          # MULTILORA_CONTROL_DIR of the model (launcher_link.py)
    shm_prefix: str           # the Python backend's shm-region-prefix-name for this launcher
    is_ready: Callable[[], bool]
    ready_timeout: float
    shutdown_timeout: float
    health_timeout: float
    max_restarts: int


class Supervisor:
    def __init__(self, config: SupervisorConfig, on_ready: Callable[[subprocess.Popen, int], None]):
        self.config = config
        self._on_ready = on_ready         # (process, restarts so far)
        self._stop_signals: list[float] = []
        self._restarts: deque = deque()

    def request_stop(self, signum, _frame=None):
        """Signal handler: only records the request; the loop acts on it."""
        self._stop_signals.append(time.monotonic())

    # ---- the loop ----------------------------------------------------------------

    def run(self) -> int:
        restarts = 0
        while True:
            proc = self._start()
            ready = self._wait_ready(proc)
            if self._stop_signals:
                return self._shutdown(proc, drain=ready)
            if ready:
                self._on_ready(proc, restarts)
                reason = self._watch(proc)
                if reason is None:
                    return self._shutdown(proc, drain=True)
            elif restarts == 0:
                reason = (f"tritonserver exited with code {proc.returncode} before the model was ready; its log "
                          "is above" if proc.poll() is not None else
                          f"the model was not ready after {self.config.ready_timeout:.0f} s")
                log(reason + "; stopping")
                self._kill(proc)
                return 1
            else:
                reason = "the restarted server did not become ready"
            log(f"{reason}; killing tritonserver (pid {proc.pid})")
            self._kill(proc)
            restarts += 1
            if not self._may_restart():
                log(f"giving up: {len(self._restarts)} restarts within {RESTART_WINDOW_S:.0f} s "
                    f"(--max-restarts {self.config.max_restarts})")
                return 1
            log(f"restarting tritonserver (restart {restarts}; {len(self._restarts)} within the last "
                f"{RESTART_WINDOW_S:.0f} s, at most {self.config.max_restarts})")

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        return len(self._restarts) <= self.config.max_restarts

    def _start(self) -> subprocess.Popen:
        os.makedirs(self.config.control_dir, exist_ok=True)
        for name in (HEALTH_FILE, DRAIN_FILE):     # a fresh server starts without the last one's state
            try:
                os.remove(os.path.join(self.config.control_dir, name))
            except FileNotFoundError:
                pass
        return subprocess.Popen(self.config.command, env=self.config.env, start_new_session=True,
                                preexec_fn=_die_with_parent)

    def _wait_ready(self, proc: subprocess.Popen) -> bool:
        deadline = time.monotonic() + self.config.ready_timeout
        while time.monotonic() < deadline and not self._stop_signals:
            if proc.poll() is not None:
                return False
            if self.config.is_ready():
                return True
            time.sleep(POLL_S)
        return False

    def _watch(self, proc: subprocess.Popen) -> Optional[str]:
        """Waits while the server is healthy; the reason it is not, or None when asked to stop."""
        ready_at, engine_dead_at = time.time(), None
        while not self._stop_signals:
            code = proc.poll()
            health = read_health(self.config.control_dir)
            stub_died = health is not None and not process_alive(health.pid)
            if code is not None:
                # A killed stub can take tritonserver down before this loop sees either: name both.
                both = f", and the Python backend stub (pid {health.pid}) died too" if stub_died else ""
                return f"tritonserver exited unexpectedly with code {code}{both}"
            age = time.time() - (health.time if health else ready_at)
            if stub_died:
                return f"the Python backend stub (pid {health.pid}) died"
            if health is not None and not health.engine_alive and not health.draining:
                # The engine ended its requests as it died: let the model send those answers first.
                engine_dead_at = engine_dead_at or time.monotonic()
                if health.unanswered == 0 or time.monotonic() - engine_dead_at > ANSWER_GRACE_S:
                    return f"the engine thread died ({health.engine_failure})"
            if age > self.config.health_timeout:
                return (f"the model has not reported its health for {age:.0f} s (a hung Python backend stub, or a "
                        f"hung tritonserver it waits on); --health-timeout is {self.config.health_timeout:.0f} s")
            time.sleep(POLL_S)
        return None

    # ---- stopping -------------------------------------------------------------------

    def _shutdown(self, proc: subprocess.Popen, drain: bool) -> int:
        started = self._stop_signals[0]
        deadline = started + self.config.shutdown_timeout
        if drain and proc.poll() is None:
            abort_in = drain_seconds(self.config.shutdown_timeout) - (time.monotonic() - started)
            request_drain(self.config.control_dir, time.time() + max(0.0, abort_in))
            log(f"stopping: new requests are refused; unfinished requests end in {max(0.0, abort_in):.0f} s; "
                f"the server is killed after {self.config.shutdown_timeout:.0f} s at the latest")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        answered, answered_at = not drain, None
        while time.monotonic() < deadline and proc.poll() is None and len(self._stop_signals) < 2:
            health = read_health(self.config.control_dir) if drain else None
            if health is not None and not process_alive(health.pid):
                break                       # nothing is left that could answer
            if health is not None and health.draining and health.unanswered == 0:
                answered = True
                answered_at = answered_at or time.monotonic()
                if time.monotonic() - answered_at > EXIT_GRACE_S:
                    break                   # clients keep streams open: tritonserver would wait for ever
            time.sleep(0.2)
        exited_by_itself = proc.poll() is not None
        self._kill(proc)
        elapsed = time.monotonic() - started
        if exited_by_itself:
            log(f"tritonserver exited with code {proc.returncode} after {elapsed:.1f} s")
            return 0 if proc.returncode == 0 or answered else proc.returncode
        log(f"stopped in {elapsed:.1f} s" + ("; every request had its final response" if answered and drain else
                                            "; some requests may have had no final response" if drain else ""))
        return 0 if answered else 1

    def _kill(self, proc: subprocess.Popen):
        """Kills the server's process group (tritonserver and its stubs), then removes their shared memory.

        The whole group, not tritonserver's children: after a crash (SIGSEGV) the
        stub is already an orphan whose parent is no longer tritonserver. The next
        server starts only once the old stub is gone, so two never hold the GPU.
        """
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        deadline = time.monotonic() + STUB_EXIT_WAIT_S
        while (left := group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if left:
            log(f"processes {left} of tritonserver's process group outlived SIGKILL by {STUB_EXIT_WAIT_S:.0f} s")
        for path in glob.glob(f"/dev/shm/{glob.escape(self.config.shm_prefix)}*"):
            try:
                os.remove(path)
            except OSError as e:
                log(f"could not remove shared memory {path}: {e}")


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group `pgid` (Linux /proc; empty elsewhere)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                state, _ppid, pgrp = f.read().rpartition(")")[2].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            found.append(int(stat.split("/")[2]))
    return found


def _die_with_parent():
    """Linux: the server is killed if the launcher dies, so no server outlives it.

    SIGKILL, not SIGTERM: with a client's stream open, tritonserver 2.51 never
    finishes a SIGTERM shutdown, and nobody would be left to end it.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
