"""Saved models: a params pytree written once with Orbax beside a recipe.json that says how it
was made, so a workdir can be reused or audited (the teachers, converted checkpoints, the FD
classifier)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from danceopd_jax.core.errors import CheckpointError


def abstract(tree: Any) -> Any:
    """The tree's shapes and dtypes (what Orbax restores into)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


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
            params = ckptr.restore(directory / "params", abstract(like))
    except Exception as e:
        raise CheckpointError(
            f"the saved model in {directory} cannot be read ({type(e).__name__}: {e}). It is "
            "corrupt or belongs to another model config; delete the directory to train it "
            "again.") from e
    return params, recipe


def digest(key: Any) -> str:
    """A short stable name for a JSON-able key (a cache folder's or a run's)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def key_of(recipe: dict) -> dict:
    """The key of a saved model's recipe (a teacher saved before recipes had a "key" field has
    the key as its whole recipe)."""
    return recipe.get("key", recipe)


def cached(directory: str | Path, key: dict, like: Any | Callable[[dict], Any],
           build: Callable[[], tuple[Any, dict]] | None, what: str,
           stale: str = "error") -> tuple[Any, dict, bool]:
    """Build or load a saved model by key: (params, its recipe, whether it was built now).

    `directory` holds a model saved with the same recipe "key": it is loaded into `like` (a
    tree of shapes, or a function of the recipe that gives one). It holds one with another key:
    `stale` = "error" raises CheckpointError naming what changed, "rebuild" builds it again. It
    holds none: `build()` -> (params, info), saved with recipe {**info, "key": key}; with no
    `build` (load only) that is a CheckpointError. `what` names the model in messages."""
    directory = Path(directory).absolute()
    if has_params(directory):
        recipe = json.loads((directory / "recipe.json").read_text())
        old = key_of(recipe)
        if old == key:
            params, _ = load_params(directory, like(recipe) if callable(like) else like)
            return params, recipe, False
        if stale != "rebuild":
            changed = ", ".join(_changes(old if isinstance(old, dict) else {}, key))
            raise CheckpointError(
                f"{what} in {directory} was made from something else than this config asks "
                f"for (changed: {changed}; see its recipe.json). Delete {directory} to make "
                "it again, or use a new --workdir.")
    if build is None:
        raise CheckpointError(f"{directory} holds no {what}; run the job that makes it (the "
                              "main job on this workdir) first.")
    params, info = build()
    recipe = {**info, "key": key}
    save_params(directory, params, recipe)
    return params, recipe, True


def _changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Where two keys differ, as "/"-joined paths (a file's size and mtime, a field, ...)."""
    out = []
    for k in sorted(old.keys() | new.keys()):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{k}/")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
