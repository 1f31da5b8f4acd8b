"""The feature space of ShapesBench's image-quality metric: a small classifier of world scenes.

FID's Inception features know nothing of 24-pixel palette scenes, so the Frechet distance is
taken in the embedding of a network trained to read exactly what the world varies: the
background colour, the style, and per grid cell the object's shape and colour (or that the
cell is empty). Two image sets far apart in that space show different kinds of scenes, or
scenes drawn differently (blurred edges, off-palette colours, broken shapes).

Architecture (a Flax NNX CNN), per grid cell: a 3x3 convolution (local edges, which shapes and
the outline style are made of) followed by one convolution over the cell (kernel = stride =
the cell), beside per-pixel (1x1) colour features averaged over the cell, which do not depend
on the shape, so colours are recognised on shapes they were never seen on (held-out pairs).
A dense layer maps each cell to `cell_features` units and the mean over cells to as many
whole-image units; the FD space is both, concatenated after their ReLU ((9 + 1) x 16 = 160
dims). Linear heads read them: one head shared by all cells for the shape (empty + 5) and the
colour (empty + 12), and one for the background (12) and the style (4).

It is trained once per (world image size, world seed, recipe) on train-split images (T2I
targets and edit sources and targets, so styled images too), from a fixed seed, and cached with
Orbax under `<cache_dir>/<key>/` beside a recipe.json that also holds its accuracy on
held-out-split images, so what its features mean is on record.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from danceopd_jax.data.batches import to_unit_range
from danceopd_jax.data.shapes import dataset
from danceopd_jax.data.shapes.world import (
    COLORS,
    NUM_CELLS,
    PALETTE,
    SHAPES,
    STYLES,
    Scene,
    cell_size,
    pick,
    render,
)
from danceopd_jax.data.store import cached, digest

log = logging.getLogger(__name__)
Params = Any
# Bump when the architecture, the labels or the training code change: it is part of the cache
# key, so a changed classifier is never confused with a cached one.
FORMAT = 1
HEADS = ("background", "style", "shape", "color")
EMBED_BATCH = 256  # one compiled shape for feature extraction


@dataclass(frozen=True)
class ClassifierRecipe:
    """Everything besides the world that determines the classifier (part of its cache key)."""

    num_train: int = 4096  # rows per train bucket (T2I targets; edit sources and targets)
    num_heldout: int = 512  # rows per held-out bucket, for the reported accuracy
    width: int = 16
    cell_features: int = 16  # the FD space has (9 cells + 1) * cell_features dims
    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0


DEFAULT_RECIPE = ClassifierRecipe()


class SceneClassifier(nnx.Module):
    def __init__(self, image_size: int, width: int, cell_features: int, *, rngs: nnx.Rngs):
        self.cell = cell_size(image_size)
        self.edges = nnx.Conv(3, width, (3, 3), rngs=rngs)
        self.cells = nnx.Conv(width, 2 * width, (self.cell, self.cell),
                              strides=(self.cell, self.cell), padding="VALID", rngs=rngs)
        self.colors = nnx.Conv(3, width, (1, 1), rngs=rngs)
        self.cell_embed = nnx.Linear(3 * width, cell_features, rngs=rngs)
        self.global_embed = nnx.Linear(3 * width, cell_features, rngs=rngs)
        self.object_head = nnx.Linear(cell_features, 1 + len(SHAPES) + 1 + len(COLORS),
                                      rngs=rngs)
        self.scene_head = nnx.Linear(cell_features, len(COLORS) + len(STYLES), rngs=rngs)

    def _embed(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        shapes = nnx.relu(self.cells(nnx.relu(self.edges(x))))  # [B, 3, 3, 2 width]
        # Shape-independent colour features (see the module docstring).
        colors = nnx.avg_pool(nnx.relu(self.colors(x)), (self.cell, self.cell),
                              (self.cell, self.cell))
        h = jnp.concatenate([shapes, colors], -1)  # one vector per grid cell
        per_cell = nnx.relu(self.cell_embed(h)).reshape(h.shape[0], NUM_CELLS, -1)
        return per_cell, nnx.relu(self.global_embed(h.mean((1, 2))))

    def embedding(self, x: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [-1, 1] -> [B, (cells + 1) * cell_features]: the per-cell and the
        whole-image embeddings side by side, the Frechet distance's feature space."""
        per_cell, whole = self._embed(x)
        return jnp.concatenate([per_cell.reshape(len(x), -1), whole], -1)

    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """Logits per head: background, style [B, classes]; shape, color [B, cells, classes].
        The object head is shared by all cells, so what it learns in one cell holds in all."""
        per_cell, whole = self._embed(x)
        objects, scene = self.object_head(per_cell), self.scene_head(whole)
        shapes = 1 + len(SHAPES)
        return {"background": scene[:, :len(COLORS)], "style": scene[:, len(COLORS):],
                "shape": objects[..., :shapes], "color": objects[..., shapes:]}


