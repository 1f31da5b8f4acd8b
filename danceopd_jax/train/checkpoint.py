"""Orbax checkpoints: the training run's state and the frozen teachers.

A run checkpoint holds the whole train state (trainable params, optimizer state, step, the
base PRNG key) plus JSON metadata (config, last loss). A teacher is a params pytree saved once
beside a recipe.json that says how it was made, so a workdir can be reused or audited.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from danceopd_jax.core.errors import DataError

log = logging.getLogger(__name__)


class CheckpointError(DataError):
    """A checkpoint that should be there is missing, incomplete or unreadable."""


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


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
                state=ocp.args.StandardRestore(_abstract(like_state)),
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


def save_params(directory: str | Path, params: Any, recipe: dict) -> None:
    """Save a frozen model (a params pytree) and the recipe that produced it."""
    directory = Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / "params", params, force=True)
    (directory / "recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))


def has_params(directory: str | Path) -> bool:
    return (Path(directory) / "recipe.json").is_file()


def load_params(directory: str | Path, like: Any) -> tuple[Any, dict]:
    """Load a model saved by save_params into the structure of `like` (shapes must match)."""
    directory = Path(directory).absolute()
    recipe_file = directory / "recipe.json"
    if not recipe_file.is_file():
        raise CheckpointError(
            f"{directory} holds no saved model (recipe.json is missing). Point to a directory "
            "written by the teacher preparation, or delete it so the model is trained again.")
    try:
        recipe = json.loads(recipe_file.read_text())
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(directory / "params", _abstract(like))
    except Exception as e:
        raise CheckpointError(
            f"the saved model in {directory} cannot be read ({type(e).__name__}: {e}). It is "
            "corrupt or belongs to another model config; delete the directory to train it "
            "again.") from e
    return params, recipe
