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
