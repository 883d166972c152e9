"""What happens to input that cannot be used: a :class:`DataError`, or a recorded :class:`Skip`.

A *bad row* is a row that cannot be read as a record (invalid UTF-8 or JSON, not an object,
a missing key) or whose values have the wrong type (a null or non-string id, a non-string
text). ``data.on_bad_row=error`` (the default) stops at the first one with a message naming
the file, row and line; ``skip`` records it as a :class:`Skip` and reads on. Problems of a
whole file (unreadable, not the format its name says, a column missing from its schema) are
always errors, and so are duplicate ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from attribution.errors import UserError

ERROR, SKIP = "error", "skip"
EMPTY_SHARD = "empty shard: no rows"


class DataError(UserError, ValueError):
    """Input data that cannot be used; the message names the file, and the row and line where relevant."""


@dataclass(frozen=True)
class Skip:
    """An input item that was left out, and why (it goes into run records)."""

    item_id: str | None
    shard: str
    row: int | None
    reason: str


SkipHandler = Callable[[Skip], None]


def location(path: Path | str, row: int, line: int | None) -> str:
    """``file row 3 (line 5)``: rows count from 0 as in Parquet, lines from 1 as in editors."""
    return f"{path} row {row}" + (f" (line {line})" if line is not None else "")


class BadRows:
    """Applies ``data.on_bad_row`` to the bad rows of one read, counting them per shard."""

    def __init__(self, policy: str, on_skip: SkipHandler) -> None:
        if policy not in (ERROR, SKIP):
            raise ValueError(f"on_bad_row must be {ERROR!r} or {SKIP!r}, not {policy!r}")
        self.policy = policy
        self.on_skip = on_skip
        self.in_shard = 0
        self.first_in_shard: str | None = None

    def start_shard(self) -> None:
        self.in_shard = 0
        self.first_in_shard = None

    def __call__(self, path: Path | str, row: int, line: int | None, problem: str, item_id: str | None = None) -> None:
        """DataError (``error``), or a Skip whose reason carries the line (``skip``)."""
        if self.policy == ERROR:
            raise DataError(f"{location(path, row, line)}: {problem}")
        self.in_shard += 1
        if self.first_in_shard is None:
            self.first_in_shard = f"{location(path, row, line)}: {problem}"
        where = f"line {line}: " if line is not None else ""
        self.on_skip(Skip(item_id, str(path), row, f"bad row: {where}{problem}"))

    def check_shard(self, path: Path | str, rows: int) -> None:
        """A shard whose every row is bad is a wrong format or field name, not a few bad rows."""
        if rows and self.in_shard == rows:
            raise DataError(
                f"{path}: all {rows} rows are bad (first: {self.first_in_shard}); "
                "check data.id_field / data.text_field and the file's format"
            )
