"""Orbax checkpoints of a training run: the whole train state (trainable params, optimizer
state, step, the base PRNG key) plus JSON metadata (config, last loss). Frozen models (the
teachers) are saved with data/store.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from danceopd_jax.core.errors import CheckpointError
from danceopd_jax.data.store import abstract

log = logging.getLogger(__name__)


class RunCheckpoints:
    """Periodic checkpoints of one training run under `directory`."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                                 create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, like_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore `step` (default: latest) into the structure, shapes and shardings of
        like_state."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint found under {self.directory}.")
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract(like_state)),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; all mean the same thing to a user
            raise CheckpointError(
                f"checkpoint step {step} under {self.directory} cannot be read "
                f"({type(e).__name__}: {e}). It is corrupt or was written by a different "
                f"model/optimizer config: delete {self.directory / str(step)} to resume from an "
                "earlier step, or use a new --workdir.") from e
        return restored.state, restored.meta

    def close(self) -> None:
        self._manager.close()
