"""The errors a user can fix, with the exit status each command line gives them (cli.py).

An exception with an ``exit_code`` attribute is expected: the command lines print its message
(what went wrong, where, how to fix it) without a traceback and exit with that status. Any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2  # a bad flag, config value or input file: change the command
EXIT_DATA = 3  # data, a checkpoint or the workdir cannot be used as they are
EXIT_DIVERGED = 4  # training became non-finite; the message gives the command that resumes
EXIT_PREEMPTED = 42  # SIGTERM: a checkpoint was saved; rerun the same command (requeue)


class ConfigError(ValueError):
    """A config value, flag or input that cannot work; the message says which and what to use."""

    exit_code = EXIT_USAGE


class DataError(ValueError):
    """Data, a checkpoint or a workdir that cannot be used as they are."""

    exit_code = EXIT_DATA


class CheckpointError(DataError):
    """A checkpoint or saved model that should be there is missing, incomplete or unreadable."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stopped without saving it."""

    exit_code = EXIT_DIVERGED


class Preempted(Exception):  # noqa: N818 - an event, not an error
    """SIGTERM arrived; a checkpoint of `step` was saved and the run stopped cleanly."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int):
        super().__init__(f"preempted: saved a checkpoint at step {step}; rerun the same command "
                         "to resume from it.")
        self.step = step
