"""Peak memory of one phase: CUDA peak allocation on GPU, sampled peak RSS of this process on CPU."""

from __future__ import annotations

import threading

import psutil
import torch


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.result()` -> {"peak_mem_mb", "memory_kind"}.

    On CPU the process's resident set is sampled every `interval` seconds in a thread: `ru_maxrss` is the
    peak of the whole process life, so it cannot tell one optimizer's training from the one before.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def sample():
                while not self._stop.wait(self.interval):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)

    def result(self) -> dict:
        return {"peak_mem_mb": round(self.peak / 2**20, 1),
                "memory_kind": "cuda_max_allocated" if self.cuda else "cpu_peak_rss"}
