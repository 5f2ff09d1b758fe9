"""The files through which scripts/serve.py supervises the model: a heartbeat out, a drain request in.

Triton server 2.51's Python backend does not tie readiness to the stub's
health, and a Python model cannot mark itself unready there, so the launcher
watches a directory it owns instead (it sets MULTILORA_CONTROL_DIR):

  health.json  the model writes it about once a second: the stub's pid, whether
               the engine thread lives (and why it died), how many requests
               still wait for their final response, whether it is draining.
               A dead pid, a stale file or a dead engine make the launcher
               restart the server.
  drain.json   the launcher writes it on SIGTERM: {"abort_at": <unix time>}.
               New requests then get UNAVAILABLE; requests still unfinished at
               abort_at are ended with UNAVAILABLE, so every request has its
               final response before the server is stopped.

The launcher also names the Python backend's shared-memory regions
(MULTILORA_SHM_PREFIX), so that a stub whose tritonserver is gone (killed
with a launcher killed by SIGKILL) can remove them before it exits.

Standard library only: scripts/serve.py imports this file too, so both sides
of the exchange live in one place. Without MULTILORA_CONTROL_DIR (a Triton
server started some other way) the model's side does nothing.
"""

import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Optional

CONTROL_DIR_ENV = "MULTILORA_CONTROL_DIR"
SHM_PREFIX_ENV = "MULTILORA_SHM_PREFIX"
HEALTH_FILE = "health.json"
PARENT_CHECK_S = 0.5
DRAIN_FILE = "drain.json"
logger = logging.getLogger("multilora.triton")


@dataclass(frozen=True)
class Health:
    pid: int                      # the Python backend stub's process
    time: float                   # unix time of the report
    engine_alive: bool
    engine_failure: Optional[str]  # why the engine thread died, when it did
    unanswered: int               # requests without their final response yet
    draining: bool


def _write_atomically(path: str, payload: dict):
    """Readers never see a half-written file: write beside it, then rename over it."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


def _read(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# ---- the launcher's side -------------------------------------------------------

def read_health(directory: str) -> Optional[Health]:
    raw = _read(os.path.join(directory, HEALTH_FILE))
    try:
        return Health(**raw) if raw is not None else None
    except TypeError:           # a report of another version of this file: treat as none
        return None


def request_drain(directory: str, abort_at: float):
    _write_atomically(os.path.join(directory, DRAIN_FILE), {"abort_at": abort_at})


# ---- the model's side ----------------------------------------------------------

class LauncherLink:
    """The model's end: `report()` the heartbeat, `drain_deadline()` polls for a drain request."""

    def __init__(self, directory: Optional[str], shm_prefix: Optional[str] = None):
        self._directory, self._shm_prefix = directory, shm_prefix
        self._abort_at: Optional[float] = None
        self._failed_writes = 0

    @classmethod
    def from_environment(cls) -> "LauncherLink":
        return cls(os.environ.get(CONTROL_DIR_ENV) or None, os.environ.get(SHM_PREFIX_ENV) or None)

    @property
    def active(self) -> bool:
        return self._directory is not None

    def drain_deadline(self) -> Optional[float]:
        """The unix time after which unfinished requests are ended, once the launcher asked to drain."""
        if self._directory is not None and self._abort_at is None:
            raw = _read(os.path.join(self._directory, DRAIN_FILE))
            if raw is not None and isinstance(raw.get("abort_at"), (int, float)):
                self._abort_at = float(raw["abort_at"])
        return self._abort_at

    def report(self, engine_alive: bool, engine_failure: Optional[str], unanswered: int, draining: bool):
        if self._directory is None:
            return
        health = Health(os.getpid(), time.time(), engine_alive, engine_failure, unanswered, draining)
        try:
            _write_atomically(os.path.join(self._directory, HEALTH_FILE), asdict(health))
        except OSError as e:    # the launcher will see a stale heartbeat and say so; log once
            self._failed_writes += 1
            if self._failed_writes == 1:
                logger.error("cannot write the health report for scripts/serve.py: %s", e)

    def exit_with_parent(self):
        """Ends this process (the stub) soon after its parent, tritonserver, is gone.

        The Python backend stub of 2.51 outlives a tritonserver killed without a
        shutdown (for example with a launcher killed by SIGKILL), keeping its
        shared memory. The watch is a small shell process, not a thread: a
        thread of this interpreter stops with all the others while one of them
        waits, holding the GIL, on a call to the dead server.
        """
        if self._shm_prefix is None:    # not started by scripts/serve.py: leave the process alone
            return
        shm = f"/dev/shm/{self._shm_prefix}*"
        server, stub = os.getppid(), os.getpid()
        script = (f"while kill -0 {server} 2>/dev/null && kill -0 {stub} 2>/dev/null; do sleep {PARENT_CHECK_S}; done; "
                  f"kill -0 {server} 2>/dev/null || {{ kill -9 {stub} 2>/dev/null; rm -f {shm}; }}")
        subprocess.Popen(["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, close_fds=True)
