"""One writer at a time: a lock file created exclusively, naming its owner.

A lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local and NFS v3+ file systems,
unlike ``flock``), holding the owner's pid, host, start time and command. A second owner
refuses with an error that names the first and how to clear it. A lock whose owner ran on
this host and no longer exists is stale (a crashed job) and is taken over, with a message; an
owner on another host cannot be checked from here, so only ``break_lock`` (or deleting the
file) clears it.

Used by the nightly sweep (one per output directory) and by score runs (one per run key).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from attribution.errors import UserError


class OutputLocked(UserError, RuntimeError):
    """Another job holds the lock."""


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: str
    command: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def me(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), datetime.now(UTC).isoformat(timespec="seconds"),
                   " ".join(sys.argv))

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started} ({self.command or 'no command line'})"


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class OutputLock:
    """``with OutputLock(path): ...`` holds the lock for the block; ``messages`` says what it took over.

    Subclasses name the ``job`` that locks, the ``error`` it raises and how a user clears a lock.
    """

    job: ClassVar[str] = "job"
    error: ClassVar[type[OutputLocked]] = OutputLocked

    def __init__(self, path: str | Path, break_lock: bool = False) -> None:
        self.path = Path(path)
        self.break_lock = break_lock
        self.owner = LockOwner.me()
        self.messages: list[str] = []

    def how_to_clear(self) -> str:
        return f"If no {self.job} is running, delete {self.path}."

    def _read_owner(self) -> LockOwner | None:
        """The recorded owner; None when the file is unreadable or half-written."""
        try:
            return LockOwner(**json.loads(self.path.read_text()))
        except FileNotFoundError:
            raise
        except (OSError, ValueError, TypeError):
            return None

    def _create(self) -> bool:
        """Take the lock with its owner already written: the owner goes to a private file first, which is
        then hard-linked as the lock (atomic, and fails if the lock exists), so another job never reads
        a lock that is there but still empty."""
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            with open(staging, "w") as file:
                json.dump(asdict(self.owner), file)
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(staging, self.path)
            except FileExistsError:
                return False
            return True
        finally:
            staging.unlink(missing_ok=True)

    def _remove_if(self, expected: LockOwner | None) -> None:
        """Delete the lock only if it still records ``expected`` (another owner may have just taken it over)."""
        try:
            if self._read_owner() == expected:
                self.path.unlink()
        except FileNotFoundError:
            pass

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return
        try:
            owner = self._read_owner()
        except FileNotFoundError:  # released between our attempt and the read
            owner = None
        else:
            if self.break_lock:
                self.messages.append(f"{self.job}.break_lock=true: removed the lock {self.path} held by "
                                     f"{owner.describe() if owner else 'an unreadable owner'}")
            elif owner is None:
                raise self.error(f"another {self.job} is writing to {self.path.parent}: the lock file {self.path} exists "
                                 f"but its owner cannot be read (a {self.job} that crashed while taking it?). "
                                 f"{self.how_to_clear()}")
            elif owner.host == socket.gethostname() and not _process_exists(owner.pid):
                self.messages.append(f"took over the stale lock {self.path}: its owner, {owner.describe()}, no longer exists")
            else:
                alive = "is running" if owner.host == socket.gethostname() else "cannot be checked from this host"
                raise self.error(f"another {self.job} holds the lock {self.path}: {owner.describe()}, which {alive}. "
                                 f"{self.how_to_clear()}")
            self._remove_if(owner)
        if not self._create():
            raise self.error(f"another {self.job} took the lock {self.path} while this one was clearing it; try again later")

    def release(self) -> None:
        self._remove_if(self.owner)

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()
