"""The one base class of a user's mistake.

A :class:`UserError` is something the person running a job can fix: a bad setting, a
missing or malformed file, a store fitted for another model. Its message is one line that
names the key, file, row or module at fault. Jobs print that line and exit with code 2;
anything else is a bug or a fault of the machine and keeps its traceback.
"""

from __future__ import annotations

import re
import sys

# Colour and cursor codes, which Ray puts into the messages it forwards from workers.
_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class UserError(Exception):
    """A mistake in a job's inputs or settings; ``str(error)`` is the line the user sees."""


def user_error_of(error: BaseException | None) -> UserError | None:
    """The user's own error inside ``error``, or None when there is none.

    An error raised on a Ray worker reaches the driver wrapped (``RayTaskError``, or an actor's
    constructor error): the wrapper is an instance of the original class too, but its message is
    the worker's whole traceback, so the original is looked for through ``cause``,
    ``creation_task_error`` and ``__cause__``, passing over Ray's wrappers.
    """
    ray_exceptions = sys.modules.get("ray.exceptions")
    wrapper = ray_exceptions.RayError if ray_exceptions is not None else ()
    for _ in range(8):
        if error is None:
            return None
        if isinstance(error, UserError) and not isinstance(error, wrapper):
            return error
        error = getattr(error, "cause", None) or getattr(error, "creation_task_error", None) or error.__cause__
    return None


def one_line(message: str) -> str:
    """A message as one plain line: whitespace runs folded, terminal codes removed."""
    return " ".join(_TERMINAL_CODES.sub("", message).split())


def raise_user_error_of(error: BaseException) -> None:
    """Raise the user's own error inside ``error`` as itself (one clear line, not a worker's traceback), if there is one."""
    cause = user_error_of(error)
    if cause is not None:
        raise cause from None
