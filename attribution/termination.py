"""SIGTERM as an exception, so a job a scheduler stops cleans up like one that fails.

A cluster scheduler (Kubernetes, Slurm, a Ray job stop) sends SIGTERM and, a grace period
later, SIGKILL. Python's default for SIGTERM ends the process at once, skipping every
``finally``: locks stay held and Ray is never shut down. Raising :class:`Terminated` in the
main thread instead unwinds the job: locks are released, Ray is shut down, and every unit that
finished is already on disk, so rerunning the same command resumes. Ray's ``ray.init``
installs its own handler (``sys.exit``), so the job takes SIGTERM back after starting Ray.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

# The conventional exit status of a process ended by a signal: 128 + its number.
TERMINATED_EXIT = 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, so that ``except Exception`` in a retry loop cannot swallow it."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    # Once is enough: a second SIGTERM during the clean-up must not interrupt it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread (a no-op in other threads,
    which cannot own signal handlers)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
