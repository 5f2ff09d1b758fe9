"""Which device a run used, its memory over the run (all processes: the server's too), and the CPU
time of this process's threads."""

import os
import shutil
import subprocess
import threading
import time
from typing import Optional

SAMPLE_EVERY_S = 0.5


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each live Python thread of this process, by thread
    name, and by the whole process under "process" (Linux /proc; {} elsewhere). A thread waiting for the
    GIL uses none: beside the wall time, the figures say which threads held the GIL or ran native code."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds = {}
    paths = [(t.name, f"/proc/self/task/{t.native_id}/stat") for t in threading.enumerate()]
    for name, path in paths + [("process", "/proc/self/stat")]:
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()    # after "pid (comm)": state is fields[0]
        except OSError:
            continue
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def device_name() -> str:
    """GPU 0's name from nvidia-smi (asking torch would open a CUDA context in this process), else cpu."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                 capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "cpu"


def _used_gib_nvidia_smi() -> Optional[float]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.split()[0]) / 1024 if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class MemorySampler:
    """Device memory in use (GiB) every SAMPLE_EVERY_S between begin() and end(): nvidia-smi,
    so that a server in another process counts. On the CPU nothing is sampled (None)."""

    def __init__(self, device: str):
        self._on = device.startswith("cuda") and shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()

    def begin(self) -> None:
        self._series: list[tuple[float, float]] = []
        self._start = time.monotonic()
        self._mark = None
        if self._on:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            used = _used_gib_nvidia_smi()
            if used is not None:
                self._series.append((round(time.monotonic() - self._start, 2), round(used, 3)))
            if self._stop.wait(SAMPLE_EVERY_S):
                return

    def mark(self) -> None:
        """The measured phase starts now (after warm-up): `first_gib` is the first sample from here."""
        self._mark = time.monotonic() - self._start

    def end(self) -> dict:
        if not self._on:
            return {"peak_gib": None, "series": []}
        self._stop.set()
        self._thread.join()
        used = [u for _, u in self._series]
        measured = [u for t, u in self._series if self._mark is None or t >= self._mark] or used[-1:]
        return {"peak_gib": max(used, default=None), "warmup_start_gib": used[0] if used else None,
                "first_gib": measured[0] if measured else None, "last_gib": used[-1] if used else None,
                "growth_gib": (measured[-1] - measured[0]) if measured else None,
                "measured_from_s": self._mark, "series": self._series}