def _init(image_size: int, recipe: ClassifierRecipe) -> SceneClassifier:
    return SceneClassifier(image_size, recipe.width, recipe.cell_features,
                           rngs=nnx.Rngs(recipe.seed))


def scene_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Class indices per head: background/style [N], shape/color [N, cells] (0 = empty)."""
    labels = {"background": np.array([COLORS.index(s.background) for s in scenes], np.int32),
              "style": np.array([STYLES.index(s.style) for s in scenes], np.int32),
              "shape": np.zeros((len(scenes), NUM_CELLS), np.int32),
              "color": np.zeros((len(scenes), NUM_CELLS), np.int32)}
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            labels["shape"][i, o.cell] = 1 + SHAPES.index(o.shape)
            labels["color"][i, o.cell] = 1 + COLORS.index(o.color)
    return labels


def labelled_images(split: str, num: int, image_size: int, world_seed: int, cache_dir: Path,
                    restyle_seed: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`num` T2I targets plus `num` edit sources and targets of `split`, with their labels.

    With `restyle_seed`, every plain scene is also drawn once in a random other style: styled
    images are only ~3% of the world's data, too few to learn what the styles look like."""
    images, scenes = [], []
    for bucket in ("t2i", "joint_edit"):
        data = dataset.load_split(split, bucket, num, world_seed, image_size, cache_dir)
        specs = [json.loads(str(s)) for s in data["spec"]]
        if bucket == "t2i":
            images.append(data["target"])
            scenes += [Scene.from_dict(s["scene"]) for s in specs]
        else:
            images += [data["source"], data["target"]]
            scenes += [Scene.from_dict(s["source"]) for s in specs]
            scenes += [Scene.from_dict(s["target"]) for s in specs]
    if restyle_seed is not None:
        rng = np.random.default_rng(restyle_seed)
        styled = []
        for scene in (s for s in scenes if s.style == "plain"):
            styled.append(Scene(scene.background, scene.objects, pick(rng, STYLES[1:], "style")))
            if styled[-1].style == "grayscale" and not _has_hue(scene):
                styled[-1] = Scene(scene.background, scene.objects, "invert")  # not a no-op
        images.append(np.stack([render(s, image_size) for s in styled]))
        scenes += styled
    return np.concatenate(images), scene_labels(scenes)


def _has_hue(scene: Scene) -> bool:
    return any(len(set(PALETTE[c])) > 1 for c in (scene.background,
                                                   *(o.color for o in scene.objects)))


def _loss(model: SceneClassifier, x: jax.Array, labels: dict[str, jax.Array]) -> jax.Array:
    logits = model(x)
    return sum(optax.softmax_cross_entropy_with_integer_labels(logits[k], labels[k]).mean()
               for k in HEADS)


