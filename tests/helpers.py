"""Shared test helpers (besides conftest's configs): workdirs with trained teachers, and
command lines run as `python -m` runs them, cheaply."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def workdir_with_teachers(trained: tuple[Path, dict], path: Path) -> Path:
    path.mkdir()
    for sub in ("teachers", "data"):
        shutil.copytree(trained[0] / sub, path / sub)
    return path


def run_clis(cases: list[dict], env: dict | None = None, timeout: int = 600
             ) -> list[tuple[int, str]]:
    """(exit status, stdout + stderr) of each case {"argv": [module, *args], "prelude": code
    run first (fault injection)}, run as `python -m module args` would be: each in a process
    forked from one driver that imported the heavy libraries once (a fresh interpreter per
    command line spends seconds on imports). A child killed by signal N gives -N."""
    out = subprocess.run([sys.executable, __file__], input=json.dumps(cases), cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {}),
                              "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(r) for r in json.loads(out.stdout.splitlines()[-1])]


def _drive() -> None:
    # What every command line imports (no module that defines flags: each child does that).
    import flax.nnx  # noqa: F401
    import orbax.checkpoint  # noqa: F401
    from ml_collections import config_flags  # noqa: F401

    import danceopd_jax.interop.workdir  # noqa: F401
    import danceopd_jax.train.distill  # noqa: F401

    results = []
    for case in json.load(sys.stdin):
        with tempfile.TemporaryFile() as log:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                os._exit(_child(case))
            _, status = os.waitpid(pid, 0)
            log.seek(0)
            results.append((os.waitstatus_to_exitcode(status), log.read().decode()))
    print(json.dumps(results))


def _child(case: dict) -> int:
    module, *args = case["argv"]
    sys.argv = [module, *args]
    try:
        exec(case.get("prelude", ""), {})  # noqa: S102 - the test's own fault injection
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - an uncaught error, as the interpreter shows it
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    _drive()
