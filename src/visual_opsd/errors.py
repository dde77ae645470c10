"""Errors that end a run with a clear one-line message from the command line, never a traceback."""

from __future__ import annotations


class RunError(RuntimeError):
    """A run cannot go on; the message says why, with the numbers and paths a user needs."""


class BudgetError(RunError):
    """A run would exceed a configured memory or sequence budget (raised before allocating)."""


class TrainingAborted(RunError):
    """Training stopped on purpose (e.g. too many consecutive non-finite steps); the last good
    checkpoint is left as it was."""
