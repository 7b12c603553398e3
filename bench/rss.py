"""A process's peak resident memory over a stretch of time (Linux /proc), for bench.serve's rounds.

A thread samples VmRSS while the stretch runs; the kernel's own peak (VmHWM) is reset at the
start where the kernel allows it and read at the end, so a spike between two samples still counts.
"""

from __future__ import annotations

import threading
from pathlib import Path

SAMPLE_S = 0.02


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")), None)


class PeakRss:
    """with PeakRss(pid) as peak: ...; then peak.gb: the largest of the sampled VmRSS and VmHWM, in GB
    (None off Linux). pid "self" is this process."""

    def __init__(self, pid: int | str = "self", every_s: float = SAMPLE_S) -> None:
        self.pid = pid
        self.every_s = every_s
        self.sampled_kib = 0
        self.hwm_kib: int | None = None
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        try:  # "5" resets the peak resident size (proc(5), clear_refs)
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        # Without the reset, VmHWM is the peak since the process started, not this stretch's.
        self.hwm_kib = _status_kib(self.pid, "VmHWM") if self._hwm_reset else None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._read()
            self._stop.wait(self.every_s)

    def _read(self) -> None:
        kib = _status_kib(self.pid, "VmRSS")
        if kib is not None:
            self.sampled_kib = max(self.sampled_kib, kib)

    @property
    def gb(self) -> float | None:
        kib = max(self.sampled_kib, self.hwm_kib or 0)
        return kib * 1024 / 1e9 if kib else None
