"""What every command line shares: its error boundary, logging, and argument checks.

``cli.run(main)`` replaces ``absl.app.run(main)``. Expected errors (an exception with an
``exit_code``, core/errors.py; absl's UsageError and flag errors) print one paragraph and exit with
their status, without a traceback; ``--verbose`` adds it. Anything else is a bug: it keeps its
traceback and exits 1. Exit statuses (README "When things go wrong"):

  0 done; 1 a bug; 2 a bad flag, config value or input; 3 data, a checkpoint or the workdir
  (e.g. locked by another job); 4 training became non-finite; 42 preempted (requeue).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import traceback
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from danceopd_jax.core.errors import EXIT_PREEMPTED, EXIT_USAGE

_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the traceback of expected errors too.")


# One flag vocabulary for every command line: a name means one thing everywhere
# (--sample_steps: Euler steps of the sampling ODE; --num_images / --num_per_category: how many
# images; --timed_steps: benchmark steps; --workdir: a main job's folder).
def workdir_flag(default: str | None = None,
                 help_text: str = "A workdir written by danceopd_jax.main.") -> flags.FlagHolder:
    return flags.DEFINE_string("workdir", default, help_text, required=default is None)


def sample_steps_flag(default: int | None = None) -> flags.FlagHolder:
    return flags.DEFINE_integer(
        "sample_steps", default, "Euler steps of the sampling ODE"
        + (" (default: the workdir config's eval.sample_steps)." if default is None else "."))


def run(main: Callable[[], None]) -> None:
    """Parse the flags (stray arguments are an error), set up logging, run main() inside the
    error boundary; first, on glibc, restart once with huge pages for malloc (use_huge_pages)."""
    use_huge_pages()
    app.run(lambda argv: _boundary(main, argv), flags_parser=_parse_flags)


# XLA:CPU allocates each call's temporaries afresh, and glibc serves blocks this large from new
# mappings, so every call of a compiled step faulted in about 100 MB of 4 KiB pages (the default
# student's forward+backward: 26,700 page faults and a third of its time in the kernel). With
# this tunable glibc asks the kernel for transparent huge pages instead (docs/performance.md,
# "CPU round 3"). It is read when a process starts, hence the restart. A GLIBC_TUNABLES that
# already says glibc.malloc.hugetlb (e.g. =0 to measure without) is left as it is.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages(tunables: str) -> str:
    """GLIBC_TUNABLES `tunables` with HUGE_PAGES, unless they already say glibc.malloc.hugetlb."""
    if "glibc.malloc.hugetlb" in tunables:
        return tunables
    return f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES


def use_huge_pages() -> None:
    """Restart this command line once with HUGE_PAGES added to GLIBC_TUNABLES (glibc only)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or platform.libc_ver()[0] != "glibc":
        return
    os.environ["GLIBC_TUNABLES"] = with_huge_pages(tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def config_flag(name: str, default: str | None, help_text: str) -> flags.FlagHolder:
    """config_flags.DEFINE_config_file, whose overrides are parsed when it is defined (at
    import): an unknown field exits 2 with ml_collections' "did you mean" hint, no traceback."""
    try:
        return config_flags.DEFINE_config_file(name, default, help_text)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if "--verbose" in sys.argv:
            traceback.print_exc()
        overrides = [a for a in sys.argv[1:] if a.startswith(f"--{name}.")]
        _fail(f"the --{name} overrides {overrides} do not fit the config file: {_hint(e)} "
              "Fix the field name or value (the config file lists them).", EXIT_USAGE)


def _hint(e: BaseException | None) -> str:
    """The message that carries ml_collections' "did you mean" hint: it wraps that KeyError
    in an AttributeError, in front of the bare KeyError."""
    chain = []
    while e is not None:
        chain.append(e.args[0] if e.args and isinstance(e.args[0], str) else str(e))
        e = e.__context__
    text = next((t for t in reversed(chain) if "Did you mean" in t), chain[0])
    return " ".join(text.split()).replace("' Did", "'; did", 1)


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(f"{str(e).rstrip('.')}. Pass --helpshort to list the flags.", EXIT_USAGE)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # A config override of a config file given on the command line (config_flag's
        # default is None), parsed here rather than at import.
        if "--verbose" in argv:
            traceback.print_exc()
        _fail(f"a --config override does not fit the config file: {_hint(e)} Fix the field "
              "name or value (the config file lists them).", EXIT_USAGE)
    if len(rest) > 1:
        _fail(f"unexpected arguments {rest[1:]}; pass every option as --flag=value (and quote "
              "values with spaces).", EXIT_USAGE)
    return rest


def _boundary(main: Callable[[], None], argv: list[str]) -> None:
    del argv
    # Orbax and tfds log every file they touch at INFO; this package's progress stays.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("danceopd_jax").setLevel(logging.INFO)
    try:
        main()
    except app.UsageError as e:
        _fail(str(e), EXIT_USAGE, e)
    except Exception as e:  # noqa: BLE001 - the boundary: sorts expected errors from bugs
        code = getattr(e, "exit_code", None)
        if code is None:
            raise
        _fail(str(e), code, e)


def _fail(message: str, code: int, error: BaseException | None = None) -> None:
    if error is not None and _VERBOSE.value:
        traceback.print_exception(error)
    prog = sys.modules["__main__"].__spec__
    name = prog.name if prog else sys.argv[0]
    hint = "" if error is None or code == EXIT_PREEMPTED or _VERBOSE.value else (
        " (--verbose: traceback)")
    sys.stderr.write(f"{name}: {message}{hint}\n")
    sys.stderr.flush()
    sys.exit(code)
