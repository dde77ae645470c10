"""Every error the package raises on purpose, in one place; each ends a command with a clear
one-line message (cli.py maps them to exit codes), never a traceback.

    ConfigError      a config file or override that cannot be applied        exit 2
    DataError        bad input data: the file, row and field                 exit 2
    VSPInputError    unusable inputs of `score vsp` as a whole               exit 2
    RunError         a run cannot go on (and its kinds below)                exit 3
      BudgetError      over a configured memory or sequence budget
      TrainingAborted  stopped on purpose (e.g. too many non-finite steps)
      CheckpointError  no usable checkpoint
"""

from __future__ import annotations

import os


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key."""


class DataError(ValueError):
    """Bad input data; the message names the file, row and field."""

    def __init__(
        self, reason: str, *, file: str | os.PathLike | None = None, row: str | None = None, field: str | None = None
    ) -> None:
        self.reason, self.file, self.row, self.field = reason, None if file is None else str(file), row, field
        where = [p for p in (self.file, None if row is None else f"row {row}", field) if p]
        super().__init__(": ".join([*where, reason]))


class VSPInputError(ValueError):
    """The inputs of `score vsp` are unusable as a whole (exit code 2)."""


class RunError(RuntimeError):
    """A run cannot go on; the message says why, with the numbers and paths a user needs."""


class BudgetError(RunError):
    """A run would exceed a configured memory or sequence budget (raised before allocating)."""


class TrainingAborted(RunError):
    """Training stopped on purpose (e.g. too many consecutive non-finite steps); the last good
    checkpoint is left as it was."""


class CheckpointError(RunError):
    """No usable checkpoint: the message names the folder and the file that failed the check."""
