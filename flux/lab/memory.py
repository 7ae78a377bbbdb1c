"""The resident memory of this process, and the most a piece of work adds to it (sampled)."""

from __future__ import annotations

import threading
import time


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakResident:
    """``with PeakResident() as peak: ...``; then ``peak.added``: the most resident memory (MiB) the
    block held above what the process held when it began, sampled every 2 ms."""

    def __enter__(self) -> PeakResident:
        self.before = self.peak = resident_mib()
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_mib())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, resident_mib())

    @property
    def added(self) -> float:
        return self.peak - self.before