def train_classifier(images: np.ndarray, labels: dict[str, np.ndarray],
                     recipe: ClassifierRecipe) -> tuple[nnx.GraphDef, Params]:
    """Adam (cosine decay) on the summed cross-entropies of all heads, batches drawn from a
    fixed seed."""
    graph, state = nnx.split(_init(images.shape[1], recipe))
    params = nnx.to_pure_dict(state)
    optimizer = optax.adam(optax.cosine_decay_schedule(recipe.lr, recipe.steps))

    @jax.jit
    def step(params: Params, opt_state: Any, x: jax.Array, y: dict) -> tuple:
        loss, grads = jax.value_and_grad(lambda p: _loss(nnx.merge(graph, p), x, y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = optimizer.init(params)
    rng = np.random.default_rng(recipe.seed)
    for i in range(recipe.steps):
        rows = rng.integers(0, len(images), recipe.batch_size)
        params, opt_state, loss = step(params, opt_state, to_unit_range(images[rows]),
                                       {k: v[rows] for k, v in labels.items()})
        if (i + 1) % 500 == 0:
            log.info("FD classifier: step %d/%d, loss %.4f", i + 1, recipe.steps, float(loss))
    return graph, params


class SceneFeatures:
    """A trained classifier: `features(images)` embeds uint8 images [N, H, W, 3] -> [N, D];
    `info` is its recipe.json (world, recipe, key, held-out accuracy, training time)."""

    def __init__(self, graph: nnx.GraphDef, params: Params, info: dict):
        self.params, self.info = params, info
        self._embed = jax.jit(lambda p, x: nnx.merge(graph, p).embedding(x))
        self._logits = jax.jit(lambda p, x: nnx.merge(graph, p)(x))

    def _batched(self, fn: Any, images: np.ndarray) -> list:
        out = []
        for start in range(0, len(images), EMBED_BATCH):
            n = min(EMBED_BATCH, len(images) - start)
            # Pad with the last image: one compiled shape for every batch.
            rows = np.minimum(np.arange(start, start + EMBED_BATCH), len(images) - 1)
            result = fn(self.params, to_unit_range(images[rows]))
            out.append(jax.tree.map(lambda a: np.asarray(a)[:n], result))  # noqa: B023
        return out

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.concatenate(self._batched(self._embed, np.asarray(images)))

    def accuracy(self, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
        """Fraction right per head (shape and colour per cell), and "scene": every head of an
        image right."""
        parts = self._batched(self._logits, np.asarray(images))
        right = {k: np.concatenate([p[k] for p in parts]).argmax(-1) == labels[k]
                 for k in HEADS}
        scene = np.all([r.reshape(len(images), -1).all(1) for r in right.values()], axis=0)
        return {**{k: float(r.mean()) for k, r in right.items()}, "scene": float(scene.mean())}


def classifier_key(image_size: int, world_seed: int, recipe: ClassifierRecipe) -> dict:
    """Everything that determines the classifier."""
    return {"format": FORMAT, "image_size": image_size, "world_seed": world_seed,
            "recipe": asdict(recipe)}


def scene_features(image_size: int, world_seed: int, cache_dir: str | Path,
                   recipe: ClassifierRecipe = DEFAULT_RECIPE) -> SceneFeatures:
    """The classifier for this world and recipe: loaded from `<cache_dir>/<digest of its
    key>/`, else trained (on CPU about a minute at the default recipe), measured on held-out
    images and saved there. Its training data is cached in `cache_dir` too."""
    cache_dir = Path(cache_dir)
    key = classifier_key(image_size, world_seed, recipe)
    graph, like = nnx.split(nnx.eval_shape(lambda: _init(image_size, recipe)))

    def build() -> tuple[Any, dict]:
        t0 = time.perf_counter()
        images, labels = labelled_images("train", recipe.num_train, image_size, world_seed,
                                         cache_dir, restyle_seed=recipe.seed)
        _, params = train_classifier(images, labels, recipe)
        features = SceneFeatures(graph, params, {})
        accuracy = features.accuracy(*labelled_images(
            "heldout", recipe.num_heldout, image_size, world_seed, cache_dir))
        return jax.device_get(params), {"train_time_s": time.perf_counter() - t0,
                                        "heldout_accuracy": accuracy}

    params, info, trained = cached(cache_dir / digest(key), key, nnx.to_pure_dict(like), build,
                                   "FD classifier", stale="rebuild")
    log.info("FD classifier: %s %s (held-out accuracy %s)",
             "trained and saved to" if trained else "reusing", cache_dir / digest(key),
             info["heldout_accuracy"])
    return SceneFeatures(graph, params, info)
