"""The one base class of a user's mistake.

A :class:`UserError` is something the person running a job can fix: a bad setting, a
missing or malformed file, a store fitted for another model. Its message is one line that
names the key, file, row or module at fault. Jobs print that line and exit with code 2;
anything else is a bug or a fault of the machine and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in a job's inputs or settings; ``str(error)`` is the line the user sees."""
