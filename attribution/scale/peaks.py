"""Peak memory and time of each stage of a run, as the stage listeners of :mod:`attribution.progress` mark them.

On a CUDA device the peak is the allocator's ``max_memory_allocated``, reset at each stage. On the CPU
it is the process's resident set (``/proc/self/statm``), sampled every ``interval`` seconds by a
thread: torch releases the GIL inside its kernels, and a tensor large enough to matter lives far
longer than a millisecond, so sampling sees it. Resident memory includes what the interpreter and
libraries hold before any work; :attr:`StagePeaks.baseline` is that level, read when sampling starts.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from attribution.progress import begin_stage, stage_listener

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


@dataclass
class StagePeak:
    name: str
    seconds: float
    peak_bytes: int


class StagePeaks(AbstractContextManager):
    """Within the block, every :func:`~attribution.progress.begin_stage` starts a new stage; on exit
    :attr:`stages` holds each stage's wall time and peak memory, in order."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.cuda = device.type == "cuda"
        self.interval = interval
        self.stages: list[StagePeak] = []
        self.baseline = 0
        self._current: str | None = None
        self._started = 0.0
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._listening = stage_listener(self._begin)

    def __enter__(self) -> StagePeaks:
        self.baseline = torch.cuda.memory_allocated() if self.cuda else resident_bytes()
        self._listening.__enter__()
        if not self.cuda:
            self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._close_stage()
        self._stop.set()
        if not self.cuda:
            self._sampler.join()
        self._listening.__exit__(*exc)

    def stage(self, name: str) -> None:
        """Begin stage ``name`` (the same as :func:`~attribution.progress.begin_stage` inside the block)."""
        begin_stage(name)

    def _begin(self, name: str) -> None:
        self._close_stage()
        with self._lock:
            self._current = name
            self._started = time.perf_counter()
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self._peak = self._now()

    def _close_stage(self) -> None:
        with self._lock:
            if self._current is None:
                return
            if self.cuda:
                torch.cuda.synchronize()
                self._peak = max(self._peak, torch.cuda.max_memory_allocated())
            else:
                self._peak = max(self._peak, resident_bytes())
            self.stages.append(StagePeak(self._current, time.perf_counter() - self._started, self._peak))
            self._current = None

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else resident_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if self._current is not None:
                    self._peak = max(self._peak, resident_bytes())
